"""Where a training step's auxiliary outlier batch comes from.

An :class:`OutlierSource` hands the loop one batch of outlier images per step.
:class:`CyclingOutliers` cycles through any iterable of batches (a DataLoader
over the benchmark's auxiliary set) or a Hugging Face dataset, which it reads
with the model's own data config (:func:`outlier_batches`); samplers that choose
outliers with the current model (GReg+'s energy-based sampling) implement the
same method.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..batches import OOD_LABEL, split_batch

__all__ = ["CyclingOutliers", "OutlierSource", "as_outlier_source", "outlier_batches"]


def is_hf_dataset(data: Any) -> bool:
    """Whether ``data`` is a Hugging Face ``Dataset`` or ``IterableDataset`` (without importing ``datasets``)."""
    datasets = sys.modules.get("datasets")  # not imported yet: data cannot be one of its datasets
    return datasets is not None and isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def _images_only(dataset: Any) -> Any:
    """The ``image`` column of an outlier dataset with the OOD label (-1): its own labels, if any, are never read."""
    from datasets import Features, IterableDataset, Value

    features = dataset.features
    if features is None:  # a stream of unknown columns: the transform checks each batch for an image
        return dataset.map(lambda _: {"label": OOD_LABEL})
    if "image" not in features:
        return dataset  # make_loader says what is missing and how to rename it
    images = dataset.select_columns(["image"])
    if isinstance(images, IterableDataset):
        labelled = Features({"image": features["image"], "label": Value("int64")})
        return images.map(lambda _: {"label": OOD_LABEL}, features=labelled)
    return images.add_column("label", [OOD_LABEL] * len(images))


def outlier_batches(data: Any, model: nn.Module, *, batch_size: int, seed: int = 0) -> Any:
    """Auxiliary outliers as batches for ``model``: a Hugging Face dataset is loaded for it, anything else kept.

    A dataset needs an ``image`` column; a ``label`` column is optional and
    ignored (outliers are labelled -1). Its images go through the model's own
    data config (:func:`timm_ood.data.make_loader`), ``batch_size`` a batch; a
    map-style ``Dataset`` is reshuffled with ``seed`` on every pass (a stream is
    read in its order: shuffle it with ``dataset.shuffle(seed=..., buffer_size=...)``).
    A DataLoader or any other iterable of batches is returned as it is.
    """
    if not is_hf_dataset(data):
        return data
    from ..data import as_batches, make_loader

    images = _images_only(data)
    name = getattr(data.info, "dataset_name", None) or "outliers"
    if isinstance(images, sys.modules["datasets"].IterableDataset):
        return as_batches(images, model, batch_size=batch_size, name=name)
    return make_loader(images, model, batch_size=batch_size, shuffle=True, seed=seed, name=name)


@runtime_checkable
class OutlierSource(Protocol):
    """Gives the training loop one outlier batch per step."""

    def next_batch(self, model: nn.Module, id_batch_size: int) -> torch.Tensor:
        """Outlier images [N, C, H, W] for a step whose in-distribution batch has ``id_batch_size`` images."""
        ...


class CyclingOutliers:
    """Outlier batches from an iterable, restarted whenever it is exhausted.

    Args:
        data: a DataLoader or iterable of batches (``(images, labels)`` or
            images), or a Hugging Face dataset, loaded on the first step for the
            model of that step in batches of its ID batch size (:func:`outlier_batches`).
        seed: reshuffles a map-style dataset on every pass.
    """

    def __init__(self, data: Iterable | Any, *, seed: int = 0) -> None:
        self.data, self.seed = data, seed
        self._loaded: Iterable | None = None if is_hf_dataset(data) else data
        self._batches: Iterator | None = None

    def next_batch(self, model: nn.Module, id_batch_size: int) -> torch.Tensor:
        if self._loaded is None:
            self._loaded = outlier_batches(self.data, model, batch_size=id_batch_size, seed=self.seed)
        for _ in range(2):
            if self._batches is not None:
                try:
                    return split_batch(next(self._batches))[0]
                except StopIteration:
                    pass
            self._batches = iter(self._loaded)
        raise ValueError("the outlier data yielded no batches: the auxiliary set is empty")


def as_outlier_source(outliers: Iterable | OutlierSource | Any, *, seed: int = 0) -> OutlierSource:
    """``outliers`` itself if it is a source, else a :class:`CyclingOutliers` over it (a dataset shuffled with ``seed``)."""
    return outliers if isinstance(outliers, OutlierSource) else CyclingOutliers(outliers, seed=seed)
