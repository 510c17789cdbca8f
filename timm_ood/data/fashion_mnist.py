"""Fashion-MNIST from its IDX files (Xiao, Rasul & Vollgraf, 2017; MIT licence).

The files are searched, in order, in the ``data_dir`` argument, in
``$TIMM_OOD_DATA_DIR`` and in the Debian package's folder
(``apt-get install dataset-fashion-mnist``); each folder may hold them directly
or in a ``fashion-mnist/`` subfolder, gzipped or not. Without ``data_dir`` and
with no files found, the hub copy ``zalando-datasets/fashion_mnist`` is loaded
when a network is there.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cache import cached_dataset
from .errors import DataNotFoundError, HubUnavailableError
from .hub import HubDataset
from .images import images_to_dataset, label_array, relabel_as_ood

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "CLASS_NAMES",
    "DATA_DIR_ENV",
    "DEBIAN_DIR",
    "HUB_ID",
    "find_idx_files",
    "load_fashion_mnist",
    "read_idx",
]

DATA_DIR_ENV = "TIMM_OOD_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HUB_ID = "zalando-datasets/fashion_mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPE_CODE_UINT8 = 0x08
_HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
_CITATION = (
    "Han Xiao, Kashif Rasul, Roland Vollgraf. Fashion-MNIST: a Novel Image Dataset for "
    "Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017."
)


def _search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    from_env = os.environ.get(DATA_DIR_ENV)
    return ([Path(from_env)] if from_env else []) + [DEBIAN_DIR]


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_files(data_dir: str | os.PathLike | None = None) -> dict[str, tuple[Path, Path]] | None:
    """The ``{split: (images file, labels file)}`` of the first folder that has all four files.

    Args:
        data_dir: search only this folder (and its ``fashion-mnist/`` subfolder).

    Returns:
        The files, or None when no searched folder has all four.
    """
    for base in _search_dirs(data_dir):
        for folder in (base, base / "fashion-mnist"):
            found = {split: tuple(_find_file(folder, stem) for stem in stems) for split, stems in _FILE_STEMS.items()}
            if all(path is not None for pair in found.values() for path in pair):
                return found  # type: ignore[return-value]
    return None


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array stored in an IDX file (gzipped or not).

    Raises:
        ValueError: the file is not a uint8 IDX file, or its size disagrees with its header.
    """
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as file:
        raw = file.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_DTYPE_CODE_UINT8:
        raise ValueError(f"{path} is not a uint8 IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(raw) - offset} bytes of data, its header says {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _missing_message(data_dir: str | os.PathLike | None, hub_error: Exception | None) -> str:
    searched = ", ".join(str(p) for p in _search_dirs(data_dir))
    files = ", ".join(f"{stem}[.gz]" for stems in _FILE_STEMS.values() for stem in stems)
    hub = f" Loading {HUB_ID!r} from the hub failed: {hub_error}" if hub_error else ""
    return (
        f"Fashion-MNIST not found (searched {searched}).{hub} Get it one of three ways: "
        f"(1) apt-get install dataset-fashion-mnist, which puts the IDX files in {DEBIAN_DIR}; "
        f"(2) put the four IDX files ({files}) in a folder and pass data_dir=... or set "
        f"{DATA_DIR_ENV}; (3) run with network access so that the hub copy {HUB_ID!r} is "
        "downloaded (or is already in the Hugging Face cache)."
    )


def _idx_dataset(split: str, files: tuple[Path, Path]) -> Dataset:
    from datasets import DatasetInfo

    images_file, labels_file = files
    stats = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    info = DatasetInfo(
        dataset_name="fashion-mnist",
        description=f"Fashion-MNIST {split} split, 28x28 grey, 10 classes, from {images_file.parent}",
        homepage=_HOMEPAGE,
        citation=_CITATION,
        license="MIT",
    )

    def build() -> Dataset:
        return images_to_dataset(read_idx(images_file), read_idx(labels_file), info=info, class_names=CLASS_NAMES)

    return cached_dataset({"source": "fashion-mnist", "split": split, "files": stats}, build)


def load_fashion_mnist(
    split: str,
    *,
    classes: Sequence[int] | None = None,
    as_ood: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000), labels 0-9.

    Args:
        split: ``"train"`` or ``"test"``.
        classes: keep only these classes (labels unchanged), e.g. ``range(6)``.
        as_ood: label every example -1 (Fashion-MNIST used as an OOD set).
        data_dir: a folder with the four IDX files; nothing else is searched.

    Raises:
        DataNotFoundError: no IDX files and no hub copy (the message lists the
            three ways to get the data).
    """
    files = find_idx_files(data_dir)
    if files is not None:
        dataset = _idx_dataset(split, files[split])
    elif data_dir is not None:
        raise DataNotFoundError(_missing_message(data_dir, None))
    else:
        try:
            dataset = HubDataset("fashion-mnist", HUB_ID)(split)
        except HubUnavailableError as error:
            raise DataNotFoundError(_missing_message(data_dir, error)) from error
    if classes is not None:
        keep = np.flatnonzero(np.isin(label_array(dataset), np.asarray(list(classes))))
        dataset = dataset.select(keep)
    return relabel_as_ood(dataset) if as_ood else dataset
