"""Image sources and their registry.

A source is a named way to get one set of images as a Hugging Face dataset with
an ``image`` column (``datasets.Image``) and an integer ``label`` column (-1
for every example of an out-of-distribution set). Every source, built-in or from
a plugin, is registered through the ``timm_ood_sources`` hook (see
:mod:`timm_ood.hookspecs`); these functions read the registry that the hook fills.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registry import Kind, Registration
from .errors import EmptyDatasetError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

__all__ = [
    "SourceSpec",
    "check_image_dataset",
    "get_source",
    "list_sources",
    "load_source",
    "model_overlay",
    "source_registrations",
]

@dataclass(frozen=True)
class SourceSpec:
    """A registered image source: how to load it, and where its images come from.

    Attributes:
        name: the registered name (lower case, words joined by ``-``).
        load: ``load(split, **params)`` returning a ``datasets.Dataset`` (or an
            ``IterableDataset`` when the source streams) with ``image`` and
            ``label`` columns.
        description: one line saying what the images are.
        provenance: where the images come from, precisely enough to get them again.
        licence: the licence the images are distributed under.
        splits: the split names ``load`` accepts.
        offline: True when the source needs no network.
        num_classes: classes of an in-distribution source; None for OOD sets
            (every label -1).
        hub_id: the Hugging Face hub repository it loads, if any.
        model_overlay: a timm ``pretrained_cfg_overlay`` (input size, mean,
            std, crop_pct) for models trained on this source.
    """

    name: str
    load: Callable[..., Dataset | IterableDataset]
    description: str
    provenance: str
    licence: str
    splits: tuple[str, ...] = ("test",)
    offline: bool = True
    num_classes: int | None = None
    hub_id: str | None = None
    model_overlay: Mapping[str, Any] | None = None

    def parameters(self) -> dict[str, Any]:
        """The keyword parameters ``load`` takes besides the split, with their defaults."""
        signature = inspect.signature(self.load)
        return {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if name != "split" and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        }


SOURCES: Kind[SourceSpec] = Kind.of_instances("timm_ood_sources", "source", SourceSpec, "timm_ood.data.SourceSpec")


def source_registrations() -> dict[str, Registration[SourceSpec]]:
    """Every registered source by name, with the plugin and distribution it came from."""
    return SOURCES.registrations()


def list_sources(pattern: str | None = None, *, offline: bool | None = None) -> dict[str, SourceSpec]:
    """Registered sources by name, built-in first, then plugins in registration order.

    Args:
        pattern: shell-style wildcard filter on names (``"natural-*"``).
        offline: keep only the sources that need no network (True) or that
            need the hub (False).

    Returns:
        ``{name: SourceSpec}``; each spec says whether it is ``offline``, its
        ``hub_id``, splits, provenance and licence.
    """
    specs = SOURCES.objects(pattern)
    return specs if offline is None else {name: s for name, s in specs.items() if s.offline == offline}


def get_source(name: str) -> SourceSpec:
    """The source registered under ``name``.

    Raises:
        UnknownNameError: no such source (the message lists the known ones).
    """
    return SOURCES.get(name)


def check_image_dataset(dataset: object, what: str) -> None:
    """Check that ``dataset`` is a non-empty dataset with ``image`` and ``label`` columns.

    Args:
        dataset: what a source returned.
        what: how to name it in messages (``"source 'digits', split 'test'"``).

    Raises:
        TypeError: not a ``datasets.Dataset`` / ``IterableDataset``, or a column is missing.
        EmptyDatasetError: a ``Dataset`` with no rows.
    """
    from datasets import Dataset, Image, IterableDataset

    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"{what} returned {type(dataset).__name__}, not a datasets.Dataset or IterableDataset")
    columns = dataset.column_names
    if columns is not None and not {"image", "label"} <= set(columns):
        raise TypeError(f"{what} has columns {columns}; it needs 'image' and 'label'")
    if dataset.features is not None and not isinstance(dataset.features["image"], Image):
        raise TypeError(f"{what}: column 'image' is {dataset.features['image']}, not a datasets.Image")
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise EmptyDatasetError(f"{what} is empty: there is nothing to evaluate on")


def load_source(name: str, split: str = "test", **params: Any) -> Dataset | IterableDataset:
    """Load a source by name as a dataset with ``image`` and ``label`` columns.

    Args:
        name: a registered source (see :func:`list_sources`).
        split: one of the source's ``splits`` (the auxiliary outlier set
            ``aux-photos`` has only ``"train"``).
        **params: the source's parameters (``size``, ``seed``, ``path``,
            ``streaming``, ...; see ``get_source(name).parameters()``).

    Returns:
        A ``datasets.Dataset``, or an ``IterableDataset`` when ``streaming=True``.

    Raises:
        UnknownNameError: no such source.
        ValueError: the source has no such split.
        TypeError: a parameter the source does not take.
        EmptyDatasetError: the split has no examples.
    """
    spec = get_source(name)
    if split not in spec.splits:
        raise ValueError(f"source {name!r} has no split {split!r}; its splits are: {', '.join(spec.splits)}")
    signature = inspect.signature(spec.load)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(params) - set(spec.parameters()))
    if unknown and not takes_any:
        raise TypeError(
            f"source {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters are: "
            f"{', '.join(spec.parameters()) or '(none)'}"
        )
    dataset = spec.load(split, **params)
    check_image_dataset(dataset, f"source {name!r}, split {split!r}")
    return dataset


def model_overlay(name: str) -> dict[str, Any]:
    """The timm ``pretrained_cfg_overlay`` for a model trained on source ``name``.

    ``timm.create_model(arch, in_chans=..., num_classes=..., pretrained_cfg_overlay=overlay)``
    gives a model whose data config (input size, mean, std, crop_pct) is that of
    the source, so :func:`~timm_ood.data.make_loader` and ODIN's 1/std read it back.

    Raises:
        UnknownNameError: no such source.
        ValueError: the source declares no data config (OOD sets, which no model trains on, do not).
    """
    spec = get_source(name)
    if spec.model_overlay is None:
        raise ValueError(
            f"source {name!r} declares no model data config; in-distribution sources with known "
            f"pixel statistics do: {', '.join(n for n, spec in list_sources().items() if spec.model_overlay)}"
        )
    return dict(spec.model_overlay)
