"""Benchmarks: an in-distribution dataset, OOD test sets, and ODIN's tuning holdouts.

A :class:`BenchmarkSpec` names its sources; :func:`load_benchmark` loads them
and holds out, deterministically, the images that hyperparameter tuning may
see: 1,000 images of each OOD set and 1,000 ID test images (Liang et al. 2018,
Sec. 4.2), which are then excluded from the evaluation sets. Every benchmark,
built-in or from a plugin, is registered through the ``timm_ood_benchmarks``
hook (see :mod:`timm_ood.hookspecs`).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..registry import Kind, Registration
from .errors import DataNotFoundError
from .sources import get_source, load_source
from .sources import model_overlay as source_model_overlay

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "Benchmark",
    "BenchmarkSpec",
    "SourceRef",
    "TuningSets",
    "benchmark_registrations",
    "get_benchmark_spec",
    "list_benchmarks",
    "load_benchmark",
    "tuning_holdout_size",
]

@dataclass(frozen=True)
class SourceRef:
    """One split of one source, with the parameters it is loaded with."""

    source: str
    split: str = "test"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: which sources play which role.

    Attributes:
        name: the registered name.
        description: one line.
        id_train: the in-distribution training split.
        id_test: the in-distribution test split.
        ood: the OOD test sets by name.
        num_classes: classes of the in-distribution task.
        offline: True when every source needs no network.
        outliers: the auxiliary outlier set training-time methods (outlier
            exposure, energy loss, GReg) may train on; disjoint from ``ood``.
        tuning_size: images held out of each OOD set and of the ID test set for tuning.
        seed: seeds the choice of the held-out images.
        groups: named groups of OOD sets, each a tuple of keys of ``ood``
            (OpenOOD v1.5's ``{"near": (...), "far": (...)}``); reports average
            the metrics within each group. Empty: no groups.
        validation_id: an ID validation split to tune on (OpenOOD's
            ``val_<id>.txt``); when it loads, ``id_test`` is evaluated whole,
            with no holdout. None: ODIN's holdout of the ID test set.
        validation_ood: OOD validation sets to tune on, disjoint from the test
            sets (OpenOOD v1.5's ``val_tin.txt`` / ``val_openimage_o.txt``);
            when they load, every OOD test set is evaluated whole. Empty: ODIN's
            holdouts of each OOD test set.
        full_spectrum: covariate-shifted ID test sets (labels are the ID
            classes: ImageNet-V2, -C, -R, -ES for OpenOOD's full-spectrum
            benchmarks), loaded only when asked for.
    """

    name: str
    description: str
    id_train: SourceRef
    id_test: SourceRef
    ood: Mapping[str, SourceRef]
    num_classes: int
    offline: bool
    outliers: SourceRef | None = None
    tuning_size: int = 1000
    seed: int = 0
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    validation_id: SourceRef | None = None
    validation_ood: Mapping[str, SourceRef] = field(default_factory=dict)
    full_spectrum: Mapping[str, SourceRef] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for group, members in self.groups.items():
            unknown = [m for m in members if m not in self.ood]
            if unknown or not members:
                raise ValueError(
                    f"benchmark {self.name!r}: group {group!r} names {list(members)}; every member must be "
                    f"one of its OOD sets ({', '.join(self.ood)})"
                )


@dataclass(frozen=True)
class TuningSets:
    """The held-out images hyperparameters (ODIN's T and epsilon, Lee's beta) are tuned on."""

    id: Dataset
    ood: Mapping[str, Dataset]


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark. Evaluation sets exclude the tuning holdouts.

    Attributes:
        name: the benchmark's name.
        id_train: in-distribution training images, labels ``0..num_classes-1``.
        id_test: in-distribution test images for evaluation.
        ood: OOD evaluation sets by name, every label -1.
        tuning: the held-out ID and OOD images for tuning.
        num_classes: classes of the in-distribution task.
        spec: the definition it was loaded from.
        metadata: sizes, sources (split, parameters, provenance, licence) and the seed.
        groups: the spec's groups of OOD sets (``{"near": (...), "far": (...)}``).
        full_spectrum: covariate-shifted ID test sets by name, labels the ID
            classes; loaded only by ``load_benchmark(..., full_spectrum=True)``.
    """

    name: str
    id_train: Dataset
    id_test: Dataset
    ood: Mapping[str, Dataset]
    tuning: TuningSets
    num_classes: int
    spec: BenchmarkSpec
    metadata: Mapping[str, Any]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    full_spectrum: Mapping[str, Dataset] = field(default_factory=dict)

    def outliers(self, **params: Any) -> Dataset:
        """The auxiliary outlier set for training-time methods, loaded on request.

        Args:
            **params: override the source's parameters (e.g. ``size=10_000``).

        Raises:
            ValueError: the benchmark defines no outlier set.
        """
        ref = self.spec.outliers
        if ref is None:
            raise ValueError(f"benchmark {self.name!r} defines no auxiliary outlier set")
        return load_source(ref.source, ref.split, **{**ref.params, **params})

    def model_overlay(self) -> dict[str, Any]:
        """The timm ``pretrained_cfg_overlay`` for models trained on this benchmark's ID data."""
        return source_model_overlay(self.spec.id_train.source)


