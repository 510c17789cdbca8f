"""An on-disk cache of built datasets, keyed by what they were built from.

A source that builds its images (decoding IDX files, cutting photos, rendering
glyphs, drawing noise) does it once; later loads memory-map the saved Arrow
files. The key holds the source, split and parameters, the cache format, and
the versions of the libraries whose output the bytes depend on, so a new
NumPy, Pillow, scikit-image or scikit-learn builds afresh instead of reusing
stale images. Writes go to a temporary folder renamed into place, so parallel
processes (pytest-xdist, DataLoader workers) never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["CACHE_DIR_ENV", "cache_dir", "cached_dataset"]

CACHE_DIR_ENV = "TIMM_OOD_CACHE_DIR"
#: Bump when a builder changes what it produces for the same parameters.
CACHE_FORMAT = 2
_VERSIONED_LIBRARIES = ("numpy", "pillow", "scikit-image", "scikit-learn", "matplotlib")


def cache_dir() -> Path:
    """Where built datasets are kept: ``$TIMM_OOD_CACHE_DIR``, else ``~/.cache/timm_ood``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "timm_ood")


@cache
def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _entry_name(key: Mapping[str, Any]) -> str:
    full_key = {"key": key, "format": CACHE_FORMAT, "libraries": _library_versions()}
    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()
    return f"{key['source']}-{digest[:20]}"


def cached_dataset(key: Mapping[str, Any], build: Callable[[], Dataset]) -> Dataset:
    """The dataset saved under ``key``, built with ``build()`` and saved on first use.

    Args:
        key: JSON-serialisable description of everything the dataset depends
            on; must contain ``"source"`` (it prefixes the folder name).
        build: makes the dataset when it is not cached.

    Returns:
        The dataset memory-mapped from the cache; the freshly built one when it
        is empty or the cache folder cannot be written (read-only home, full disk).
    """
    from datasets import load_from_disk

    target = cache_dir() / "datasets" / _entry_name(key)
    if (target / "state.json").exists():
        return load_from_disk(str(target))
    dataset = build()
    if len(dataset) == 0:  # nothing worth keeping, and an empty Arrow folder cannot be read back
        return dataset
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError:
        return dataset
    try:
        dataset.save_to_disk(str(staging))
        os.replace(staging, target)
    except OSError:  # another process saved it first, or the disk is full
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "state.json").exists():
            return dataset
    return load_from_disk(str(target))
