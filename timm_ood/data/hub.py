"""Datasets from the Hugging Face hub, or local copies of them, through ``datasets``.

One code path loads both: :class:`HubDataset` calls ``datasets.load_dataset``
with the hub id, or with the local ``path`` (an image folder, parquet files, any
path ``load_dataset`` accepts, or a folder written by ``save_to_disk``), then
renames the columns to ``image`` / ``label`` (CIFAR-10 calls them ``img`` /
``label``, CIFAR-100 ``img`` / ``fine_label``).

:class:`OdinResampled` builds ODIN's *crop* and *resize* OOD sets from a hub
dataset (Liang et al. 2018, Sec. 4.2: "randomly cropping image patches of size
32x32" and "downsampling each image to size 32x32").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import DataNotFoundError, HubAuthenticationError, HubUnavailableError
from .images import relabel_as_ood

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

__all__ = ["HubDataset", "OdinResampled"]

_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
#: ``datasets`` names a folder ``valid`` or ``val`` split ``validation``.
_SPLIT_SYNONYMS = {"valid": "validation", "val": "validation"}
_LOCAL_COPY_HINT = (
    "pass path= to a local copy: a folder written by Dataset.save_to_disk, an image folder "
    "(one subfolder per class, or split folders), a parquet file or folder, or a builder name "
    "with data_files= (e.g. path='parquet', data_files={'test': [...]})"
)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _first_present(columns: list[str], candidates: tuple[str | None, ...], what: str, source: str) -> str:
    for name in candidates:
        if name is not None and name in columns:
            return name
    raise ValueError(
        f"source {source!r}: no {what} column among {columns}; expected one of "
        f"{[c for c in candidates if c is not None]}"
    )


@dataclass(frozen=True)
class HubDataset:
    """How to load one dataset from the hub or from a local copy, as ``image`` / ``label``.

    Attributes:
        source: the source name, for messages.
        hub_id: the hub repository; None where no hub copy has been verified
            (a local ``path`` is then required).
        config: the hub configuration (``"cropped_digits"`` for SVHN).
        image_column: the image column on the hub.
        label_column: the label column on the hub; None for unlabelled OOD sets.
        split_names: this source's split names mapped to the hub's, where they
            differ (``{"test": "train"}`` for an OOD set the hub stores as
            ``train``; ``"train+test"`` concatenates).
    """

    source: str
    hub_id: str | None
    config: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    split_names: Mapping[str, str] = field(default_factory=dict)

    def __call__(
        self,
        split: str,
        *,
        path: str | os.PathLike | None = None,
        data_files: Any = None,
        streaming: bool = False,
        as_ood: bool = False,
        labels: Literal["required", "optional"] = "required",
        any_split: bool = False,
    ) -> Dataset | IterableDataset:
        """Load ``split`` as a dataset with ``image`` and ``label`` columns.

        Args:
            split: this source's split name.
            path: a local copy instead of the hub (see the module docstring).
            data_files: passed to ``load_dataset`` with ``path``.
            streaming: return an ``IterableDataset`` read lazily.
            as_ood: label every example -1 (a labelled dataset used as an OOD set).
            labels: ``"optional"``: a dataset without a label column is loaded with
                every label -1 instead of refused (a user's unlabelled folder).
            any_split: when the data has no ``split`` but exactly one split, read that one
                (a user's data argument that named no split).

        Raises:
            HubUnavailableError: the hub cannot be reached and no ``path`` was given.
            HubAuthenticationError: the hub dataset is gated or private and no login gives access.
            DataNotFoundError: no such hub dataset, or the source has no verified hub copy and no
                ``path`` was given.
        """
        if data_files is not None and path is None:
            raise ValueError(f"source {self.source!r}: data_files= needs path= (a builder name or folder)")
        if path is None:
            loaded = self._load_from_hub(split, streaming, any_split=any_split)
        else:
            loaded = self._pick_split(self._load_local(Path(path), data_files, streaming), split, any_split=any_split)
        return self._normalise(loaded, as_ood=as_ood or self.label_column is None, labels=labels)

    def _load_from_hub(self, split: str, streaming: bool, *, any_split: bool = False) -> Dataset | IterableDataset:
        from datasets import get_dataset_split_names, load_dataset
        from datasets.exceptions import DatasetNotFoundError

        if self.hub_id is None:
            raise DataNotFoundError(
                f"source {self.source!r} has no verified copy on the Hugging Face hub; {_LOCAL_COPY_HINT}"
            )
        hub_split = self.split_names.get(split, split)
        try:
            try:
                return load_dataset(self.hub_id, self.config, split=hub_split, streaming=streaming)
            except ValueError as error:  # datasets: "Unknown split ... Should be one of [...]"
                if not (any_split and "split" in str(error).lower()):
                    raise
                names = get_dataset_split_names(self.hub_id, self.config)
                if len(names) != 1:
                    raise ValueError(
                        f"{self.hub_id!r} has no split {hub_split!r}; name one of its splits: "
                        + ", ".join(f"{self.hub_id}:{name}" for name in names)
                    ) from error
                return load_dataset(self.hub_id, self.config, split=names[0], streaming=streaming)
        except ConnectionError as error:
            raise HubUnavailableError(
                f"source {self.source!r} needs {self.hub_id!r} from the Hugging Face hub, which cannot "
                f"be reached from here ({error}). Run with network access once (datasets caches it), "
                f"or {_LOCAL_COPY_HINT}. Set HF_HUB_OFFLINE=1 to fail at once instead of retrying."
            ) from error
        except DatasetNotFoundError as error:
            page = f"https://huggingface.co/datasets/{self.hub_id}"
            if "gated" in str(error):
                raise HubAuthenticationError(
                    f"{self.hub_id!r} is a gated dataset: accept its terms at {page} while logged in, then log in "
                    "here with `hf auth login` (or set HF_TOKEN to an access token); or "
                    f"{_LOCAL_COPY_HINT}"
                ) from error
            raise DataNotFoundError(
                f"no dataset {self.hub_id!r} on the Hugging Face hub that this login can read ({page}): check the "
                "id; for a private dataset log in with `hf auth login` (or set HF_TOKEN)"
            ) from error

    def _load_local(
        self, path: Path, data_files: Any, streaming: bool
    ) -> Dataset | DatasetDict | IterableDataset | IterableDatasetDict:
        from datasets import Dataset, load_dataset, load_from_disk

        if path.is_dir() and _is_saved_dataset(path):
            saved = load_from_disk(str(path))
            if not streaming:
                return saved
            if isinstance(saved, Dataset):
                return saved.to_iterable_dataset()
            return {name: split.to_iterable_dataset() for name, split in saved.items()}
        if path.is_file():
            builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"source {self.source!r}: cannot tell how to read {path}; use a "
                    f"{', '.join(_BUILDER_BY_SUFFIX)} file, or a folder"
                )
            return load_dataset(builder, data_files=str(path), streaming=streaming)
        return load_dataset(str(path), data_files=data_files, streaming=streaming)

    def _pick_split(self, loaded: Any, split: str, *, any_split: bool = False) -> Dataset | IterableDataset:
        if not isinstance(loaded, Mapping):
            return loaded
        names: tuple[str, ...] = (self.split_names.get(split, split), split)
        if any_split and split == "test":  # a user's folder of train/ and val/: evaluate on val
            names = (*names, "validation")
        for name in (*names, *(_SPLIT_SYNONYMS.get(name) for name in names)):
            if name in loaded:
                return loaded[name]
        if len(loaded) == 1:  # a flat folder of images loads as one "train" split
            return next(iter(loaded.values()))
        raise ValueError(
            f"source {self.source!r}: the local copy has no split {split!r}; it has {list(loaded)} "
            f"(name one: DATA:{next(iter(loaded))})"
        )

    def _normalise(
        self, dataset: Dataset | IterableDataset, *, as_ood: bool, labels: str = "required"
    ) -> Dataset | IterableDataset:
        from datasets import Image

        columns = dataset.column_names
        if columns is None:  # a stream whose features are unknown: trust the hub's names
            image, label = self.image_column, self.label_column
        else:
            image = _first_present(columns, (self.image_column, "image", "img"), "image", self.source)
            if not as_ood and labels == "optional" and not {self.label_column, "label"} & set(columns):
                as_ood = True  # no labels: every example gets the "no class" label -1
            label = None if as_ood else _first_present(columns, (self.label_column, "label"), "label", self.source)
        if image != "image":
            dataset = dataset.rename_column(image, "image")
        if label is not None and label != "label":
            dataset = dataset.rename_column(label, "label")
        if columns is not None:
            dataset = dataset.select_columns(["image"] if as_ood else ["image", "label"])
        if dataset.features is not None and not isinstance(dataset.features["image"], Image):
            dataset = dataset.cast_column("image", Image())
        return relabel_as_ood(dataset) if as_ood else dataset


def _resample_batch(
    batch: dict[str, list], indices: list[int], *, mode: str, size: int, seed: int
) -> dict[str, list]:
    from PIL import Image

    images = []
    for image, index in zip(batch["image"], indices, strict=True):
        if mode == "resize":
            images.append(image.resize((size, size), Image.Resampling.BILINEAR))
            continue
        width, height = image.size
        if width < size or height < size:
            raise ValueError(f"image {index} is {width}x{height}, smaller than the {size}x{size} crop")
        rng = np.random.default_rng([seed, index])  # per example: the same crop however it is batched
        left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        images.append(image.crop((left, top, left + size, top + size)))
    return {"image": images, "label": batch["label"]}


@dataclass(frozen=True)
class OdinResampled:
    """An OOD set built from a hub dataset the way ODIN built TinyImageNet (crop) and (resize).

    ODIN Sec. 4.2: *crop* takes a random ``size x size`` patch of each image,
    *resize* downsamples the whole image to ``size x size``. The paper does not
    say which interpolation; this uses Pillow's antialiased bilinear. Crop
    positions are drawn per example from ``(seed, index)``.

    Attributes:
        base: the dataset the images come from.
        mode: ``"crop"`` or ``"resize"``.
    """

    base: HubDataset
    mode: Literal["crop", "resize"]

    def __call__(
        self,
        split: str,
        *,
        image_size: int = 32,
        seed: int = 0,
        path: str | os.PathLike | None = None,
        data_files: Any = None,
        streaming: bool = False,
    ) -> Dataset | IterableDataset:
        """The resampled OOD set of ``split`` (every label -1); arguments as :class:`HubDataset`."""
        dataset = self.base(split, path=path, data_files=data_files, streaming=streaming, as_ood=True)
        resample = partial(_resample_batch, mode=self.mode, size=image_size, seed=seed)
        return dataset.map(resample, batched=True, with_indices=True, features=dataset.features)
