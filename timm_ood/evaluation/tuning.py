"""Hyperparameter tuning on held-out data, as ODIN does it (``methods/odin.md`` Sec. 2).

ODIN's protocol: T in {1, 2, 5, ..., 1000}, 21 epsilons from 0 to 0.004, the
pair minimising FPR@95TPR on 1,000 held-out images of the OOD set and 1,000
held-out ID test images, which are excluded from the evaluation. Two protocols:

- ``"per-set"``: tune on each OOD set's holdout, once per set (the paper's);
- ``"cross-set"``: tune on one set's holdout and test on every other set's
  evaluation images (the paper's Appendix H, Tables 10-11).

A detector that can score a whole grid faster than one detector per point
says so (:meth:`~timm_ood.detectors.base.Detector.fast_grid`): ODIN's
(T, ε) grid costs one forward with autograd, one backward per T and one
forward per (T, ε > 0) per batch, not a full ODIN pass per grid point
(:func:`~timm_ood.detectors.odin.odin_grid_scores`).

Any other grid is tried point by point over the detector's declared
``search_space`` by :func:`grid_search`, which reuses one forward of the tuning
images for every grid point and refits only when a hyperparameter that changes
the fit changes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._runtime import eval_mode
from ..detectors import create_detector, get_detector_class
from ..detectors.base import Detector, FastGrid
from ..distributed import all_gather_rows
from ..fitting import fit_detectors
from ..metrics import auroc, detection_error, fpr_at_tpr
from ..model import OODModel
from ..passes import run_pass
from ..scoring import score_sets
from ..tap import Outputs, Tap
from .results import markdown_table

__all__ = ["TuningResult", "grid_search", "tune"]

#: what tuning minimises on the holdouts: FPR at the TPR (ODIN's), Lee et al.'s detection error (the minimum
#: over all thresholds of 0.5 (1 - TPR) + 0.5 FPR), the same error read at the TPR threshold (which ranks
#: hyperparameters as FPR@TPR does), or 1 - AUROC
CRITERIA = ("fpr_at_tpr", "detection_error", "detection_error_at_tpr", "auroc")


def _grid(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    names = list(space)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(space[n] for n in names))]


def _criterion(scores_id: torch.Tensor, scores_ood: torch.Tensor, criterion: str, tpr: float) -> float:
    is_ood = torch.cat([torch.zeros(len(scores_id)), torch.ones(len(scores_ood))])
    scores = torch.cat([scores_id, scores_ood])
    if criterion == "fpr_at_tpr":
        return float(fpr_at_tpr(scores, is_ood, tpr=tpr))
    if criterion == "detection_error":  # Lee et al. (ICLR 2018, Sec. 4): the minimum over all thresholds
        return float(detection_error(scores, is_ood, at="min"))
    if criterion == "detection_error_at_tpr":  # ODIN's Pe, read at the TPR threshold t*
        return float(detection_error(scores, is_ood, at="tpr", tpr=tpr))
    return 1.0 - float(auroc(scores, is_ood))


@dataclass
class TuningResult:
    """What tuning chose and why.

    Attributes:
        detector: the detector's registered name.
        grid: every hyperparameter combination tried, in order.
        criterion: minimised on the tuning holdouts (``fpr_at_tpr`` by default;
            ``auroc`` is minimised as 1 - AUROC).
        values: ``values[ood_set][i]`` = criterion of ``grid[i]`` on that set's holdout.
        best: per-set protocol: the best combination for each OOD set.
        best_average: the combination with the lowest criterion averaged over sets.
        cross: cross-set protocol: ``cross[tuned_on][tested_on]`` = the criterion
            on the evaluation images of ``tested_on`` with ``best[tuned_on]``.
        seconds: wall time of the grid.
    """

    detector: str
    grid: list[dict[str, Any]]
    criterion: str
    values: dict[str, list[float]]
    best: dict[str, dict[str, Any]] = field(default_factory=dict)
    best_average: dict[str, Any] = field(default_factory=dict)
    cross: dict[str, dict[str, float]] | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.best:
            self.best = {s: self.grid[min(range(len(v)), key=v.__getitem__)] for s, v in self.values.items()}
        if not self.best_average:
            average = [sum(v[i] for v in self.values.values()) / len(self.values) for i in range(len(self.grid))]
            self.best_average = self.grid[min(range(len(average)), key=average.__getitem__)]

    def best_value(self, ood_set: str) -> float:
        """The criterion at the best combination for ``ood_set``."""
        return min(self.values[ood_set])

    def make_detector(self, ood_set: str | None = None) -> Detector:
        """The detector with the hyperparameters chosen for ``ood_set`` (default: the best on average)."""
        settings = self.best_average if ood_set is None else self.best[ood_set]
        return create_detector(self.detector, **settings)

    def table(self) -> str:
        """Chosen hyperparameters and the criterion on each tuning holdout, as markdown."""
        names = list(self.grid[0])
        rows = [[s, *(self.best[s][n] for n in names), f"{100 * self.best_value(s):.2f}"] for s in self.values]
        text = markdown_table(["tuned on", *names, f"{self.criterion} (holdout, %)"], rows)
        if self.cross:
            tested = list(next(iter(self.cross.values())))
            cross_rows = [[t, *(f"{100 * self.cross[t][s]:.2f}" for s in tested)] for t in self.cross]
            text += "\n\nCross-set (rows tuned on, columns tested on, evaluation images):\n\n"
            text += markdown_table(["tuned on \\ tested on", *tested], cross_rows)
        return text


#: the key of the held-out in-distribution set among the tuning sets (never an OOD set's name)
_ID_KEY = "__id__"


def _shown(name: str) -> str:
    """A tuning set's name as progress bars show it: ``held-out ID`` for the in-distribution set."""
    return "held-out ID" if name == _ID_KEY else f"held-out {name}"


