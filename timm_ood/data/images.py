"""uint8 image arrays to Hugging Face datasets with an ``Image`` column.

Images are stored as PNG files, the encoding the ``datasets.Image`` feature
keeps. Encoding through Pillow costs about 100 µs per 28x28 image, most of it
per-call overhead, and deflating small images costs as much again;
:func:`encode_png` writes valid PNG files from numpy directly (filter bytes for
the whole batch at once, uncompressed deflate blocks), about 6 µs per image, so
the 60,000 Fashion-MNIST training images encode in well under a second.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset, DatasetInfo, IterableDataset

__all__ = ["OOD_LABEL", "encode_png", "images_to_dataset", "label_array", "relabel_as_ood"]

#: The label every example of an out-of-distribution set carries.
OOD_LABEL = -1

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE = {1: 0, 3: 2}  # grey, RGB
_ZLIB_LEVEL = 0  # stored blocks: 1.7x the bytes of level 1, 6x faster to write, faster to read


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def encode_png(images: np.ndarray) -> list[bytes]:
    """Encode a batch of 8-bit images as PNG files.

    Args:
        images: uint8 array ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB).

    Returns:
        One PNG file per image, decoded by any PNG reader to the same pixels.

    Raises:
        ValueError: not a uint8 batch of grey or RGB images.
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"expected uint8 images [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}")
    count, height, width = images.shape[:3]
    channels = 1 if images.ndim == 3 else 3
    rows = np.zeros((count, height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 per row
    rows[:, :, 1:] = images.reshape(count, height, width * channels)
    header = _PNG_SIGNATURE + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    )
    trailer = _png_chunk(b"IEND", b"")
    return [header + _png_chunk(b"IDAT", zlib.compress(row.tobytes(), _ZLIB_LEVEL)) + trailer for row in rows]


def images_to_dataset(
    images: np.ndarray,
    labels: np.ndarray | int,
    *,
    info: DatasetInfo,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """A ``datasets.Dataset`` with an ``image`` (``Image``) and an integer ``label`` column.

    Args:
        images: uint8 ``[N, H, W]`` or ``[N, H, W, 3]``.
        labels: one label per image, or one label for all (``OOD_LABEL`` for OOD sets).
        info: the dataset's description, provenance (``homepage``, ``citation``) and licence.
        class_names: names of the classes; the label column becomes a ``ClassLabel``.
    """
    from datasets import ClassLabel, Dataset, Features, Image, Value

    labels = np.broadcast_to(np.asarray(labels, dtype=np.int64), (len(images),))
    label_feature = ClassLabel(names=list(class_names)) if class_names else Value("int64")
    features = Features({"image": Image(), "label": label_feature})
    encoded = [{"bytes": png, "path": None} for png in encode_png(images)]
    info = dataclasses.replace(info, features=features)
    return Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features, info=info)


def label_array(dataset: Dataset) -> np.ndarray:
    """The ``label`` column of a dataset as an int64 array, without decoding any image."""
    labels = dataset.select_columns(["label"]).with_format("arrow")[:]["label"]
    return labels.to_numpy().astype(np.int64, copy=False)


def relabel_as_ood(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """The dataset with a ``label`` column of ``OOD_LABEL`` only: an OOD set.

    Works on ID datasets (their labels are replaced) and on unlabelled ones.
    """
    from datasets import IterableDataset, Value

    if dataset.column_names is not None and "label" in dataset.column_names:
        dataset = dataset.remove_columns("label")
    if isinstance(dataset, IterableDataset):
        features = dataset.features.copy() if dataset.features is not None else None
        if features is not None:
            features["label"] = Value("int64")
        return dataset.map(lambda example: {"label": OOD_LABEL}, features=features)
    ood_labels = np.full(len(dataset), OOD_LABEL, dtype=np.int64)
    return dataset.add_column("label", ood_labels, feature=Value("int64"))
