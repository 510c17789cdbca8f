"""The feature store: what the tap computed for a dataset, written once and read by every later pass.

::

    results = timm_ood.evaluate(model, detectors="all", benchmark="fashion-mnist", cache_dir="~/.cache/timm-ood/outputs")
    results = timm_ood.evaluate(model, detectors=["knn", "vim"], benchmark="fashion-mnist", cache_dir=...)  # no forward

An entry holds the tap's outputs (logits, pre-logits, feature maps,
intermediate maps: only those the detectors of the pass declared) and the
labels of every row of one dataset, for one model. Its key is

- the model: its timm-ood fingerprint with the digest of every weight
  (:mod:`timm_ood.fingerprint`), its dtype and its data config;
- the data: the loader's :attr:`~timm_ood.data.ModelLoader.fingerprint` (the
  Hugging Face ``datasets`` fingerprint, split and row count, and the model
  transform);
- the outputs stored.

Change any of them and the entry is not found, so it is computed again:
never a stale hit. Data without a fingerprint (a stream, a shuffled loader,
your own iterable) is never stored.

Layout: ``<root>/<model digest>/<data digest>/<outputs>/`` holds
``manifest.json`` (the key in full, the outputs, their shapes and dtypes, the
shards) and ``part-<start>-<stop>.safetensors`` shards of consecutive rows.
Safetensors rather than Arrow: tensors keep their dtype (bfloat16 included),
shards are read memory-mapped a slice at a time, so a store larger than
memory works, and writing and reading run at disk speed
(``benchmarks/results/store_format.md`` measures both formats). An entry is
written under a temporary name and renamed into place in one step once
complete: concurrent runs never see half an entry, and when two write the
same entry the first rename wins. Under torch.distributed every rank writes
the shards of its own rows into the shared temporary directory and rank 0
renames it.

A store is also a way to hand features to someone: copy an entry's directory;
``manifest.json`` says what each tensor is, and any safetensors reader opens
the shards (``safetensors.torch.load_file``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .distributed import all_gather_rows, all_reduce_max, barrier, broadcast_object, world
from .fingerprint import model_fingerprint
from .tap import Need, Outputs, Tap

if TYPE_CHECKING:
    from .detectors.base import Detector

__all__ = ["DEFAULT_SHARD_BYTES", "FeatureStore", "StoreEntry", "StoreFullError", "StoreWriter", "as_store"]

STORE_VERSION = 1
#: rows are written in shards of about this size
DEFAULT_SHARD_BYTES = 256 << 20
MANIFEST = "manifest.json"
_TEMPORARY = ".writing-"


class StoreFullError(OSError):
    """The outputs to store would not fit on the disk of the store."""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _needs_name(needs: Iterable[Need]) -> str:
    return "+".join(sorted(n.value for n in needs)) or "none"


def model_key(model: nn.Module) -> dict[str, Any]:
    """What identifies a model's outputs: fingerprint with every weight, dtype and data config."""
    from .model_info import data_config

    try:
        config = data_config(model)
    except Exception:  # a model timm cannot describe: its weights and dtype still key it
        config = {}
    parameter = next(iter(model.parameters()), None)
    return {
        "fingerprint": json.loads(model_fingerprint(model, weights=True).to_json()),
        "dtype": str(parameter.dtype) if parameter is not None else "none",
        "data_config": {k: str(v) for k, v in sorted(config.items())},
    }


