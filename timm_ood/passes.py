"""The driver: the only loop over data in timm-ood.

Every pass over a dataset (fitting, the held-out steps, scoring, calibration,
tuning) is one call of :func:`run_pass`::

    batches -> shard by rank -> check -> device/dtype -> eval + grad mode -> tap (or the store) -> consume

It owns everything a pass shares: the images are checked
(:func:`~timm_ood.batches.check_images`) and moved to the model's device and
dtype; the model and the detectors run in eval mode, under
``torch.inference_mode`` unless a detector takes input gradients; a progress
bar shows on a terminal; the shared forward is timed; under an initialised
torch.distributed process group each rank reads only its part of the data
(:func:`shard`); and with a feature store (:mod:`timm_ood.store`) the tap's
outputs are read from it when stored, and written to it when not.

What a pass does with each batch is the caller's ``consume(outputs, labels)``:
detectors never loop over data and never reach back into the pipeline.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ._runtime import eval_mode, model_device, model_dtype
from .batches import check_images, iter_batches
from .distributed import all_reduce_max, all_reduce_sum, world
from .store import BoundStore, StoreEntry, StoreWriter
from .tap import Need, Outputs, Tap

if TYPE_CHECKING:
    from .detectors.base import Detector

__all__ = ["PassStats", "run_pass", "score_batch", "shard"]

Consume = Callable[[Outputs, "torch.Tensor | None"], None]
#: rows per batch when outputs are read from the store for data that does not say its batch size
STORE_BATCH_SIZE = 256


@dataclass
class PassStats:
    """What one pass did.

    Attributes:
        batches: batches consumed on this process (empty lockstep batches excluded).
        images: images consumed on this process.
        total_images: images consumed by all processes together.
        forward_seconds: time in the tap's forward on this process (0 when read from the store).
        from_store: the outputs were read from the feature store.
        stored: the pass wrote its outputs to the feature store.
    """

    batches: int = 0
    images: int = 0
    total_images: int = 0
    forward_seconds: float = 0.0
    from_store: bool = False
    stored: bool = False


class _Strided:
    """Every ``size``-th batch of an iterable, starting at ``rank`` (re-iterable when the data is)."""

    def __init__(self, data: Iterable, rank: int, size: int) -> None:
        self.data, self.rank, self.size = data, rank, size

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.data), self.rank, None, self.size)

    def __len__(self) -> int:
        if not isinstance(self.data, Sized):  # the error len(self.data) raises
            raise TypeError(f"object of type {type(self.data).__name__!r} has no len()")
        return max(0, math.ceil((len(self.data) - self.rank) / self.size))


def _already_sharded(data: Iterable) -> bool:
    if not isinstance(data, DataLoader):
        return False
    # a BatchSampler keeps the sampler it batches; a custom batch sampler may have none
    sampler = getattr(data.batch_sampler, "sampler", None) if data.batch_sampler is not None else data.sampler
    return isinstance(sampler, DistributedSampler) or isinstance(data.sampler, DistributedSampler)


def shard(data: Iterable) -> Iterable:
    """This process's part of ``data`` under torch.distributed (``data`` itself in one process).

    - a loader of :func:`timm_ood.data.make_loader` reads its rank's rows
      (``datasets.distributed.split_dataset_by_node``; anything with a
      ``for_rank(rank, world_size)`` method is split by it);
    - a DataLoader with a ``DistributedSampler`` is already split: kept as it is;
    - any other iterable of batches: every ``world_size``-th batch from
      ``rank`` on (no batch padded or repeated; a rank may get none).
    """
    rank, size = world()
    if size == 1 or _already_sharded(data):
        return data
    for_rank = getattr(data, "for_rank", None)
    if callable(for_rank):
        return for_rank(rank, size)
    if not hasattr(data, "__len__") and isinstance(data, Iterator):
        return itertools.islice(data, rank, None, size)
    return _Strided(data, rank, size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_batches(
    tap: Tap, data: Iterable, needs: frozenset[Need], stats: PassStats, writer: StoreWriter | None
) -> Iterator[tuple[Outputs, torch.Tensor | None]]:
    device, dtype = model_device(tap.model), model_dtype(tap.model)
    for images, labels in iter_batches(data):
        images = check_images(images, tap).to(device=device, dtype=dtype)
        start = time.perf_counter()
        outputs = tap(images, needs)
        _synchronize(device)
        stats.forward_seconds += time.perf_counter() - start
        if writer is not None:
            writer.add(outputs, labels)
        yield outputs, labels


def _stored_batches(
    entry: StoreEntry, tap: Tap, rows: tuple[int, int], batch_size: int
) -> Iterator[tuple[Outputs, torch.Tensor | None]]:
    device, dtype = model_device(tap.model), model_dtype(tap.model)
    for outputs, labels in entry.read(tap, *rows, batch_size=batch_size):
        yield _moved(outputs, device, dtype), labels


def _moved(outputs: Outputs, device: torch.device, dtype: torch.dtype) -> Outputs:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, non_blocking=True)

    maps = outputs._intermediates
    return Outputs(None, outputs.tap, logits=move(outputs._logits), pre_logits=move(outputs._pre_logits),
                   features=move(outputs._features),
                   intermediates=None if maps is None else [m.to(device=device, non_blocking=True) for m in maps])


def _empty_from_model(tap: Tap, needs: frozenset[Need], shape: Sequence[int]) -> tuple[Outputs, torch.Tensor]:
    """Outputs of 0 images with the trailing shapes of images of ``shape`` (one zero image forwarded, then sliced)."""
    device, dtype = model_device(tap.model), model_dtype(tap.model)
    image = torch.zeros(1, *shape, device=device, dtype=dtype)
    return tap(image, needs).slice(slice(0, 0)), torch.zeros(0, dtype=torch.long)


def _agreed_image_shape(first: tuple[Outputs, torch.Tensor | None] | None) -> list[int]:
    """The [C, H, W] of the images, agreed by every rank (ranks without data learn it from the others)."""
    shape = torch.zeros(3, dtype=torch.long)
    if first is not None:
        shape = torch.tensor(first[0].inputs.shape[1:], dtype=torch.long)
    shape = all_reduce_max(shape)
    if int(shape.min()) == 0:
        raise ValueError("no process has any image to run: the data is empty on every rank")
    return shape.tolist()


def _open_store(
    store: BoundStore | None, data: Iterable, needs: frozenset[Need], gradients: bool
) -> tuple[StoreEntry | None, StoreWriter | None, frozenset[Need]]:
    """The stored entry to read, or the writer of a new one, and what the tap must compute."""
    fingerprint = getattr(data, "fingerprint", None)
    rows, total = getattr(data, "rows", None), getattr(data, "total_rows", None)
    usable = store is not None and not gradients and bool(needs) and fingerprint is not None and total is not None
    if all_reduce_max(torch.tensor(0 if usable else 1)).item():
        return None, None, needs
    # usable on every rank, so on this one
    assert store is not None and fingerprint is not None and total is not None
    key = store.key  # read now: autocast changes it
    entry = store.store.find(key, fingerprint, needs)
    missing = all_reduce_max(torch.tensor(0 if entry is not None else 1)).item()
    if not missing:
        return entry, None, needs
    # one entry holds every output this model and data were stored with, so it serves all later passes
    computed = needs | store.store.stored_needs(key, fingerprint)
    if rows is None:  # the error StoreWriter would raise reading rows[0], made clear
        raise TypeError(f"{type(data).__name__} has a fingerprint and total_rows but no rows: the feature store "
                        "needs the rows [start, stop) of the data it reads")
    return None, store.store.writer(key, fingerprint, computed, rows, total), computed


def _batch_size(data: Iterable) -> int:
    settings = getattr(data, "settings", None)
    return int(getattr(settings, "batch_size", 0) or getattr(data, "batch_size", 0) or STORE_BATCH_SIZE)


def run_pass(
    tap: Tap,
    data: Iterable,
    needs: Iterable[Need],
    consume: Consume,
    *,
    gradients: bool = False,
    modules: Sequence[nn.Module] = (),
    store: BoundStore | None = None,
    lockstep: bool = False,
    at_least_once: bool = False,
    desc: str = "",
    progress: bool | None = None,
) -> PassStats:
    """One pass over ``data``: ``consume(outputs, labels)`` for each batch, outputs holding at least ``needs``.

    Args:
        tap: the model's tap.
        data: a DataLoader or any iterable of batches (:func:`~timm_ood.batches.split_batch`).
        needs: what the tap computes for each batch.
        consume: called once per batch. ``labels`` are the batch's labels on the
            CPU (None when the batches have none).
        gradients: a consumer takes input gradients (autograd on, ``outputs.inputs``
            are the images; never read from the store).
        modules: put in eval mode for the pass, with the model (detectors).
        store: a feature store bound to this model (:meth:`timm_ood.store.FeatureStore.bind`):
            outputs of data with a fingerprint are read from it, or written to it.
        lockstep: under torch.distributed, every rank calls ``consume`` the same
            number of times, with empty outputs (0 rows) once its data is done
            (for consumers that run collectives per batch).
        at_least_once: under torch.distributed, a rank with no data calls
            ``consume`` once with empty outputs (so that its statistics take
            part in the all-reduce of a fit).
        desc: the progress bar's label.
        progress: show a progress bar (default: on a terminal).

    Returns:
        :class:`PassStats`. A pass over no image at all returns ``total_images == 0``;
        the caller says what that means.
    """
    needs = frozenset(needs)
    local = shard(data)
    stats = PassStats()
    size = world()[1]
    entry, writer, computed = _open_store(store, local, needs, gradients)
    mode = torch.no_grad if gradients else torch.inference_mode
    try:
        with eval_mode(tap.model, *modules), mode():
            if entry is not None:
                rows = getattr(local, "rows", (0, entry.rows))
                batches = _stored_batches(entry, tap, rows, _batch_size(local))
                total = math.ceil((rows[1] - rows[0]) / _batch_size(local))
                stats.from_store = True
            else:
                batches = _model_batches(tap, local, computed, stats, writer)
                total = len(local) if isinstance(local, Sized) else None
            bar = tqdm(total=total, desc=desc, leave=False, disable=None if progress is None else not progress)
            with bar:
                _drive(batches, consume, stats, bar, tap=tap, needs=computed, entry=entry,
                       lockstep=lockstep and size > 1, at_least_once=at_least_once and size > 1)
        if writer is not None:
            stats.stored = writer.commit() is not None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    counts = torch.tensor([stats.images], dtype=torch.long)
    all_reduce_sum(counts)
    stats.total_images = int(counts[0])
    return stats


def _drive(
    batches: Iterator[tuple[Outputs, torch.Tensor | None]], consume: Consume, stats: PassStats, bar: tqdm, *,
    tap: Tap, needs: frozenset[Need], entry: StoreEntry | None, lockstep: bool, at_least_once: bool,
) -> None:
    """Feed every batch to ``consume``; with ``lockstep`` / ``at_least_once`` also the empty ones the ranks agree on."""
    first = next(batches, None)
    empty: tuple[Outputs, torch.Tensor | None] | None = None
    if lockstep or at_least_once:
        if entry is not None:
            empty = entry.empty(tap)
            empty = (_moved(empty[0], model_device(tap.model), model_dtype(tap.model)), empty[1])
        else:
            empty = _empty_from_model(tap, needs, _agreed_image_shape(first))
    remaining = itertools.chain([first], batches) if first is not None else iter(())
    if lockstep:
        while True:
            item = next(remaining, None)
            if not all_reduce_max(torch.tensor(int(item is not None))).item():
                return
            assert empty is not None  # built above for lockstep
            _feed(item if item is not None else empty, item is not None, consume, stats, bar)
        return
    for item in remaining:
        _feed(item, True, consume, stats, bar)
    if at_least_once and stats.batches == 0:
        assert empty is not None  # built above for at_least_once
        _feed(empty, False, consume, stats, bar)


def _feed(item: tuple[Outputs, torch.Tensor | None], real: bool, consume: Consume, stats: PassStats, bar: tqdm) -> None:
    outputs, labels = item
    consume(outputs, labels)
    if real:
        stats.batches += 1
        stats.images += len(outputs)
        bar.update()


def score_batch(tap: Tap, detector: Detector, images: torch.Tensor) -> torch.Tensor:
    """Scores [B] of one batch of images: the step of every pass, for ``OODModel.ood_score`` (no loop)."""
    requirements = detector.requirements
    images = check_images(images, tap).to(device=model_device(tap.model))
    mode = torch.no_grad if requirements.input_gradients else torch.inference_mode
    with eval_mode(tap.model, detector), mode():
        return detector(tap(images, requirements.outputs))
