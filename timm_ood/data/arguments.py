"""One string names any image set: a registered source, a hub id, an image folder, parquet files, a saved dataset.

The command line's ``--id-train``, ``--id-test`` and ``--ood NAME=DATA`` take
such a string, and so can Python (:func:`load_data`):

==================================  ===================================================
``fashion-mnist`` / ``cifar10:train``  a registered source (``timm-ood list sources``), optional split
``my-org/my-outliers:test``           a Hugging Face hub dataset, optional split
``./dtd`` / ``./val:validation``       a local image folder (one subfolder per class, optionally
                                      inside split folders; a flat folder is unlabelled)
``./outliers.parquet`` / ``./pq/``     parquet files (a file, or a folder of them)
``./saved``                           a folder written by ``Dataset.save_to_disk``
==================================  ===================================================

An existing local path wins over a source name and a hub id. Every result has
the ``image`` and ``label`` columns a loader reads: labels are kept where the
data has them (a class column, class subfolders) and an OOD set gets the OOD
label (-1) throughout. A labelled set without labels gets -1 too, which
:func:`timm_ood.evaluate` reads as "no accuracy to report".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import DataNotFoundError, HubUnavailableError
from .hub import HubDataset
from .images import relabel_as_ood
from .sources import check_image_dataset, get_source, list_sources, load_source

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["DataArgument", "load_data", "parse_data_argument", "parse_named_data_argument", "split_named"]

Role = Literal["train", "test", "ood"]
#: the split read when a data argument names none
DEFAULT_SPLIT: dict[str, str] = {"train": "train", "test": "test", "ood": "test"}


@dataclass(frozen=True)
class DataArgument:
    """A parsed data argument.

    Attributes:
        kind: ``"source"``, ``"path"`` or ``"hub"``.
        target: the source name, the local path or the hub id.
        split: the split asked for, None when the argument names none.
    """

    kind: Literal["source", "path", "hub"]
    target: str
    split: str | None

    def __str__(self) -> str:
        return self.target if self.split is None else f"{self.target}:{self.split}"


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def parse_data_argument(text: str) -> DataArgument:
    """Tell what ``text`` names (see the module docstring); nothing is loaded.

    Raises:
        DataNotFoundError: ``text`` is no existing path, registered source or hub id (``org/name``),
            or a folder without images or data files.
    """
    text = text.strip()
    if not text:
        raise ValueError("an empty data argument: give a source name, a hub id (org/name[:split]) or a local path")
    candidates: list[tuple[str, str | None]] = [(text, None)]
    head, colon, tail = text.rpartition(":")
    if colon and head and tail and "/" not in tail:
        candidates.insert(0, (head, tail))  # "name:split" before a path that holds a colon
    for target, split in sorted(candidates, key=lambda c: not Path(c[0]).expanduser().exists()):
        if Path(target).expanduser().exists():
            _check_has_files(Path(target).expanduser())
            return DataArgument("path", str(Path(target).expanduser()), split)
    sources = list_sources()
    for target, split in candidates:
        if target in sources:
            return DataArgument("source", target, split)
    for target, split in candidates:
        if _looks_like_hub_id(target):
            return DataArgument("hub", target, split)
    looks_like_path = "/" in text or text.startswith((".", "~"))
    raise DataNotFoundError(
        f"{text!r} is " + (f"not an existing path ({Path(text).expanduser().resolve()})" if looks_like_path else
                           "neither a registered source nor a hub id")
        + "; give a local image folder, parquet file or save_to_disk folder, a Hugging Face dataset id "
        "(org/name, optionally :split), or a source name (timm-ood list sources)"
    )


def split_named(text: str, option: str, form: str, example: str) -> tuple[str, str]:
    """``"NAME=VALUE"`` -> ``(name, value)``, both stripped, for options such as ``--ood`` and ``--source-path``.

    Raises:
        ValueError: no ``=``, or an empty side; the message names ``option``, its ``form`` and an ``example``.
    """
    name, equals, value = text.partition("=")
    if not equals or not name.strip() or not value.strip():
        raise ValueError(f"{option} {text!r}: expected {form}, e.g. {example}")
    return name.strip(), value.strip()


def parse_named_data_argument(text: str) -> tuple[str, DataArgument]:
    """``"textures=./dtd"`` -> ``("textures", <path ./dtd>)``: a named set, as ``--ood`` takes it.

    Raises:
        ValueError: no ``=``, or an empty name.
    """
    name, value = split_named(text, "--ood", "NAME=DATA",
                              "--ood textures=./dtd or --ood my-outliers=my-org/outliers:test")
    return name, parse_data_argument(value)


def load_data(
    argument: str | DataArgument,
    role: Role = "test",
    *,
    streaming: bool = False,
    source_paths: Mapping[str, str | os.PathLike] | None = None,
) -> Dataset:
    """Load what a data argument names, as a dataset with ``image`` and ``label`` columns.

    Args:
        argument: a data argument (see the module docstring) or its parsed form.
        role: ``"train"`` / ``"test"`` (in-distribution: labels kept) or ``"ood"`` (every label -1);
            it also gives the split read when the argument names none (train, test, test).
        streaming: read a hub dataset lazily (an ``IterableDataset``).
        source_paths: local copies of registered sources by name (``{"imagenet-1k": "/data/imagenet"}``):
            a source named in ``argument`` is read from its copy instead of the hub.

    Raises:
        DataNotFoundError: nothing of that name, or a folder with no images.
        HubUnavailableError: a hub id while the hub cannot be reached.
        HubAuthenticationError: a gated or private hub dataset without a login.
        EmptyDatasetError: the split has no examples.
    """
    parsed = parse_data_argument(argument) if isinstance(argument, str) else argument
    as_ood = role == "ood"
    split = parsed.split or DEFAULT_SPLIT[role]
    if parsed.kind == "source":
        splits = get_source(parsed.target).splits
        if parsed.split is None and split not in splits:
            split = splits[0]
        params: dict[str, Any] = {"streaming": True} if streaming else {}
        if source_paths and parsed.target in source_paths:
            params["path"] = os.fspath(source_paths[parsed.target])
        dataset = load_source(parsed.target, split, **params)
        return relabel_as_ood(dataset) if as_ood else dataset
    name = Path(parsed.target).name if parsed.kind == "path" else parsed.target
    loader = HubDataset(name, None if parsed.kind == "path" else parsed.target, label_column="label")
    if parsed.kind == "path":
        dataset = loader(split, path=parsed.target, streaming=streaming, as_ood=as_ood, labels="optional",
                         any_split=parsed.split is None)
    else:
        try:
            dataset = loader(split, streaming=streaming, as_ood=as_ood, labels="optional",
                             any_split=parsed.split is None)
        except HubUnavailableError as error:
            raise HubUnavailableError(
                f"{parsed.target!r} is on the Hugging Face hub, which cannot be reached from here: run once with "
                "network access (datasets caches it), or save a copy where you have a network "
                "(load_dataset(...).save_to_disk(DIR)) and give its folder instead"
            ) from error
    check_image_dataset(dataset, f"data {str(parsed)!r}")
    return dataset


_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_DATA_SUFFIXES = frozenset({".parquet", ".arrow", ".csv", ".json", ".jsonl"})


def _check_has_files(path: Path) -> None:
    """Refuse a folder with neither images nor data files before ``datasets`` fails obscurely on it."""
    if path.is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return
    suffixes = _IMAGE_SUFFIXES | _DATA_SUFFIXES
    if not any(p.suffix.lower() in suffixes for p in path.rglob("*") if p.is_file()):
        raise DataNotFoundError(
            f"{path} has no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) and no parquet/arrow files in it or its "
            "subfolders; point at the folder that holds them"
        )
