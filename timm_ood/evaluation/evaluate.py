"""``evaluate``: the seeds' tables for any timm model, from one call.

::

    results = timm_ood.evaluate(model, detectors=["msp", "odin", "energy", "mahalanobis"],
                                benchmark="fashion-mnist")
    print(results.table())
    results.save("report/")

Detectors that need fitting fit together in one pass over the in-distribution
training data; then one forward per batch serves every detector on the ID
test set and on each OOD set (the tuning holdouts are never evaluated).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._runtime import eval_mode, model_device, model_dtype
from ..detectors import create_detector, list_detectors
from ..detectors.base import Detector
from ..errors import IncompatibleModelError
from ..fitting import fit_detectors, fit_held_out
from ..model import OODModel
from ..model_info import data_config
from ..scoring import detector_labels, score_sets
from ..store import FeatureStore, as_store
from ..tap import Tap
from .results import EvaluationResults, metrics_per_set

__all__ = ["ALL", "DEFAULT_DETECTORS", "DetectorSpec", "all_detectors", "evaluate", "evaluate_loaders", "make_detectors"]

#: what ``evaluate`` and ``timm-ood demo`` run when not told otherwise
DEFAULT_DETECTORS: tuple[str, ...] = ("msp", "temperature", "odin", "energy", "maxlogit", "entropy", "mahalanobis")
ID_SET = "id"

DetectorSpec = str | Detector | tuple[str, Mapping[str, Any]]
#: ``detectors="all"``: every post-hoc detector the model can serve
ALL = "all"
#: detectors that need a model made for them (dropout at test time, an ensemble): not in ``"all"``
NOT_POST_HOC = frozenset({"mc-dropout", "deep-ensemble"})


def make_detectors(
    detectors: Sequence[DetectorSpec] | Mapping[str, Mapping[str, Any]] | str, tap: Tap | None = None
) -> list[Detector]:
    """Detector instances from names, instances, ``(name, hyperparameters)`` pairs or a name -> hyperparameters mapping.

    ``"all"`` is every registered post-hoc detector that the model of ``tap`` can serve (:func:`all_detectors`).
    """
    if detectors == ALL:
        if tap is None:
            raise ValueError("detectors='all' needs the model: make_detectors('all', Tap(model))")
        return all_detectors(tap)
    if isinstance(detectors, str):
        detectors = [detectors]
    if isinstance(detectors, Mapping):
        detectors = list(detectors.items())
    made = []
    for spec in detectors:
        if isinstance(spec, Detector):
            made.append(spec)
        elif isinstance(spec, str):
            made.append(create_detector(spec))
        elif isinstance(spec, tuple) and len(spec) == 2:
            made.append(create_detector(spec[0], **dict(spec[1])))
        else:
            raise TypeError(f"cannot make a detector from {spec!r}: give a name, a Detector or (name, hyperparameters)")
    if not made:
        raise ValueError("no detectors to evaluate")
    return made


def all_detectors(tap: Tap) -> list[Detector]:
    """Every registered detector, with its defaults, that serves this model without training it.

    Left out: detectors whose ``check_model`` refuses the model (no classifier,
    no intermediates, a head of a training method it lacks), detectors without
    a fit that refuse the model's outputs (RankFeat on a 1 x 1 final map: probed
    on two blank images of the model's input size), and those listed in
    :data:`NOT_POST_HOC`, which need a model built for them.
    """
    made = []
    for name in list_detectors():
        if name in NOT_POST_HOC:
            continue
        detector = create_detector(name)
        try:
            detector.check_model(tap)
        except IncompatibleModelError:
            continue
        made.append(detector)
    probed = [d for d in made if not d.requirements.fit and not d.requirements.input_gradients]
    if probed:
        shape = data_config(tap.model)["input_size"]
        blank = torch.zeros(2, *shape, device=model_device(tap.model), dtype=model_dtype(tap.model))
        with eval_mode(tap.model), torch.inference_mode():
            outputs = tap(blank, frozenset().union(*(d.requirements.outputs for d in probed)))
            for detector in probed:
                try:
                    detector.score(outputs)
                except IncompatibleModelError:
                    made.remove(detector)
    return made


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, OODModel) else model


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def evaluate_loaders(
    model: nn.Module,
    detectors: Sequence[DetectorSpec] | str = DEFAULT_DETECTORS,
    *,
    id_data: Iterable,
    ood_data: Mapping[str, Iterable],
    fit_data: Iterable | None = None,
    held_out_id_data: Iterable | None = None,
    held_out_ood_data: Iterable | None = None,
    tpr: float = 0.95,
    positive: str = "id",
    benchmark: str = "custom",
    progress: bool | None = None,
    settings: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | FeatureStore | None = None,
) -> EvaluationResults:
    """Evaluate detectors on your own loaders: ID test batches against named OOD sets.

    Args:
        model: a timm model (or an ``OODModel``, whose timm model is used).
        detectors: names, instances or ``(name, hyperparameters)`` pairs.
        id_data: in-distribution test batches ``(images, labels)``.
        ood_data: OOD test batches by set name.
        fit_data: in-distribution training batches, for detectors that fit.
        held_out_id_data, held_out_ood_data: held-out batches (never evaluation
            images) for the held-out steps detectors declare (``gram``'s
            normalisers, ``multi-mahalanobis``'s weights); without them those
            detectors keep the estimates of their fit.
        tpr: the TPR of FPR@TPR and of the detection error.
        positive: metric reading, ``"id"`` (the seeds') or ``"ood"`` (OpenOOD).
        benchmark: a name for the report.
        progress: tqdm bars (default: on a terminal).
        settings: extra settings to record in the results.
        cache_dir: a feature store (:mod:`timm_ood.store`): the model's outputs
            of loaders made by ``timm_ood.data.make_loader`` are read from it
            when stored (no forward), else computed and stored for later runs.

    Raises:
        ValueError: a detector needs fitting and ``fit_data`` is None; an empty set.
    """
    model = _unwrap(model)
    tap = Tap(model)
    instances = make_detectors(detectors, tap)
    labels = detector_labels(instances)
    for detector in instances:
        detector.check_model(tap)
    store = as_store(cache_dir)
    bound = None if store is None else store.bind(model)
    unfitted = [d.name for d in instances if d.requirements.fit and not d.is_fitted]
    fit_seconds = dict.fromkeys(labels, 0.0)
    fit_forward = 0.0
    if unfitted:
        if fit_data is None:
            raise ValueError(f"detectors {unfitted} need in-distribution training data: pass fit_data")
        to_fit = [d for d in instances if d.requirements.fit and not d.is_fitted]
        times = fit_detectors(tap, to_fit, fit_data, progress=progress, store=bound)
        fit_forward = times.forward_seconds
        for detector, seconds in zip(to_fit, times.detector_seconds, strict=True):
            fit_seconds[labels[instances.index(detector)]] = seconds
    if held_out_id_data is not None:
        fit_held_out(tap, instances, held_out_id_data, held_out_ood_data, progress=progress, store=bound)
    if ID_SET in ood_data:
        raise ValueError(f"an OOD set may not be called {ID_SET!r}")
    started = time.perf_counter()
    scored = score_sets(tap, instances, {ID_SET: id_data, **ood_data}, labels=labels, progress=progress,
                        store=bound)
    score_wall = time.perf_counter() - started
    accuracy = None
    if ID_SET in scored.predictions and ID_SET in scored.labels:
        accuracy = float((scored.predictions[ID_SET] == scored.labels[ID_SET]).double().mean())
    ood_sets = list(ood_data)
    metrics = {label: metrics_per_set(scored.scores[label], ID_SET, ood_sets, tpr=tpr, positive=positive)
               for label in labels}
    return EvaluationResults(
        benchmark=benchmark,
        model=_architecture(model),
        detectors=labels,
        ood_sets=ood_sets,
        metrics=metrics,
        accuracy=accuracy,
        fit_seconds=fit_seconds,
        score_seconds=scored.seconds,
        forward_seconds=scored.forward_seconds,
        settings={
            "tpr": tpr,
            "positive": positive,
            "id_set": ID_SET,
            "sizes": dict(scored.images),
            "hyperparameters": {label: d.hyperparameters() for label, d in zip(labels, instances, strict=True)},
            "fit_forward_seconds": fit_forward,
            "score_wall_seconds": score_wall,
            "cache_dir": None if store is None else str(store.root),
            **(settings or {}),
        },
        scored=scored,
    )


def evaluate(
    model: nn.Module,
    detectors: Sequence[DetectorSpec] | str = DEFAULT_DETECTORS,
    benchmark: Any = "fashion-mnist",
    *,
    ood_sets: Sequence[str] | None = None,
    batch_size: int = 256,
    tpr: float = 0.95,
    positive: str = "id",
    max_images: int | None = None,
    max_fit_images: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | FeatureStore | None = None,
) -> EvaluationResults:
    """Evaluate detectors on a benchmark: per detector x OOD set, the five metrics of ODIN's Table 2.

    Args:
        model: a timm model trained on the benchmark's in-distribution data (or an ``OODModel``).
        detectors: names, instances or ``(name, hyperparameters)`` pairs, or
            ``"all"``: every post-hoc detector the model can serve.
        benchmark: a registered benchmark name (``timm_ood.data.list_benchmarks()``)
            or a loaded ``timm_ood.data.Benchmark``.
        ood_sets: evaluate only these OOD sets (default all).
        batch_size: images per batch.
        tpr: the TPR of FPR@TPR and of the detection error.
        positive: ``"id"`` (the seeds' reading) or ``"ood"`` (OpenOOD / pytorch-ood).
        max_images: use at most this many images of each evaluation set (quick runs).
        max_fit_images: use at most this many ID training images for fitting.
        num_workers: DataLoader workers.
        progress: tqdm bars (default: on a terminal).
        cache_dir: a feature store directory (:mod:`timm_ood.store`): the model's
            outputs for each set are computed once and read by every later
            evaluation of the same model and data (``"~/.cache/timm-ood/outputs"``).

    Returns:
        :class:`~timm_ood.evaluation.results.EvaluationResults`: ``.table()``, ``.save(dir)``.
    """
    from ..data import load_benchmark, make_loader

    model = _unwrap(model)
    bench = load_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    names = list(bench.ood) if ood_sets is None else list(ood_sets)
    missing = [n for n in names if n not in bench.ood]
    if missing:
        raise ValueError(f"benchmark {bench.name!r} has no OOD sets {missing}; it has {', '.join(bench.ood)}")

    def limited(dataset, limit):
        return dataset if limit is None or len(dataset) <= limit else dataset.select(range(limit))

    def loader(dataset, name, limit=max_images):
        return make_loader(limited(dataset, limit), model, batch_size=batch_size, num_workers=num_workers, name=name)

    return evaluate_loaders(
        model,
        detectors,
        id_data=loader(bench.id_test, f"{bench.name}/id_test"),
        ood_data={name: loader(bench.ood[name], f"{bench.name}/{name}") for name in names},
        fit_data=loader(bench.id_train, f"{bench.name}/id_train", max_fit_images),
        tpr=tpr,
        positive=positive,
        benchmark=bench.name,
        progress=progress,
        settings={"batch_size": batch_size, "max_images": max_images, "max_fit_images": max_fit_images},
        cache_dir=cache_dir,
    )
