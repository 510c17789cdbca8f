"""Fitting detectors: one streaming pass of the driver over in-distribution data fits every detector that
needs it; :func:`fit_held_out` runs the held-out steps detectors declare."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ._runtime import model_device
from .batches import check_class_labels
from .detectors.base import Detector
from .passes import run_pass
from .store import BoundStore
from .tap import Outputs, Tap

__all__ = ["FitTimes", "fit_detectors", "fit_held_out"]


@dataclass
class FitTimes:
    """Where a fit pass spent its time: the shared forward, and each detector (by position)."""

    forward_seconds: float = 0.0
    detector_seconds: list[float] = field(default_factory=list)


def fit_detectors(
    tap: Tap, detectors: Sequence[Detector], data: Iterable, *, progress: bool | None = None,
    store: BoundStore | None = None,
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
        store: a feature store bound to the model (:mod:`timm_ood.store`): the
            tap's outputs of the fit data are read from it, or written to it,
            and so are the fitted states (a detector whose fit of this model,
            data, hyperparameters and code is stored is loaded, not fitted).

    Returns:
        Seconds spent in the shared forward and in each detector of ``detectors``.

    Raises:
        ValueError: ``data`` yielded no batches, labels are missing for a
            detector that fits on labels, or a multi-pass fit got a one-shot
            iterator.
    """
    times = FitTimes(detector_seconds=[0.0] * len(detectors))
    to_fit = [(i, d) for i, d in enumerate(detectors) if d.requirements.fit]
    fingerprint = getattr(data, "fingerprint", None) if store is not None else None
    if store is not None and fingerprint is not None:  # stored fits of this model, data, hyperparameters, code: loaded
        loaded = [(i, d) for i, d in to_fit if store.load_fitted(d, fingerprint)]
        to_fit = [(i, d) for i, d in to_fit if (i, d) not in loaded]
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
        _fit_pass(tap, active, data, times, progress, pass_index, passes, store)
        for index, detector in active:
            start = time.perf_counter()
            if pass_index + 1 < detector.requirements.fit_passes:
                detector.next_fit_pass()
            else:
                detector.finish_fit()
                detector.is_fitted = True
                detector.record_fingerprint(tap.model)  # what the state describes (timm_ood.fingerprint)
                if store is not None and fingerprint is not None:
                    store.save_fitted(detector, fingerprint)
            times.detector_seconds[index] += time.perf_counter() - start
    return times


def _fit_pass(
    tap: Tap, active: Sequence[tuple[int, Detector]], data: Iterable, times: FitTimes,
    progress: bool | None, pass_index: int, passes: int, store: BoundStore | None,
) -> None:
    """One pass over ``data`` through the driver: a shared forward per batch, then each active detector's update."""
    needs = frozenset().union(*(d.requirements.outputs_for_fit for _, d in active))
    device = model_device(tap.model)
    names = ", ".join(d.name for _, d in active)
    labelled = [d.name for _, d in active if d.requirements.fit_labels]
    description = f"fit {names}" + (f" (pass {pass_index + 1}/{passes})" if passes > 1 else "")

    def consume(outputs: Outputs, labels: torch.Tensor | None) -> None:
        if labels is not None:
            if labelled:
                who = f"fitting {', '.join(map(repr, labelled))}"
                check_class_labels(labels, len(outputs), tap.head_info.num_classes, who)
            labels = labels.to(device)
        for index, detector in active:
            if detector.requirements.fit_labels and labels is None:
                raise ValueError(
                    f"detector {detector.name!r} fits on class labels, but the batches carry "
                    "none: pass (images, labels) batches of in-distribution training data"
                )
            start = time.perf_counter()
            detector.update_fit(outputs, labels)
            times.detector_seconds[index] += time.perf_counter() - start

    stats = run_pass(tap, data, needs, consume, store=store, at_least_once=True, desc=description,
                     progress=progress)
    times.forward_seconds += stats.forward_seconds
    if stats.total_images == 0:
        raise ValueError(f"fit received no batches: the in-distribution data for {names} is empty")


def fit_held_out(
    tap: Tap, detectors: Sequence[Detector], id_data: Iterable, ood_data: Iterable | None = None, *,
    progress: bool | None = None, store: BoundStore | None = None,
) -> list[Detector]:
    """Run the held-out step of every detector that declares one (``Requirements.held_out``).

    Gram's normalisers read held-out in-distribution data; the multi-layer
    Mahalanobis weights read held-out in-distribution and OOD data. Each set is
    one pass through the driver serving every detector at once; detectors
    without a held-out step are left as they are.

    Args:
        tap: the tap of the model the detectors belong to.
        detectors: fitted detectors.
        id_data: held-out in-distribution batches (not the fit data).
        ood_data: held-out OOD batches, for detectors whose step reads them.
        progress: show progress bars (default: on a terminal).
        store: a feature store bound to the model.

    Returns:
        The detectors whose held-out step ran.

    Raises:
        ValueError: a detector needs OOD data and ``ood_data`` is None; a set is empty.
        NotFittedError: a detector is not fitted.
    """
    stepping = [d for d in detectors if d.requirements.held_out]
    for detector in stepping:
        detector.check_fitted()
    needing_ood = [d.name for d in stepping if d.requirements.held_out == "id+ood"]
    if needing_ood and ood_data is None:
        raise ValueError(
            f"the held-out step of {', '.join(needing_ood)} reads held-out OOD data too: pass ood_data "
            "(held-out OOD or adversarial batches, not evaluation images)"
        )
    for detector in stepping:
        detector.reset_held_out()
    sets = [(id_data, False, stepping)]
    if needing_ood and ood_data is not None:  # refused above when None
        sets.append((ood_data, True, [d for d in stepping if d.requirements.held_out == "id+ood"]))
    for data, is_ood, readers in sets:
        if not readers:
            continue
        needs = frozenset().union(*(d.requirements.outputs for d in readers))
        gradients = any(d.requirements.input_gradients for d in readers)

        def consume(outputs: Outputs, labels: torch.Tensor | None, readers=readers, is_ood=is_ood) -> None:
            for detector in readers:
                detector.update_held_out(outputs, is_ood)

        what = "OOD" if is_ood else "in-distribution"
        stats = run_pass(tap, data, needs, consume, gradients=gradients, modules=readers, store=store,
                         desc=f"held-out {what} ({', '.join(d.name for d in readers)})", progress=progress)
        if stats.total_images == 0:
            raise ValueError(f"the held-out {what} data is empty")
    for detector in stepping:
        detector.finish_held_out()
    return stepping
