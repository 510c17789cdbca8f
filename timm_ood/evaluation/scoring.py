"""Scoring many detectors on many datasets, one shared forward per batch.

For every batch the tap computes the union of what the detectors read
(:class:`~timm_ood.detectors.base.Requirements`); each detector then scores
from those outputs, and detectors that need input gradients (ODIN) run their
own passes on the same batch. Time is measured per detector and for the
shared forward separately.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .._runtime import eval_mode, model_device, model_dtype
from ..batches import check_images, iter_batches
from ..detectors.base import Detector
from ..tap import Need, Tap

__all__ = ["ScoredSets", "detector_labels", "score_sets"]


def detector_labels(detectors: Sequence[Detector]) -> list[str]:
    """One unique label per detector: its name, plus the hyperparameters that tell apart detectors of one name."""
    by_name: dict[str, list[dict]] = {}
    for detector in detectors:
        by_name.setdefault(detector.name, []).append(detector.hyperparameters())
    labels = []
    for detector in detectors:
        siblings = by_name[detector.name]
        if len(siblings) == 1:
            labels.append(detector.name)
            continue
        values = detector.hyperparameters()
        differing = [k for k in values if any(other[k] != values[k] for other in siblings)]
        labels.append(f"{detector.name}({','.join(f'{k}={values[k]}' for k in differing)})")
    if len(set(labels)) != len(labels):
        raise ValueError(f"two detectors with the same name and hyperparameters: {labels}")
    return labels


@dataclass
class ScoredSets:
    """Scores of every detector on every dataset, with timings.

    Attributes:
        scores: ``scores[detector][dataset]`` float64 CPU tensors.
        labels: class labels per dataset (-1 for OOD sets).
        predictions: argmax of the logits per dataset, when the model has logits.
        seconds: scoring time per detector (its own passes included).
        forward_seconds: time of the shared forward passes.
        images: images scored per dataset.
    """

    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    forward_seconds: float = 0.0
    images: dict[str, int] = field(default_factory=dict)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_sets(
    tap: Tap,
    detectors: Sequence[Detector],
    datasets: Mapping[str, Iterable],
    *,
    labels: Sequence[str] | None = None,
    with_predictions: bool = True,
    progress: bool | None = None,
) -> ScoredSets:
    """Score each dataset with every detector.

    Args:
        tap: the model's tap.
        detectors: fitted detectors.
        datasets: name -> DataLoader (or iterable of batches).
        labels: one label per detector (default :func:`detector_labels`).
        with_predictions: also keep the argmax of the logits (for ID accuracy).
        progress: tqdm bars (default: on a terminal).

    Raises:
        ValueError: a dataset yielded no images.
    """
    if not detectors:
        raise ValueError("score_sets needs at least one detector")
    labels = list(labels or detector_labels(detectors))
    for detector in detectors:
        detector.check_fitted()
    with_predictions = with_predictions and tap.head_info.has_logits
    needs = frozenset().union(*(d.requirements.outputs for d in detectors))
    if with_predictions:
        needs |= {Need.LOGITS}
    any_gradients = any(d.requirements.input_gradients for d in detectors)
    device, dtype = model_device(tap.model), model_dtype(tap.model)
    result = ScoredSets(seconds=dict.fromkeys(labels, 0.0))
    grad_mode = torch.no_grad if any_gradients else torch.inference_mode
    with eval_mode(tap.model, *detectors), grad_mode():
        for set_name, data in datasets.items():
            per_detector: dict[str, list[torch.Tensor]] = {label: [] for label in labels}
            set_labels, set_predictions = [], []
            total = len(data) if hasattr(data, "__len__") else None
            for images, batch_labels in tqdm(iter_batches(data), total=total, desc=f"score {set_name}",
                                             leave=False, disable=None if progress is None else not progress):
                images = check_images(images, tap).to(device=device, dtype=dtype)
                start = time.perf_counter()
                outputs = tap(images, needs)
                _synchronize(device)
                result.forward_seconds += time.perf_counter() - start
                for label, detector in zip(labels, detectors, strict=True):
                    start = time.perf_counter()
                    scores = detector(outputs)
                    per_detector[label].append(scores.detach().to("cpu", torch.float64))
                    result.seconds[label] += time.perf_counter() - start
                if batch_labels is not None:
                    set_labels.append(batch_labels.cpu())
                if with_predictions:
                    set_predictions.append(outputs.logits.argmax(dim=1).cpu())
            if not per_detector[labels[0]]:
                raise ValueError(f"dataset {set_name!r} yielded no images: there is nothing to score")
            for label in labels:
                result.scores.setdefault(label, {})[set_name] = torch.cat(per_detector[label])
            result.images[set_name] = len(result.scores[labels[0]][set_name])
            if set_labels:
                result.labels[set_name] = torch.cat(set_labels)
            if set_predictions:
                result.predictions[set_name] = torch.cat(set_predictions)
    return result
