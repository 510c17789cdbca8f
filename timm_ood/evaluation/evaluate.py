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
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._runtime import eval_mode, model_device, model_dtype
from ..detectors import create_detector, list_detectors
from ..detectors.base import Detector
from ..distributed import is_main_process
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
#: the benchmark ``evaluate`` runs when given neither a benchmark nor data: the offline default
DEFAULT_BENCHMARK = "fashion-mnist"
#: score-set name prefix of full-spectrum covariate-shifted ID sets
COVARIATE_SHIFTED_PREFIX = "id-shifted/"

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


def _top1(scored: Any, set_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The labelled images' (correct, confidence) of a set (labels >= 0); None without logits or labels."""
    if set_name not in scored.predictions or set_name not in scored.labels:
        return None
    labelled = scored.labels[set_name] >= 0
    if not bool(labelled.any()):
        return None
    correct = scored.predictions[set_name][labelled] == scored.labels[set_name][labelled]
    return correct, scored.confidences[set_name][labelled]


def _accuracy(scored: Any, set_name: str) -> float | None:
    """Top-1 accuracy on the labelled images of a set; None without logits or labels."""
    top1 = _top1(scored, set_name)
    return None if top1 is None else float(top1[0].double().mean())


def _calibration_error(scored: Any, set_name: str) -> float | None:
    """Top-1 ECE on the labelled images of a set (Lee et al.'s calibration claim); None without logits or labels."""
    from ..metrics import expected_calibration_error

    top1 = _top1(scored, set_name)
    return None if top1 is None else float(expected_calibration_error(top1[1], top1[0]))


#: ID accuracy at or below this many times chance (1 / the ID test set's class count) draws a warning
_NEAR_CHANCE_FACTOR = 2.0


def _near_chance_warning(accuracy: float | None, labels: torch.Tensor | None, num_classes: int = 0) -> str | None:
    """The warning for an ID accuracy near chance, or None.

    Chance is ``1 / K`` for the ``K`` distinct labels of the labelled ID test
    images (what always answering one class scores on a balanced set). The
    rule: warn when ``accuracy <= min(_NEAR_CHANCE_FACTOR * chance, (1 + chance) / 2)``,
    i.e. at most twice chance, and never above halfway from chance to 100%
    (two classes: 75%). No warning without an accuracy or with fewer than two
    classes. Detectors read the classifier's confidence, so the OOD metrics of
    such a model say little.

    Args:
        accuracy: the top-1 accuracy on the ID test set.
        labels: the ID test set's labels (-1: unlabelled, ignored).
        num_classes: the model's class count (0: unknown); a label beyond it is named.
    """
    if accuracy is None or labels is None:
        return None
    labelled = labels[labels >= 0]
    classes = int(labelled.unique().numel())
    if classes < 2:
        return None
    chance = 1 / classes
    if accuracy > min(_NEAR_CHANCE_FACTOR * chance, (1 + chance) / 2):
        return None
    beyond = num_classes > 0 and int(labelled.max()) >= num_classes
    cause = (f"the ID labels go up to {int(labelled.max())} but the model has {num_classes} classes: the labels are "
             "not the model's classes" if beyond else
             "the model is untrained or not the checkpoint trained on this data, or the ID labels are not the "
             "model's classes")
    return (f"ID accuracy is {100 * accuracy:.1f}%, near chance ({100 * chance:.1f}% for {classes} classes): {cause}; "
            "the OOD metrics of such a model say little")


def _class_names(data: Any) -> list[str] | None:
    """The class names of a dataset whose ``label`` column is a ``ClassLabel`` (an image folder's subfolders)."""
    from datasets import ClassLabel, Dataset

    if isinstance(data, Dataset) and isinstance(data.features.get("label"), ClassLabel):
        return list(data.features["label"].names)
    return None


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
    covariate_shifted_data: Mapping[str, Iterable] | None = None,
    ood_groups: Mapping[str, Sequence[str]] | None = None,
    tpr: float = 0.95,
    positive: str = "id",
    benchmark: str = "custom",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool | None = None,
    settings: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | FeatureStore | None = None,
) -> EvaluationResults:
    """Evaluate detectors on your own data: ID test images against named OOD sets.

    Every data argument is a Hugging Face dataset with ``image`` and ``label``
    columns (prepared with the model's own data config by
    :func:`timm_ood.data.make_loader`, ``batch_size`` images at a time), a
    DataLoader, or any iterable of ``(images, labels)`` batches.

    Args:
        model: a timm model (or an ``OODModel``, whose timm model is used).
        detectors: names, instances or ``(name, hyperparameters)`` pairs.
        id_data: in-distribution test data; labels -1 (unlabelled) give no accuracy.
        ood_data: OOD test data by set name.
        fit_data: in-distribution training data, for detectors that fit.
        held_out_id_data: held-out in-distribution data (never evaluation
            images) for the held-out steps detectors declare (``gram``'s
            normalisers, ``multi-mahalanobis``'s weights); without it those
            detectors keep the estimates of their fit.
        held_out_ood_data: held-out OOD data, for the held-out steps that read it
            (``multi-mahalanobis``).
        covariate_shifted_data: full-spectrum OOD detection (OpenOOD v1.5's
            FSOOD): covariate-shifted in-distribution sets by name (ImageNet-V2,
            -R, ...), counted as in-distribution together with ``id_data``; each
            one's accuracy is reported.
        ood_groups: OOD sets grouped for averages, e.g. ``{"near": [...], "far": [...]}``.
        tpr: the TPR of FPR@TPR and of the detection error.
        positive: metric reading, ``"id"`` (the seeds') or ``"ood"`` (OpenOOD).
        benchmark: a name for the report.
        batch_size: images per batch, for data given as datasets.
        num_workers: DataLoader workers, for data given as datasets.
        progress: tqdm bars (default: on a terminal).
        settings: extra settings to record in the results.
        cache_dir: a feature store (:mod:`timm_ood.store`): the model's outputs
            of loaders made by ``timm_ood.data.make_loader`` are read from it
            when stored (no forward), else computed and stored for later runs.

    Raises:
        ValueError: a detector needs fitting and ``fit_data`` is None; an empty set;
            a group names a set that is not evaluated.

    Warns:
        UserWarning: the ID accuracy is near chance, at most twice ``1 / K`` for
            the ``K`` classes of the labelled ID test images (and at most halfway
            from chance to 100%): an untrained model, a wrong checkpoint, or ID
            labels that are not the model's classes.
    """
    from ..data import as_batches

    model = _unwrap(model)
    tap = Tap(model)

    def batches(data: Any, name: str) -> Any:
        return None if data is None else as_batches(data, model, batch_size=batch_size, num_workers=num_workers,
                                                    name=f"{benchmark}/{name}")

    id_data = batches(id_data, "id_test")
    ood_data = {name: batches(data, name) for name, data in ood_data.items()}
    fit_data, held_out_id_data = batches(fit_data, "id_train"), batches(held_out_id_data, "held_out_id")
    held_out_ood_data = batches(held_out_ood_data, "held_out_ood")
    shifted = {f"{COVARIATE_SHIFTED_PREFIX}{name}": batches(data, name)
               for name, data in (covariate_shifted_data or {}).items()}
    groups = {group: list(names) for group, names in (ood_groups or {}).items()}
    for group, names in groups.items():
        unknown = [name for name in names if name not in ood_data]
        if unknown:
            raise ValueError(f"OOD group {group!r} names sets that are not evaluated: {unknown}; "
                             f"the OOD sets are {', '.join(ood_data)}")
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
    scored = score_sets(tap, instances, {ID_SET: id_data, **shifted, **ood_data}, labels=labels,
                        progress=progress, store=bound)
    score_wall = time.perf_counter() - started
    accuracy = _accuracy(scored, ID_SET)
    near_chance = _near_chance_warning(accuracy, scored.labels.get(ID_SET), tap.head_info.num_classes)
    if near_chance is not None and is_main_process():
        warnings.warn(near_chance, UserWarning, stacklevel=2)
    ood_sets = list(ood_data)
    metrics = {}
    for label in labels:
        per_set = dict(scored.scores[label])
        # full spectrum: the covariate-shifted sets are in-distribution too
        per_set[ID_SET] = torch.cat([per_set[ID_SET], *(per_set[name] for name in shifted)])
        metrics[label] = metrics_per_set(per_set, ID_SET, ood_sets, tpr=tpr, positive=positive)
    extra_settings: dict[str, Any] = {}
    if groups:
        extra_settings["ood_groups"] = groups
    if shifted:
        extra_settings["covariate_shifted_sets"] = list(shifted)
        extra_settings["full_spectrum_accuracy"] = {
            name[len(COVARIATE_SHIFTED_PREFIX):]: _accuracy(scored, name) for name in shifted}
    return EvaluationResults(
        benchmark=benchmark,
        model=_architecture(model),
        detectors=labels,
        ood_sets=ood_sets,
        metrics=metrics,
        accuracy=accuracy,
        calibration_error=_calibration_error(scored, ID_SET),
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
            **extra_settings,
            **(settings or {}),
        },
        scored=scored,
    )