BENCHMARKS: Kind[BenchmarkSpec] = Kind.of_instances(
    "timm_ood_benchmarks", "benchmark", BenchmarkSpec, "timm_ood.data.BenchmarkSpec"
)


def benchmark_registrations() -> dict[str, Registration[BenchmarkSpec]]:
    """Every registered benchmark by name, with the plugin and distribution it came from."""
    return BENCHMARKS.registrations()


def list_benchmarks(pattern: str | None = None, *, offline: bool | None = None) -> dict[str, BenchmarkSpec]:
    """Registered benchmarks by name.

    Args:
        pattern: shell-style wildcard filter on names (``"cifar*"``).
        offline: keep only benchmarks that need no network (True) or the hub (False).
    """
    specs = BENCHMARKS.objects(pattern)
    return specs if offline is None else {name: s for name, s in specs.items() if s.offline == offline}


def get_benchmark_spec(name: str) -> BenchmarkSpec:
    """The benchmark registered under ``name``.

    Raises:
        UnknownNameError: no such benchmark (the message lists the known ones).
    """
    return BENCHMARKS.get(name)


def tuning_holdout_size(set_size: int, tuning_size: int) -> int:
    """How many images of a set are held out for tuning.

    ``tuning_size`` (ODIN's 1,000) when the set has at least twice as many
    images, so that most of it is still evaluated; a tenth of smaller sets
    (ODIN's 1,000 of 10,000).
    """
    return tuning_size if set_size >= 2 * tuning_size else set_size // 10


def _split_off_tuning(dataset: Dataset, tuning_size: int, seed: int, role: str) -> tuple[Dataset, Dataset]:
    held_out = tuning_holdout_size(len(dataset), tuning_size)
    rng = np.random.default_rng([seed, zlib.crc32(role.encode())])  # per role: adding a set moves no other
    order = rng.permutation(len(dataset))
    return dataset.select(np.sort(order[held_out:])), dataset.select(np.sort(order[:held_out]))


def _with_overrides(ref: SourceRef, source_params: Mapping[str, Mapping[str, Any]]) -> SourceRef:
    return SourceRef(ref.source, ref.split, {**ref.params, **source_params.get(ref.source, {})})


def _load_ref(ref: SourceRef, role: str) -> Dataset:
    from datasets import Dataset

    dataset = load_source(ref.source, ref.split, **ref.params)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"{role} (source {ref.source!r}) loaded as a stream; a benchmark needs indexable "
            "datasets to hold out tuning images. Drop streaming=True for it."
        )
    return dataset


def _describe(ref: SourceRef, dataset: Dataset) -> dict[str, Any]:
    spec = get_source(ref.source)
    return {
        "source": ref.source,
        "split": ref.split,
        "params": dict(ref.params),
        "size": len(dataset),
        "hub_id": spec.hub_id,
        "provenance": spec.provenance,
        "licence": spec.licence,
    }


def _load_validation(
    refs: Mapping[str, SourceRef], source_params: Mapping[str, Mapping[str, Any]], role: str, benchmark: str
) -> tuple[dict[str, Dataset], dict[str, Any]] | None:
    """Load declared validation sets; None (with a warning) when one has no local copy or hub route."""
    loaded, described = {}, {}
    for set_name, spec_ref in refs.items():
        ref = _with_overrides(spec_ref, source_params)
        try:
            loaded[set_name] = _load_ref(ref, f"{role} {set_name!r}")
        except DataNotFoundError as error:
            warnings.warn(
                f"benchmark {benchmark!r}: {role} {set_name!r} is not available ({error}); holding out "
                "tuning images of the test sets instead (ODIN's protocol), so the numbers are not "
                "OpenOOD's. Give the OpenOOD data root to use its validation lists.",
                stacklevel=3,
            )
            return None
        described[set_name] = _describe(ref, loaded[set_name])
    return loaded, described


