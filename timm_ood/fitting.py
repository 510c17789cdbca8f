"""One streaming pass over in-distribution data fits every detector that needs it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ._runtime import eval_mode, model_device, model_dtype
from .batches import check_class_labels, check_images, iter_batches
from .detectors.base import Detector
from .tap import Tap

__all__ = ["FitTimes", "fit_detectors"]


@dataclass
class FitTimes:
    """Where a fit pass spent its time: the shared forward, and each detector (by position)."""

    forward_seconds: float = 0.0
    detector_seconds: list[float] = field(default_factory=list)


def fit_detectors(
    tap: Tap, detectors: Sequence[Detector], data: Iterable, *, progress: bool | None = None
) -> FitTimes:
    """Fit several detectors together: one tap forward per batch serves all of them.

    Detectors that need no fit are skipped (and ``data`` is not read at all when
    none needs one). The model runs in eval mode without autograd; each
    detector keeps only its sufficient statistics. Detectors that declare
    ``fit_passes > 1`` see the data again, with ``next_fit_pass`` between
    passes; later passes serve only them.

    Args:
        tap: the tap of the model the detectors belong to.
        detectors: detectors to fit.
        data: a DataLoader or iterable of ``(images, labels)`` batches of
            in-distribution training data (re-iterable for multi-pass fits).
        progress: show a tqdm bar (default: when attached to a terminal).

    Returns:
        Seconds spent in the shared forward and in each detector of ``detectors``.

    Raises:
        ValueError: ``data`` yielded no batches, labels are missing for a
            detector that fits on labels, or a multi-pass fit got a one-shot
            iterator.
    """
    times = FitTimes(detector_seconds=[0.0] * len(detectors))
    to_fit = [(i, d) for i, d in enumerate(detectors) if d.requirements.fit]
    if not to_fit:
        return times
    passes = max(d.requirements.fit_passes for _, d in to_fit)
    if passes > 1 and isinstance(data, Iterator):
        names = ", ".join(d.name for _, d in to_fit if d.requirements.fit_passes > 1)
        raise ValueError(
            f"{names} read the fit data {passes} times, but it is a one-shot iterator: pass a "
            "DataLoader, a list of batches or another re-iterable collection"
        )
    for _, detector in to_fit:
        detector.reset_fit(tap)
    for pass_index in range(passes):
        active = [(i, d) for i, d in to_fit if d.requirements.fit_passes > pass_index]
        _fit_pass(tap, active, data, times, progress, pass_index, passes)
        for index, detector in active:
            start = time.perf_counter()
            if pass_index + 1 < detector.requirements.fit_passes:
                detector.next_fit_pass()
            else:
                detector.finish_fit()
                detector.is_fitted = True
                detector.record_fingerprint(tap.model)  # what the state describes (timm_ood.fingerprint)
            times.detector_seconds[index] += time.perf_counter() - start
    return times


def _fit_pass(
    tap: Tap, active: Sequence[tuple[int, Detector]], data: Iterable, times: FitTimes,
    progress: bool | None, pass_index: int, passes: int,
) -> None:
    """One pass over ``data``: a shared forward per batch, then each active detector's update."""
    needs = frozenset().union(*(d.requirements.outputs_for_fit for _, d in active))
    device, dtype = model_device(tap.model), model_dtype(tap.model)
    names = ", ".join(d.name for _, d in active)
    labelled = [d.name for _, d in active if d.requirements.fit_labels]
    description = f"fit {names}" + (f" (pass {pass_index + 1}/{passes})" if passes > 1 else "")
    batches = 0
    with eval_mode(tap.model), torch.no_grad():
        total = len(data) if hasattr(data, "__len__") else None
        for images, labels in tqdm(iter_batches(data), total=total, desc=description,
                                   disable=None if progress is None else not progress, leave=False):
            images = check_images(images, tap).to(device=device, dtype=dtype)
            if labels is not None:
                if labelled:
                    who = f"fitting {', '.join(map(repr, labelled))}"
                    check_class_labels(labels, len(images), tap.head_info.num_classes, who)
                labels = labels.to(device)
            start = time.perf_counter()
            outputs = tap(images, needs)
            times.forward_seconds += time.perf_counter() - start
            for index, detector in active:
                if detector.requirements.fit_labels and labels is None:
                    raise ValueError(
                        f"detector {detector.name!r} fits on class labels, but the batches carry "
                        "none: pass (images, labels) batches of in-distribution training data"
                    )
                start = time.perf_counter()
                detector.update_fit(outputs, labels)
                times.detector_seconds[index] += time.perf_counter() - start
            batches += 1
    if batches == 0:
        raise ValueError(f"fit received no batches: the in-distribution data for {names} is empty")
