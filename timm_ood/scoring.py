"""Scoring many detectors on many datasets, one shared forward per batch (through :mod:`timm_ood.passes`).

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

from .detectors.base import Detector
from .distributed import all_gather_rows, world
from .passes import run_pass
from .store import BoundStore
from .tap import Need, Outputs, Tap

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
        confidences: the softmax probability of that prediction (float64), for calibration.
        seconds: scoring time per detector (its own passes included).
        forward_seconds: time of the shared forward passes.
        images: images scored per dataset.
    """

    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    confidences: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    forward_seconds: float = 0.0
    images: dict[str, int] = field(default_factory=dict)


def score_sets(
    tap: Tap,
    detectors: Sequence[Detector],
    datasets: Mapping[str, Iterable],
    *,
    labels: Sequence[str] | None = None,
    with_predictions: bool = True,
    progress: bool | None = None,
    store: BoundStore | None = None,
    desc: str = "score",
) -> ScoredSets:
    """Score each dataset with every detector, one pass of the driver per dataset.

    Detectors read the outputs of one shared forward per batch. With a feature
    store, those outputs are read from it when stored (no forward at all), and
    detectors that take input gradients (ODIN) run their own pass over the
    images. Under torch.distributed every rank scores its part of each dataset
    and then holds the scores, labels and predictions of all ranks (in rank
    order), so metrics equal those of one process.

    Args:
        tap: the model's tap.
        detectors: fitted detectors.
        datasets: name -> DataLoader (or iterable of batches).
        labels: one label per detector (default :func:`detector_labels`).
        with_predictions: also keep the argmax of the logits (for ID accuracy).
        progress: tqdm bars (default: on a terminal).
        store: a feature store bound to the model (:mod:`timm_ood.store`).
        desc: the progress bars' label (followed by the dataset's name).

    Raises:
        ValueError: a dataset yielded no images.
    """
    if not detectors:
        raise ValueError("score_sets needs at least one detector")
    labels = list(labels or detector_labels(detectors))
    for detector in detectors:
        detector.check_fitted()
    with_predictions = with_predictions and tap.head_info.has_logits
    by_label = dict(zip(labels, detectors, strict=True))
    # with a store, detectors that read the images run their own pass; the others read stored outputs
    separate = store is not None and any(d.requirements.input_gradients for d in detectors)
    groups = [[lb for lb in labels if not by_label[lb].requirements.input_gradients],
              [lb for lb in labels if by_label[lb].requirements.input_gradients]] if separate else [labels]
    result = ScoredSets(seconds=dict.fromkeys(labels, 0.0))
    for set_name, data in datasets.items():
        per_detector: dict[str, list[torch.Tensor]] = {label: [] for label in labels}
        set_labels: list[torch.Tensor] = []
        set_predictions: list[torch.Tensor] = []
        set_confidences: list[torch.Tensor] = []
        for index, group in enumerate(g for g in groups if g):
            members = [by_label[label] for label in group]
            needs = frozenset().union(*(d.requirements.outputs for d in members))
            first = index == 0
            if first and with_predictions:
                needs |= {Need.LOGITS}

            def consume(outputs: Outputs, batch_labels: torch.Tensor | None, group=group, first=first,
                        per_detector=per_detector, set_labels=set_labels, set_predictions=set_predictions,
                        set_confidences=set_confidences) -> None:
                for label in group:
                    start = time.perf_counter()
                    scores = by_label[label](outputs)
                    per_detector[label].append(scores.detach().to("cpu", torch.float64))
                    result.seconds[label] += time.perf_counter() - start
                if not first:
                    return
                if batch_labels is not None:
                    set_labels.append(batch_labels.cpu())
                if with_predictions:
                    top = torch.log_softmax(outputs.logits.detach().double(), dim=1).max(dim=1)
                    set_predictions.append(top.indices.cpu())
                    set_confidences.append(top.values.exp().cpu())

            gradients = any(d.requirements.input_gradients for d in members)
            stats = run_pass(tap, data, needs, consume, gradients=gradients, modules=members,
                             store=None if gradients else store,
                             lockstep=any(d.requirements.collective_scores for d in members),
                             desc=f"{desc} {set_name}", progress=progress)
            result.forward_seconds += stats.forward_seconds
            if stats.total_images == 0:
                raise ValueError(f"dataset {set_name!r} yielded no images: there is nothing to score")
        for label in labels:
            result.scores.setdefault(label, {})[set_name] = _gathered(per_detector[label], torch.float64)
        result.images[set_name] = len(result.scores[labels[0]][set_name])
        if set_labels or world()[1] > 1:
            gathered = _gathered(set_labels, torch.long)
            if len(gathered) == result.images[set_name]:
                result.labels[set_name] = gathered
        if with_predictions:
            result.predictions[set_name] = _gathered(set_predictions, torch.long)
            result.confidences[set_name] = _gathered(set_confidences, torch.float64)
    return result


def _gathered(chunks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """This rank's chunks concatenated, then every rank's in rank order (under torch.distributed)."""
    local = torch.cat(chunks) if chunks else torch.zeros(0, dtype=dtype)
    return all_gather_rows(local.to(dtype))
