"""One streaming pass over in-distribution data fits every detector that needs it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ._runtime import eval_mode, model_device, model_dtype
from .batches import check_images, iter_batches
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
    detector keeps only its sufficient statistics.

    Args:
        tap: the tap of the model the detectors belong to.
        detectors: detectors to fit.
        data: a DataLoader or iterable of ``(images, labels)`` batches of
            in-distribution training data.
        progress: show a tqdm bar (default: when attached to a terminal).

    Returns:
        Seconds spent in the shared forward and in each detector of ``detectors``.

    Raises:
        ValueError: ``data`` yielded no batches, or labels are missing for a
            detector that fits on labels.
    """
    times = FitTimes(detector_seconds=[0.0] * len(detectors))
    to_fit = [(i, d) for i, d in enumerate(detectors) if d.requirements.fit]
    if not to_fit:
        return times
    needs = frozenset().union(*(d.requirements.outputs_for_fit for _, d in to_fit))
    device, dtype = model_device(tap.model), model_dtype(tap.model)
    for _, detector in to_fit:
        detector.reset_fit(tap)
    names = ", ".join(d.name for _, d in to_fit)
    batches = 0
    with eval_mode(tap.model), torch.no_grad():
        total = len(data) if hasattr(data, "__len__") else None
        for images, labels in tqdm(iter_batches(data), total=total, desc=f"fit {names}",
                                   disable=None if progress is None else not progress, leave=False):
            images = check_images(images, tap).to(device=device, dtype=dtype)
            if labels is not None:
                labels = labels.to(device)
            start = time.perf_counter()
            outputs = tap(images, needs)
            times.forward_seconds += time.perf_counter() - start
            for index, detector in to_fit:
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
    for index, detector in to_fit:
        start = time.perf_counter()
        detector.finish_fit()
        detector.is_fitted = True
        times.detector_seconds[index] += time.perf_counter() - start
    return times