def load_benchmark(
    name: str,
    *,
    source_params: Mapping[str, Mapping[str, Any]] | None = None,
    tuning_size: int | None = None,
    seed: int | None = None,
    full_spectrum: bool = False,
) -> Benchmark:
    """Load a benchmark: ID train/test, OOD sets and tuning sets.

    A benchmark that declares validation sets (``validation_id`` /
    ``validation_ood``, as OpenOOD v1.5's do: Zhang et al. 2023, Sec. 3)
    tunes on them and evaluates its test sets whole; one that does not (or
    whose validation sets cannot be loaded here) holds out tuning images of
    its test sets, as ODIN does.

    Args:
        name: a registered benchmark (see :func:`list_benchmarks`); ``"fashion-mnist"``
            is the offline default.
        source_params: extra parameters by source name, e.g.
            ``{"cifar10": {"path": "/data/cifar10"}, "gaussian": {"size": 2000}}``.
        tuning_size: images held out per set (default: the spec's, 1,000).
        seed: seeds which images are held out (default: the spec's).
        full_spectrum: also load the covariate-shifted ID sets into
            ``Benchmark.full_spectrum`` (OpenOOD's full-spectrum setting).

    Returns:
        The :class:`Benchmark`; the same arguments give the same images.

    Raises:
        UnknownNameError: no such benchmark or source.
        EmptyDatasetError: a split or set has no images.
        ValueError: ``full_spectrum=True`` for a benchmark without covariate-shifted sets.
    """
    spec = get_benchmark_spec(name)
    if full_spectrum and not spec.full_spectrum:
        with_sets = [n for n, s in list_benchmarks().items() if s.full_spectrum]
        raise ValueError(
            f"benchmark {name!r} has no covariate-shifted ID sets for full-spectrum evaluation; "
            f"these do: {', '.join(with_sets) or '(none)'}"
        )
    source_params = source_params or {}
    tuning_size = spec.tuning_size if tuning_size is None else tuning_size
    seed = spec.seed if seed is None else seed
    train_ref, test_ref = _with_overrides(spec.id_train, source_params), _with_overrides(spec.id_test, source_params)
    id_train = _load_ref(train_ref, "ID train")
    id_test_full = _load_ref(test_ref, "ID test")
    id_validation = None
    if spec.validation_id is not None:
        id_validation = _load_validation({"id": spec.validation_id}, source_params, "ID validation split", name)
    if id_validation is None:
        id_test, id_tuning = _split_off_tuning(id_test_full, tuning_size, seed, "id")
    else:
        id_test, id_tuning = id_test_full, id_validation[0]["id"]
    ood_validation = None
    if spec.validation_ood:
        ood_validation = _load_validation(spec.validation_ood, source_params, "OOD validation set", name)
    ood, ood_tuning, sources = {}, {}, {}
    for set_name, spec_ref in spec.ood.items():
        ref = _with_overrides(spec_ref, source_params)
        full = _load_ref(ref, f"OOD set {set_name!r}")
        if ood_validation is None:
            ood[set_name], ood_tuning[set_name] = _split_off_tuning(full, tuning_size, seed, f"ood/{set_name}")
        else:
            ood[set_name] = full
        sources[set_name] = _describe(ref, full)
    if ood_validation is not None:
        ood_tuning = ood_validation[0]
    metadata: dict[str, Any] = {
        "description": spec.description,
        "seed": seed,
        "tuning_size": tuning_size,
        "id_train": _describe(train_ref, id_train),
        "id_test": _describe(test_ref, id_test_full),
        "ood": sources,
    }
    if spec.groups:
        metadata["groups"] = {group: list(members) for group, members in spec.groups.items()}
    if spec.validation_id is not None:
        metadata["validation_id"] = id_validation[1]["id"] if id_validation else "held out of the ID test set"
    if spec.validation_ood:
        metadata["validation_ood"] = ood_validation[1] if ood_validation else "held out of each OOD test set"
    shifted = {}
    if full_spectrum:
        described = {}
        for set_name, spec_ref in spec.full_spectrum.items():
            ref = _with_overrides(spec_ref, source_params)
            shifted[set_name] = _load_ref(ref, f"covariate-shifted ID set {set_name!r}")
            described[set_name] = _describe(ref, shifted[set_name])
        metadata["full_spectrum"] = described
    return Benchmark(
        name=name,
        id_train=id_train,
        id_test=id_test,
        ood=ood,
        tuning=TuningSets(id=id_tuning, ood=ood_tuning),
        num_classes=spec.num_classes,
        spec=spec,
        metadata=metadata,
        groups={group: tuple(members) for group, members in spec.groups.items()},
        full_spectrum=shifted,
    )