@dataclass(frozen=True)
class StoreEntry:
    """One complete entry: the outputs of every row of one dataset for one model."""

    path: Path
    manifest: dict[str, Any]

    @property
    def needs(self) -> frozenset[Need]:
        return frozenset(Need(n) for n in self.manifest["needs"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest["labels"])

    @property
    def bytes(self) -> int:
        return int(self.manifest["bytes"])

    def read(
        self, tap: Tap, start: int = 0, stop: int | None = None, batch_size: int = 256
    ) -> Iterator[tuple[Outputs, torch.Tensor | None]]:
        """``(outputs, labels)`` of rows ``[start, stop)`` in batches of ``batch_size``, memory-mapped a slice at a time.

        Tensors are on the CPU; the caller moves them.
        """
        stop = self.rows if stop is None else stop
        for shard in self.manifest["shards"]:
            low, high = max(start, shard["start"]), min(stop, shard["stop"])
            if low >= high:
                continue
            with safe_open(self.path / shard["file"], framework="pt") as handle:
                for first in range(low, high, batch_size):
                    last = min(first + batch_size, high)
                    rows = slice(first - shard["start"], last - shard["start"])
                    yield self._outputs(tap, {name: handle.get_slice(name)[rows] for name in handle.keys()})  # noqa: SIM118

    def empty(self, tap: Tap) -> tuple[Outputs, torch.Tensor | None]:
        """Outputs of 0 rows with the stored trailing shapes (for ranks without rows)."""
        shard = self.manifest["shards"][0]
        with safe_open(self.path / shard["file"], framework="pt") as handle:
            return self._outputs(tap, {name: handle.get_slice(name)[0:0] for name in handle.keys()})  # noqa: SIM118

    def _outputs(self, tap: Tap, tensors: dict[str, torch.Tensor]) -> tuple[Outputs, torch.Tensor | None]:
        count = int(self.manifest.get("intermediates", 0))
        intermediates = [tensors[f"intermediates.{i}"] for i in range(count)] if Need.INTERMEDIATES in self.needs \
            else None
        outputs = Outputs(None, tap, logits=tensors.get("logits"), pre_logits=tensors.get("pre_logits"),
                          features=tensors.get("features"), intermediates=intermediates)
        return outputs, tensors.get("labels")


class StoreWriter:
    """Writes one entry: :meth:`add` each batch of this process's rows, then :meth:`commit` (on every rank)."""

    def __init__(self, store: FeatureStore, final: Path, key: dict[str, Any], needs: frozenset[Need],
                 rows: tuple[int, int], total_rows: int) -> None:
        self.store, self.final, self.key, self.needs = store, final, key, needs
        self.start, self.position = rows[0], rows[0]
        self.total_rows = total_rows
        token = broadcast_object(uuid.uuid4().hex)  # every rank writes into the same temporary directory
        self.temporary = final.parent / f"{_TEMPORARY}{final.name}-{token}"
        self.temporary.mkdir(parents=True, exist_ok=True)
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._checked_space = False
        self._shapes: dict[str, Any] | None = None
        self._labels: bool | None = None
        self._intermediates = 0

    def add(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        """Queue one batch (written once a shard's worth of rows is queued)."""
        tensors: dict[str, torch.Tensor] = {}
        for need in (Need.LOGITS, Need.PRE_LOGITS, Need.FEATURES):
            if need in self.needs:
                tensors[need.value] = getattr(outputs, need.value)
        if Need.INTERMEDIATES in self.needs:
            maps = outputs.intermediates
            self._intermediates = len(maps)
            tensors.update({f"intermediates.{i}": t for i, t in enumerate(maps)})
        if labels is not None:
            tensors["labels"] = labels.to(torch.long)
        self._labels = labels is not None if self._labels is None else self._labels and labels is not None
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if self._shapes is None:
            self._shapes = {name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
                            for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if not self._checked_space and len(outputs):
            self._check_space(size / len(outputs))
        self._pending.append(tensors)
        self._pending_bytes += size
        if self._pending_bytes >= self.store.shard_bytes:
            self._flush()

    def _check_space(self, bytes_per_row: float) -> None:
        self._checked_space = True
        needed = bytes_per_row * self.total_rows
        free = shutil.disk_usage(self.temporary).free
        if needed > free:
            shutil.rmtree(self.temporary, ignore_errors=True)
            outputs = ", ".join(sorted(n.value for n in self.needs))
            raise StoreFullError(
                f"the feature store at {self.store.root} would need {needed / 1e9:.2f} GB for the {outputs} of "
                f"{self.total_rows} images ({bytes_per_row / 1e3:.1f} kB per image) but its disk has "
                f"{free / 1e9:.2f} GB free. Free space, choose another cache_dir, or evaluate without detectors "
                "that read feature maps or intermediate maps (they are the large outputs)"
            )

    def _flush(self) -> None:
        if not self._pending:
            return
        names = self._pending[0].keys()
        merged = {name: torch.cat([batch[name] for batch in self._pending]) for name in names}
        rows = next(iter(merged.values())).shape[0]
        stop = self.position + rows
        save_file(merged, self.temporary / f"part-{self.position:012d}-{stop:012d}.safetensors",
                  metadata={"timm_ood.store": str(STORE_VERSION)})
        self.position = stop
        self._pending, self._pending_bytes = [], 0

    def commit(self) -> StoreEntry | None:
        """Write what is queued; rank 0 checks every row is there, writes the manifest and renames the entry into place.

        Every rank calls it. Returns the entry (None if another process committed it first and it cannot be read).
        """
        self._flush()
        rank, size = world()
        description = torch.tensor([self.start, self.position, int(bool(self._labels)), self._intermediates])
        gathered = all_gather_rows(description[None]).tolist() if size > 1 else [description.tolist()]
        shapes = broadcast_object(self._shapes, source=next((r for r, d in enumerate(gathered) if d[1] > d[0]), 0))
        barrier()  # every rank's shards are on disk
        if rank == 0:
            self._finish(gathered, shapes)
        barrier()
        return self.store.entry(self.final)

    def _finish(self, described: Sequence[Sequence[int]], shapes: dict[str, Any] | None) -> None:
        shards: list[dict[str, Any]] = []  # {"file": str, "start": int, "stop": int}
        for file in sorted(self.temporary.glob("part-*.safetensors")):
            _, start, stop = file.stem.split("-")
            shards.append({"file": file.name, "start": int(start), "stop": int(stop)})
        covered = 0
        for shard in shards:
            if shard["start"] != covered:
                break
            covered = shard["stop"]
        if covered != self.total_rows:
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise RuntimeError(
                f"feature store: the shards written cover rows [0, {covered}) of {self.total_rows}; the entry is "
                "incomplete and was not stored"
            )
        with_rows = [d for d in described if d[1] > d[0]]
        manifest = {
            "version": STORE_VERSION,
            "key": self.key,
            "needs": sorted(n.value for n in self.needs),
            "rows": self.total_rows,
            "labels": bool(with_rows) and all(d[2] for d in with_rows),
            "intermediates": max((d[3] for d in described), default=0),
            "tensors": shapes or {},
            "shards": shards,
            "bytes": sum((self.temporary / s["file"]).stat().st_size for s in shards),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (self.temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(self.temporary, self.final)
        except OSError:  # another process stored the same entry first: keep theirs
            shutil.rmtree(self.temporary, ignore_errors=True)

    def abort(self) -> None:
        """Drop what was written (the pass failed)."""
        if world()[0] == 0:
            shutil.rmtree(self.temporary, ignore_errors=True)


class FeatureStore:
    """A directory of stored tap outputs, keyed by model, data and outputs (see the module docstring).

    Args:
        root: the store's directory (created when first written; ``~`` expanded).
        shard_bytes: rows are written in shards of about this many bytes.
    """

    def __init__(self, root: str | os.PathLike, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"cache_dir {self.root} exists and is not a directory; pass a directory")
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.shard_bytes = shard_bytes

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    def _directory(self, model_digest: str, data_fingerprint: str) -> Path:
        return self.root / model_digest[:24] / data_fingerprint[:24]

    def entry(self, path: Path) -> StoreEntry | None:
        """The complete entry at ``path``, or None (absent, half-written, or of another store version)."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("version") != STORE_VERSION:
            return None
        return StoreEntry(path, manifest)

    def find(self, key: dict[str, Any], data_fingerprint: str, needs: frozenset[Need]) -> StoreEntry | None:
        """The smallest complete entry of this model and data holding at least ``needs``."""
        directory = self._directory(key["digest"], data_fingerprint)
        if not directory.is_dir():
            return None
        found = [entry for path in directory.iterdir() if not path.name.startswith(_TEMPORARY)
                 if (entry := self.entry(path)) is not None
                 and entry.manifest["key"] == {**key, "data": data_fingerprint} and needs <= entry.needs]
        return min(found, key=lambda e: e.bytes, default=None)

    def stored_needs(self, key: dict[str, Any], data_fingerprint: str) -> frozenset[Need]:
        """Every output some entry of this model and data holds (so a new entry can supersede them)."""
        directory = self._directory(key["digest"], data_fingerprint)
        if not directory.is_dir():
            return frozenset()
        entries = (self.entry(path) for path in directory.iterdir() if not path.name.startswith(_TEMPORARY))
        return frozenset().union(*(e.needs for e in entries
                                   if e is not None and e.manifest["key"] == {**key, "data": data_fingerprint}))

    def writer(self, key: dict[str, Any], data_fingerprint: str, needs: frozenset[Need],
               rows: tuple[int, int], total_rows: int) -> StoreWriter:
        """Start writing the entry of this model, data and outputs (every rank calls it)."""
        final = self._directory(key["digest"], data_fingerprint) / _needs_name(needs)
        return StoreWriter(self, final, {**key, "data": data_fingerprint}, needs, rows, total_rows)

    def entries(self) -> list[StoreEntry]:
        """Every complete entry in the store."""
        return [entry for path in sorted(self.root.glob(f"*/*/*/{MANIFEST}"))
                if (entry := self.entry(path.parent)) is not None]

    def bind(self, model: nn.Module) -> BoundStore:
        """The store for one model, its key computed once (reads every weight: ~0.1 s for a resnet50)."""
        return BoundStore(self, model)


class BoundStore:
    """A store and the key of one model, as the driver uses it for one evaluation.

    Besides the tap's outputs it keeps fitted detector states: a fit is a pure
    function of the model, the fit data, the detector's hyperparameters and its
    code, so a later run with all four the same loads the state instead of
    fitting again (:meth:`load_fitted` / :meth:`save_fitted`, safetensors files
    under ``fitted/`` next to the data's outputs).
    """

    def __init__(self, store: FeatureStore, model: nn.Module) -> None:
        self.store = store
        self._described = model_key(model)
        parameter = next(iter(model.parameters()), None)
        self._device_type = parameter.device.type if parameter is not None else "cpu"

    @property
    def key(self) -> dict[str, Any]:
        """The model's key as it computes now: with the autocast dtype when autocast is on (its outputs differ)."""
        described = dict(self._described)
        if torch.is_autocast_enabled(self._device_type):
            described["autocast"] = str(torch.get_autocast_dtype(self._device_type))
        return {"digest": _digest(described), **described}

    def fitted_path(self, detector: Detector, data_fingerprint: str) -> Path:
        """Where the fitted state of ``detector`` on this model and data is kept."""
        cls = type(detector)
        described = {
            "detector": detector.name,
            "hyperparameters": json.loads(json.dumps(detector.hyperparameters(), default=list)),
            "code": hashlib.sha256(Path(inspect.getfile(cls)).read_bytes()).hexdigest(),
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "version": STORE_VERSION,
        }
        key = self.key
        directory = self.store._directory(key["digest"], data_fingerprint) / "fitted"
        return directory / f"{detector.name}-{_digest(described)[:24]}.safetensors"

    def load_fitted(self, detector: Detector, data_fingerprint: str) -> bool:
        """Install the stored fitted state of ``detector`` (True), or leave it as it is (False: none stored)."""
        from .serialization import load_detector

        path = self.fitted_path(detector, data_fingerprint)
        found = all_reduce_max(torch.tensor(0 if path.is_file() else 1)).item() == 0  # every rank or none
        if not found:
            return False
        loaded, _, _ = load_detector(path)
        device = next((b.device for b in detector.buffers()), None)
        detector.load_fitted_state(loaded.fitted_state(), device=device)
        detector._set_fingerprint(loaded.model_fingerprint)
        return True

    def save_fitted(self, detector: Detector, data_fingerprint: str) -> None:
        """Store the fitted state of ``detector`` (every rank calls it; rank 0 writes, atomically)."""
        from .serialization import save_detector

        path = self.fitted_path(detector, data_fingerprint)
        temporary = path.with_name(f"{_TEMPORARY}{path.name}-{uuid.uuid4().hex}")
        if world()[0] == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        save = save_detector if world()[0] == 0 else _state_only
        save(detector, temporary)  # the state is gathered on every rank (a sharded bank), written on rank 0
        if world()[0] == 0:
            os.replace(temporary, path)
        barrier()


def _state_only(detector: Detector, path: Path) -> None:
    detector.fitted_state()  # take part in the gather of a sharded state, write nothing


def as_store(cache_dir: str | os.PathLike | FeatureStore | None) -> FeatureStore | None:
    """A :class:`FeatureStore` from a directory (None stays None)."""
    if cache_dir is None or isinstance(cache_dir, FeatureStore):
        return cache_dir
    return FeatureStore(cache_dir)