def _fast_grid_values(
    tap: Tap, sets: Mapping[str, Iterable], fast: FastGrid, progress: bool | None
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Every grid point's scores of each set from the detector's own grid scorer: one pass per set."""
    scores = {}
    for name, data in sets.items():
        chunks: list[torch.Tensor] = []

        def consume(outputs: Outputs, labels: torch.Tensor | None, chunks=chunks) -> None:
            chunks.append(fast.scores(outputs).cpu())

        run_pass(tap, data, fast.needs, consume, gradients=fast.gradients, desc=f"{fast.label} on {_shown(name)}",
                 progress=progress)
        local = torch.cat(chunks, dim=1) if chunks else torch.zeros(len(fast.grid), 0, dtype=torch.float64)
        scores[name] = all_gather_rows(local.T).T  # [grid, N] of every rank
    return fast.grid, scores


def _generic_values(
    tap: Tap, detector_name: str, sets: Mapping[str, Iterable], space: Mapping[str, Sequence[Any]],
    fit_data: Iterable | None, fixed: Mapping[str, Any], progress: bool | None,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    cls = get_detector_class(detector_name)
    fit_names = [n for n in space if n in cls.fit_hyperparameters]
    # combinations that share their fit hyperparameters are adjacent: one fit serves them all
    grid = sorted(_grid(space), key=lambda combo: [str(combo[n]) for n in fit_names])
    detector = create_detector(detector_name, **{**fixed, **grid[0]})
    detector.check_model(tap)
    needs = detector.requirements.outputs
    cached: dict[str, list[Outputs]] | None = None
    if not detector.requirements.input_gradients and not detector.requirements.collective_scores:
        # one forward of the tuning images serves every grid point
        cached = {name: [] for name in sets}
        for name, data in sets.items():
            def keep(outputs: Outputs, labels: torch.Tensor | None, kept: list[Outputs] = cached[name]) -> None:
                kept.append(outputs)

            run_pass(tap, data, needs, keep, desc=f"model outputs on {_shown(name)}", progress=progress)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in sets}
    fitted_for: tuple | None = None
    for combo in tqdm(grid, desc=f"{detector_name} grid", leave=False,
                      disable=None if progress is None else not progress):
        detector.set_hyperparameters(**combo)
        fit_key = tuple(combo[n] for n in fit_names)
        if detector.requirements.fit and (fitted_for != fit_key or not detector.is_fitted):
            if fit_data is None:
                raise ValueError(f"{detector_name} needs fitting: pass fit data (the benchmark's ID training set)")
            fit_detectors(tap, [detector], fit_data, progress=progress)
            fitted_for = fit_key
        for name, data in sets.items():
            if cached is not None:
                with eval_mode(tap.model, detector), torch.inference_mode():
                    local = [detector(outputs).to("cpu", torch.float64) for outputs in cached[name]]
                local_scores = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64)
                scores[name].append(all_gather_rows(local_scores))
            else:
                shown = _shown(name)  # the bar reads "odin: score held-out ID"
                scored = score_sets(tap, [detector], {shown: data}, labels=["score"], with_predictions=False,
                                    progress=progress, desc=f"{detector_name}: score")
                scores[name].append(scored.scores["score"][shown])
    return grid, {name: torch.stack(per_combo) for name, per_combo in scores.items()}


def grid_search(
    model: nn.Module,
    detector: str,
    *,
    id_data: Iterable,
    ood_data: Mapping[str, Iterable],
    space: Mapping[str, Sequence[Any]] | None = None,
    fit_data: Iterable | None = None,
    criterion: str = "fpr_at_tpr",
    tpr: float = 0.95,
    fixed: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> TuningResult:
    """Try every combination of ``space`` on held-out data; pick the best per OOD set.

    Args:
        model: a timm model (or ``OODModel``).
        detector: a registered detector name.
        id_data: held-out in-distribution batches (never evaluation images).
        ood_data: held-out batches of each OOD set.
        space: candidate values per hyperparameter (default: the detector's
            declared ``search_space``; ODIN's is T x 21 epsilons). A detector
            whose ``fast_grid`` takes the space scores it in one pass per set.
        fit_data: in-distribution training batches for detectors that fit;
            refit only when a fit hyperparameter changes.
        criterion: ``"fpr_at_tpr"`` (ODIN's), ``"detection_error"`` (Lee et
            al.'s: the minimum over all thresholds of ``0.5 (1 - TPR) + 0.5 FPR``),
            ``"detection_error_at_tpr"`` (that error at the TPR threshold, which
            ranks the grid exactly as ``"fpr_at_tpr"`` does) or ``"auroc"``.
        tpr: the TPR of the criterion.
        fixed: hyperparameters held fixed.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    model = model.model if isinstance(model, OODModel) else model
    cls = get_detector_class(detector)
    space = dict(cls.search_space if space is None else space)
    if not space:
        raise ValueError(f"detector {detector!r} declares no search space; pass space={{name: values}}")
    tap = Tap(model)
    started = time.perf_counter()
    if _ID_KEY in ood_data:
        raise ValueError(f"an OOD set may not be called {_ID_KEY!r}")
    sets = {_ID_KEY: id_data, **ood_data}
    fast = cls.fast_grid(space, fixed or {})
    if fast is not None:
        grid, scores = _fast_grid_values(tap, sets, fast, progress)
    else:
        grid, scores = _generic_values(tap, detector, sets, space, fit_data, fixed or {}, progress)
    id_scores = scores.pop(_ID_KEY)
    values = {name: [_criterion(id_scores[i], ood[i], criterion, tpr) for i in range(len(grid))]
              for name, ood in scores.items()}
    return TuningResult(detector, grid, criterion, values, seconds=time.perf_counter() - started)


def tune(
    model: nn.Module,
    detector: str = "odin",
    benchmark: Any = "fashion-mnist",
    *,
    protocol: str = "per-set",
    space: Mapping[str, Sequence[Any]] | None = None,
    criterion: str = "fpr_at_tpr",
    tpr: float = 0.95,
    batch_size: int = 256,
    ood_sets: Sequence[str] | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> TuningResult:
    """Tune a detector on a benchmark's held-out tuning images (ODIN's protocol).

    Args:
        model: a timm model trained on the benchmark (or an ``OODModel``).
        detector: a registered detector name.
        benchmark: a registered benchmark name or a loaded ``Benchmark``.
        protocol: ``"per-set"`` (tune on each OOD set's holdout) or
            ``"cross-set"`` (also test each set's choice on every other set's
            evaluation images).
        space: the grid (default the detector's ``search_space``).
        criterion: what the holdout minimises, one of :data:`CRITERIA` (default
            FPR@95TPR, as ODIN; ``"detection_error"`` is Lee et al.'s minimum over thresholds).
        tpr: the TPR of the criterion.
        batch_size: images per batch.
        ood_sets: restrict to these OOD sets.
        max_images: use at most this many images per tuning / evaluation set (quick runs).
        num_workers: DataLoader workers.

    Returns:
        A :class:`TuningResult`; ``result.best[set]`` are the chosen hyperparameters.
    """
    from ..data import load_benchmark, make_loader

    if protocol not in ("per-set", "cross-set"):
        raise ValueError(f"unknown protocol {protocol!r}; choose 'per-set' or 'cross-set'")
    model = model.model if isinstance(model, OODModel) else model
    bench = load_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    names = list(bench.tuning.ood) if ood_sets is None else list(ood_sets)

    def loader(dataset, name):
        if max_images is not None and len(dataset) > max_images:
            dataset = dataset.select(range(max_images))
        return make_loader(dataset, model, batch_size=batch_size, num_workers=num_workers, name=name)

    fit_loader = None
    if get_detector_class(detector).requirements.fit:
        fit_loader = loader(bench.id_train, f"{bench.name}/id_train")
    result = grid_search(
        model, detector,
        id_data=loader(bench.tuning.id, f"{bench.name}/tuning-id"),
        ood_data={n: loader(bench.tuning.ood[n], f"{bench.name}/tuning-{n}") for n in names},
        space=space, fit_data=fit_loader, criterion=criterion, tpr=tpr, progress=progress,
    )
    if protocol == "cross-set":
        from .evaluate import evaluate_loaders

        started = time.perf_counter()
        settings = [tuple(sorted(result.best[n].items())) for n in names]
        distinct = list(dict.fromkeys(settings))  # sets that chose the same values share one evaluation
        evaluation = evaluate_loaders(
            model, [create_detector(detector, **dict(s)) for s in distinct],
            id_data=loader(bench.id_test, f"{bench.name}/id_test"),
            ood_data={n: loader(bench.ood[n], f"{bench.name}/{n}") for n in names},
            fit_data=fit_loader, tpr=tpr, progress=progress, benchmark=bench.name,
        )
        result.cross = {
            tuned_on: {tested_on: evaluation.metrics[evaluation.detectors[distinct.index(setting)]][tested_on][criterion]
                       for tested_on in names}
            for tuned_on, setting in zip(names, settings, strict=True)
        }
        result.seconds += time.perf_counter() - started
    return result