def evaluate(
    model: nn.Module,
    detectors: Sequence[DetectorSpec] | str = DEFAULT_DETECTORS,
    benchmark: Any = None,
    *,
    id_data: Any = None,
    ood_data: Mapping[str, Any] | None = None,
    fit_data: Any = None,
    ood_sets: Sequence[str] | None = None,
    full_spectrum: bool = False,
    batch_size: int = 256,
    tpr: float = 0.95,
    positive: str = "id",
    max_images: int | None = None,
    max_fit_images: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | FeatureStore | None = None,
) -> EvaluationResults:
    """Evaluate detectors on a benchmark or on your own data: per detector x OOD set, ODIN's Table 2 metrics.

    ::

        timm_ood.evaluate(model, ["msp", "energy"], "openood-imagenet1k")
        timm_ood.evaluate(model, ["msp", "knn"], id_data=val_ds, ood_data={"textures": dtd_ds}, fit_data=train_ds)

    Args:
        model: a timm model trained on the in-distribution data (or an ``OODModel``).
        detectors: names, instances or ``(name, hyperparameters)`` pairs, or
            ``"all"``: every post-hoc detector the model can serve.
        benchmark: a registered benchmark name (``timm_ood.data.list_benchmarks()``)
            or a loaded ``timm_ood.data.Benchmark``; default ``"fashion-mnist"``
            unless ``id_data`` is given.
        id_data, ood_data, fit_data: your own data instead of a benchmark: the
            in-distribution test set, the OOD sets by name and (for detectors that
            fit) the in-distribution training set, each a Hugging Face dataset
            (``image`` and ``label`` columns, converted with the model's data config),
            a DataLoader or an iterable of ``(images, labels)`` batches.
        ood_sets: evaluate only these OOD sets of the benchmark (default all).
        full_spectrum: also count the benchmark's covariate-shifted ID sets
            (OpenOOD v1.5's full-spectrum setting) as in-distribution, and report
            the accuracy on each.
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

    Raises:
        ValueError: both a benchmark and your own data, or ``id_data`` without ``ood_data``.
    """
    from datasets import Dataset

    from ..data import load_benchmark
    from ..data.images import relabel_as_ood

    model = _unwrap(model)

    def limited(dataset: Any, limit: int | None) -> Any:
        if limit is None or not isinstance(dataset, Dataset) or len(dataset) <= limit:
            return dataset
        return dataset.select(range(limit))

    common: dict[str, Any] = {"tpr": tpr, "positive": positive, "batch_size": batch_size, "num_workers": num_workers,
              "progress": progress, "cache_dir": cache_dir}
    limits = {"batch_size": batch_size, "max_images": max_images, "max_fit_images": max_fit_images}
    if id_data is not None or ood_data is not None:
        if benchmark is not None:
            raise ValueError("give a benchmark or your own data (id_data=, ood_data=), not both")
        if id_data is None or not ood_data:
            raise ValueError("your own data needs both id_data= (in-distribution test data) and ood_data= "
                             "({name: OOD data})")
        if ood_sets is not None or full_spectrum:
            raise ValueError("ood_sets= and full_spectrum= choose among a benchmark's sets; with your own data, "
                             "pass only the sets to evaluate")
        notes = []
        classes = _class_names(id_data)
        if classes is not None and len(classes) != Tap(model).head_info.num_classes:
            # the folder's classes are not the model's: top-1 accuracy would compare unrelated indices
            id_data = relabel_as_ood(id_data)  # label -1 throughout: "no class of the model's"
            notes.append(f"No ID accuracy: the ID test set has {len(classes)} classes and the model "
                         f"{Tap(model).head_info.num_classes}, so its labels are not the model's classes.")
        results = evaluate_loaders(
            model, detectors, id_data=limited(id_data, max_images),
            ood_data={name: limited(data, max_images) for name, data in ood_data.items()},
            fit_data=limited(fit_data, max_fit_images), benchmark="custom", settings=limits, **common)
        results.notes.extend(notes)
        return results

    bench = load_benchmark(benchmark or DEFAULT_BENCHMARK, full_spectrum=full_spectrum) if (
        benchmark is None or isinstance(benchmark, str)) else benchmark
    names = list(bench.ood) if ood_sets is None else list(ood_sets)
    missing = [n for n in names if n not in bench.ood]
    if missing:
        raise ValueError(f"benchmark {bench.name!r} has no OOD sets {missing}; it has {', '.join(bench.ood)}")
    shifted = dict(bench.full_spectrum) if full_spectrum else {}
    if full_spectrum and not shifted:
        raise ValueError(f"benchmark {bench.name!r} has no covariate-shifted ID sets for full_spectrum=True; "
                         "OpenOOD's openood-imagenet1k has")
    groups = {group: [n for n in members if n in names] for group, members in bench.groups.items()}
    return evaluate_loaders(
        model,
        detectors,
        id_data=limited(bench.id_test, max_images),
        ood_data={name: limited(bench.ood[name], max_images) for name in names},
        fit_data=limited(bench.id_train, max_fit_images),
        covariate_shifted_data={name: limited(data, max_images) for name, data in shifted.items()},
        ood_groups={group: members for group, members in groups.items() if members},
        benchmark=bench.name,
        settings={**limits, "full_spectrum": full_spectrum},
        **common,
    )
