"""Torch DataLoaders over Hugging Face datasets, with the images a given timm model expects.

A map-style ``Dataset`` is read a batch at a time (``dataset[indices]``)
through ``with_transform``, so decoding, resizing and normalisation happen
lazily, once per batch. An ``IterableDataset`` (streaming) is read example by
example and batched on the fly: only one batch is in memory, whatever the length
of the stream. Images are decoded by the transform rather than by ``datasets``
so that a corrupt one is reported with its dataset and index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from .errors import CorruptImageError, EmptyDatasetError
from .transforms import ModelTransform, UndecodableImageError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

__all__ = ["ModelLoader", "as_batches", "check_columns", "make_loader"]

_INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})


def check_columns(dataset: Dataset | IterableDataset, name: str) -> None:
    """Refuse a dataset without an ``image`` column or an integer ``label`` column, saying how to fix it.

    Streams whose features are unknown are checked batch by batch by :class:`ModelTransform`.

    Raises:
        ValueError: a column is missing.
        TypeError: the ``label`` column is not integer (strings, floats, ...).
    """
    from datasets import ClassLabel, Value

    features = dataset.features
    if features is None:
        return
    columns = ", ".join(map(repr, features)) or "(none)"
    if "image" not in features:
        raise ValueError(
            f"dataset {name!r} has no 'image' column (its columns: {columns}); rename the image column: "
            "dataset = dataset.rename_column('<image column>', 'image')"
        )
    if "label" not in features:
        raise ValueError(
            f"dataset {name!r} has no 'label' column (its columns: {columns}); the loader yields (images, "
            "labels). Rename the class column: dataset = dataset.rename_column('<label column>', 'label'), or "
            "for an unlabelled OOD set add the OOD label: dataset = dataset.add_column('label', [-1] * len(dataset))"
        )
    label = features["label"]
    if isinstance(label, ClassLabel) or (isinstance(label, Value) and label.dtype in _INTEGER_DTYPES):
        return
    described = f"{label.dtype} values" if isinstance(label, Value) else f"a {type(label).__name__} feature"
    raise TypeError(
        f"the 'label' column of dataset {name!r} holds {described}, not integer class indices (its columns: "
        f"{columns}). Encode it: dataset = dataset.class_encode_column('label') for class names, or "
        "dataset.cast_column('label', ClassLabel(names=[...])) / dataset.cast_column('label', Value('int64')) "
        "for whole numbers stored as floats"
    )


class _IndexedBatches(torch.utils.data.Dataset):
    """``dataset[indices]`` through the model transform, as ``(images, labels)``."""

    def __init__(self, dataset: Dataset, transform: ModelTransform, name: str) -> None:
        from datasets import Image

        if isinstance(dataset.features.get("image"), Image):
            dataset = dataset.cast_column("image", Image(decode=False))
        self.examples = dataset.with_transform(transform)
        self.name = name

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = self.examples[indices]
        except UndecodableImageError as error:
            raise CorruptImageError(self.name, indices[error.position], error.cause) from error.cause
        return batch["images"], batch["labels"]


class _StreamBatches(torch.utils.data.IterableDataset):
    """Batches of a stream through the model transform; ``datasets`` shards it across workers."""

    def __init__(
        self, stream: IterableDataset, transform: ModelTransform, batch_size: int, drop_last: bool, name: str
    ) -> None:
        self.stream = stream.decode(False) if stream.features is not None else stream
        self.transform, self.batch_size, self.drop_last, self.name = transform, batch_size, drop_last, name

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        examples = iter(self.stream)
        start = 0
        while chunk := list(islice(examples, self.batch_size)):
            if self.drop_last and len(chunk) < self.batch_size:
                return
            try:
                batch = self.transform({"image": [e["image"] for e in chunk], "label": [e["label"] for e in chunk]})
            except UndecodableImageError as error:
                raise CorruptImageError(self.name, start + error.position, error.cause) from error.cause
            yield batch["images"], batch["labels"]
            start += len(chunk)

    def is_empty(self) -> bool:
        """Whether the stream has no example (reads at most one, undecoded)."""
        return next(iter(self.stream), None) is None


@dataclass(frozen=True)
class _LoaderSettings:
    """What :func:`make_loader` was asked for: enough to make the same loader over another part of the data."""

    batch_size: int
    shuffle: bool
    num_workers: int
    drop_last: bool
    seed: int | None
    name: str
    rows: tuple[int, int]  # the rows of the whole dataset this loader reads, [start, stop)
    total_rows: int | None  # rows of the whole dataset (None for a stream)


class ModelLoader(DataLoader):
    """The DataLoader :func:`make_loader` returns: a plain ``DataLoader`` that also knows its data.

    Beyond batches it tells the driver (:mod:`timm_ood.passes`) what it reads:

    - :attr:`fingerprint`: a digest of the Hugging Face dataset (its ``datasets``
      fingerprint, split and length) and of the model transform, the key of the
      feature store (None for a stream, whose content ``datasets`` does not digest);
    - :meth:`for_rank`: the same loader over one process's part of the dataset
      (``datasets.distributed.split_dataset_by_node``: a contiguous block of
      rows of a map-style dataset, every ``world``-th example of a stream);
    - :attr:`rows`: the rows ``[start, stop)`` of the whole dataset it reads.
    """

    dataset_source: Dataset | IterableDataset
    settings: _LoaderSettings
    transform: ModelTransform
    _fingerprint: str | None

    @property
    def rows(self) -> tuple[int, int]:
        return self.settings.rows

    @property
    def total_rows(self) -> int | None:
        return self.settings.total_rows

    @property
    def fingerprint(self) -> str | None:
        """Digest of the whole dataset read and its transform (None for streams)."""
        return self._fingerprint

    def for_rank(self, rank: int, world_size: int) -> ModelLoader:
        """This loader over the part of the dataset of process ``rank`` of ``world_size`` (no padding)."""
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node

        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        rows = self.settings.rows
        if isinstance(self.dataset_source, IterableDataset):
            part = split_dataset_by_node(self.dataset_source, rank=rank, world_size=world_size)
        else:
            # split_dataset_by_node's contiguous block, taken with select: its shard() refuses an empty block
            count = len(self.dataset_source)
            start = (count // world_size) * rank + min(rank, count % world_size)
            stop = start + count // world_size + (rank < count % world_size)
            part = self.dataset_source.select(range(start, stop) if stop > start else [])
            rows = (rows[0] + start, rows[0] + stop)
        return _build(part, replace(self.settings, rows=rows), self.transform, self._fingerprint)


def _data_fingerprint(dataset: Dataset | IterableDataset, transform: ModelTransform) -> str | None:
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        return None
    described = {
        "dataset": dataset._fingerprint,
        "split": str(dataset.split) if dataset.split is not None else None,
        "rows": len(dataset),
        "transform": {"mode": transform.mode, **{k: str(v) for k, v in sorted(transform.config.items())}},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _build(
    dataset: Dataset | IterableDataset, settings: _LoaderSettings, transform: ModelTransform, fingerprint: str | None
) -> ModelLoader:
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        stream = _StreamBatches(dataset, transform, settings.batch_size, settings.drop_last, settings.name)
        loader = ModelLoader(stream, batch_size=None, num_workers=settings.num_workers)
    else:
        batches = _IndexedBatches(dataset, transform, settings.name)
        order: Sampler[int]
        if settings.shuffle:
            generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
            order = RandomSampler(batches, generator=generator)
        else:
            order = SequentialSampler(batches)
        sampler = BatchSampler(order, batch_size=settings.batch_size, drop_last=settings.drop_last)
        loader = ModelLoader(batches, sampler=sampler, batch_size=None, num_workers=settings.num_workers)
    loader.dataset_source, loader.settings, loader.transform = dataset, settings, transform
    loader._fingerprint = fingerprint
    return loader


def make_loader(
    dataset: Dataset | IterableDataset,
    model: nn.Module,
    *,
    batch_size: int = 256,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int | None = None,
    name: str | None = None,
    **config_overrides: Any,
) -> ModelLoader:
    """A DataLoader (:class:`ModelLoader`) of ``(images, labels)`` prepared for ``model``.

    ``images`` are float32 ``[B, C, H, W]`` with the model's channel count,
    input size and normalisation (see :class:`~timm_ood.data.ModelTransform`);
    ``labels`` are int64 ``[B]`` (-1 for OOD sets).

    Args:
        dataset: a dataset with ``image`` and ``label`` columns; an
            ``IterableDataset`` is streamed.
        model: the timm model the images are for.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (map-style datasets only).
        num_workers: DataLoader worker processes.
        drop_last: drop the last, incomplete batch.
        seed: seeds the shuffling.
        name: the dataset's name in error messages (default: its ``info.dataset_name``).
        **config_overrides: timm data-config values replacing the model's
            (``input_size``, ``crop_pct``, ``mean``, ``std``, ``interpolation``).

    Raises:
        ValueError / TypeError: no ``image`` or ``label`` column, or a ``label``
            column that is not integer (see :func:`check_columns`).
        EmptyDatasetError: the dataset has no examples.
        ValueError: ``shuffle`` on a stream (shuffle it with ``dataset.shuffle(seed, buffer_size)``).
        CorruptImageError: while iterating, an image cannot be decoded.
    """
    from datasets import IterableDataset

    name = name or getattr(dataset.info, "dataset_name", None) or "dataset"
    check_columns(dataset, name)
    transform = ModelTransform(model, **config_overrides)
    transform.name = name
    is_stream = isinstance(dataset, IterableDataset)
    if is_stream:
        if shuffle:
            raise ValueError("cannot shuffle a stream here; use dataset.shuffle(seed=..., buffer_size=...) first")
        if _StreamBatches(dataset, transform, batch_size, drop_last, name).is_empty():
            # checked here: a DataLoader worker left without a shard is empty too
            raise EmptyDatasetError(f"stream {name!r} has no examples: there is nothing to evaluate on")
    elif len(dataset) == 0:
        raise EmptyDatasetError(f"dataset {name!r} is empty: there is nothing to evaluate on")
    total = None if is_stream else len(dataset)
    settings = _LoaderSettings(batch_size, shuffle, num_workers, drop_last, seed, name, (0, total or 0), total)
    # a shuffled or truncated loader reads the rows in another order or not all of them: no store key
    fingerprint = None if shuffle or drop_last else _data_fingerprint(dataset, transform)
    return _build(dataset, settings, transform, fingerprint)


def as_batches(
    data: Any, model: nn.Module, *, batch_size: int = 256, num_workers: int = 0, name: str | None = None
) -> Any:
    """``data`` as batches for ``model``: a Hugging Face dataset through :func:`make_loader`, anything else as is.

    What every entry point that takes data (``evaluate``, ``fit``, ``calibrate``)
    accepts: a ``datasets.Dataset`` or ``IterableDataset`` with ``image`` and
    ``label`` columns (converted with the model's own data config), a DataLoader,
    or any iterable of ``(images, labels)`` batches.
    """
    from datasets import Dataset, IterableDataset

    if isinstance(data, (Dataset, IterableDataset)):
        return make_loader(data, model, batch_size=batch_size, num_workers=num_workers, name=name)
    return data
