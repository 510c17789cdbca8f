"""What :func:`~timm_ood.training.fit` does under torch.distributed: each rank's part of the data, replicas in step.

Only called with an initialised process group of more than one process:

- :func:`rank_loader`: this rank's training batches, the same number on every rank;
- :func:`shard_outliers`: this rank's part of an iterable of auxiliary outlier batches;
- :func:`broadcast_from_main`, :func:`average_gradients`, :func:`sync_buffers`:
  rank 0's initial weights everywhere, gradients averaged after each backward (the
  update of ``DistributedDataParallel``, by hand), running statistics averaged after
  each epoch (as timm's ``distribute_bn(reduce=True)``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

from ..distributed import all_reduce_max, all_reduce_sum, collective_device, world
from ..passes import shard

__all__ = ["average_gradients", "broadcast_from_main", "rank_loader", "shard_outliers", "sync_buffers"]


class GlobalBatches(Sampler[list[int]]):
    """This rank's ``batch_size`` rows of every full global batch of ``world_size * batch_size`` rows.

    The rows come in the order one process would read them (a :class:`RandomSampler`
    over ``generator``, seeded alike on every rank, or in order): rank ``r`` takes
    rows ``[r * batch_size, (r + 1) * batch_size)`` of each global batch. The last,
    incomplete global batch is dropped, so every rank has ``len(self)`` batches.
    """

    def __init__(self, rows: int, batch_size: int, rank: int, world_size: int,
                 generator: torch.Generator | None) -> None:
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        # the whole permutation is drawn, so the generator advances as in one process's epoch
        order: Sequence[int] = range(self.rows)
        if self.generator is not None:
            order = list(RandomSampler(order, generator=self.generator))
        step = self.batch_size * self.world_size
        for start in range(self.rank * self.batch_size, len(self) * step, step):
            yield list(order[start:start + self.batch_size])

    def __len__(self) -> int:
        return self.rows // (self.batch_size * self.world_size)


class _FirstSteps:
    """The first ``steps`` batches of ``data`` each pass; the rest is read and dropped.

    Reading to the end lets a sampler's generator advance as in a full pass, so
    ranks sharing a seeded order keep sharing it; a ``DistributedSampler`` gets
    ``set_epoch`` before each pass.
    """

    def __init__(self, data: Iterable, steps: int) -> None:
        self.data, self.steps, self.epoch = data, steps, 0

    def __iter__(self) -> Iterator:
        for sampler in _samplers(self.data):
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(self.epoch)
        self.epoch += 1
        batches = iter(self.data)
        yield from itertools.islice(batches, self.steps)
        for _ in batches:
            pass

    def __len__(self) -> int:
        return self.steps


def _samplers(data: Iterable) -> list:
    if not isinstance(data, DataLoader):
        return []
    return [data.sampler, getattr(data.batch_sampler, "sampler", None)]


def _min_over_ranks(value: int) -> int:
    return -int(all_reduce_max(torch.tensor(-value, dtype=torch.long)))


def rank_loader(loader: Iterable, seed: int) -> tuple[Iterable, int]:
    """This rank's training batches and their number per epoch, the same on every rank.

    - a loader of ``make_loader`` over a map-style dataset (as ``fit`` makes from a
      ``Dataset``): :class:`GlobalBatches` of its batch size, shuffled with its seed
      (else ``seed``) when it shuffles;
    - anything else is split by :func:`timm_ood.passes.shard` and every rank trains on
      as many batches as the rank with the fewest (the others' extra batches are read
      and dropped).

    Raises:
        ValueError: a DataLoader shuffled without a generator (each rank would draw
            its own order), or too little data for one batch on every rank.
    """
    from ..data.loaders import ModelLoader

    rank, size = world()
    if isinstance(loader, ModelLoader) and not isinstance(loader.dataset, IterableDataset):
        settings = loader.settings
        rows = len(cast(Sized, loader.dataset))  # make_loader's batches of a map-style dataset have a length
        shuffled = settings.seed if settings.seed is not None else seed
        generator = torch.Generator().manual_seed(shuffled) if settings.shuffle else None
        sampler = GlobalBatches(rows, settings.batch_size, rank, size, generator)
        if len(sampler) == 0:
            raise ValueError(
                f"train_data has {rows} rows, fewer than one global batch of {size} processes x "
                f"batch_size {settings.batch_size}: lower batch_size to at most {rows // size}"
            )
        local = DataLoader(loader.dataset, sampler=sampler, batch_size=None, num_workers=loader.num_workers)
        return local, len(sampler)
    if any(getattr(sampler, "generator", False) is None for sampler in _samplers(loader)):
        raise ValueError(
            "train_data is a DataLoader shuffled without a generator: under torch.distributed every process would "
            "draw its own order and their batches would overlap. Seed the order alike on every process "
            "(DataLoader(..., shuffle=True, generator=torch.Generator().manual_seed(0))), use a DistributedSampler, "
            "or pass the Hugging Face Dataset itself"
        )
    part = shard(loader)
    if not isinstance(part, Sized):  # the error len(part) raises
        raise TypeError(f"object of type {type(part).__name__!r} has no len()")
    steps = _min_over_ranks(len(part))
    if steps == 0:
        raise ValueError(
            f"train_data has too few batches for {size} processes: every process needs at least one. "
            "Use smaller batches or more data"
        )
    return _FirstSteps(part, steps), steps


def shard_outliers(outliers: Iterable) -> Iterable:
    """This rank's part of an iterable of outlier batches (:func:`timm_ood.passes.shard`), not empty on any rank."""
    local = shard(outliers)
    try:
        count = len(local) if isinstance(local, Sized) else None
    except TypeError:  # a DataLoader over an IterableDataset without a length
        count = None
    if count is None:  # a stream: its length is unknown on every rank alike
        return local
    if _min_over_ranks(count) == 0:
        raise ValueError(
            f"the outlier data has too few batches for {world()[1]} processes: every process needs at least one. "
            "Use smaller outlier batches"
        )
    return local


def _broadcast(tensors: Iterable[torch.Tensor]) -> None:
    device = collective_device()
    for tensor in tensors:
        tensor = tensor.detach()
        moved = tensor.to(device)
        dist.broadcast(moved, src=0)
        if moved is not tensor:
            tensor.copy_(moved)


def broadcast_from_main(modules: Sequence[torch.nn.Module]) -> None:
    """Rank 0's parameters and buffers in ``modules`` on every rank (as ``DistributedDataParallel`` starts)."""
    _broadcast({id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}.values())


def average_gradients(parameters: Sequence[torch.Tensor]) -> None:
    """Each gradient becomes its mean over the ranks, one all-reduce per device and dtype.

    A parameter with no gradient on a rank counts as zero there; one with no
    gradient on any rank keeps none (the optimiser skips it, as in one process).
    """
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.long)
    all_reduce_sum(present)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for parameter, count in zip(parameters, present.tolist(), strict=True):
        if count:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            groups.setdefault((parameter.grad.device, parameter.grad.dtype), []).append(parameter.grad)
    size = world()[1]
    for grads in groups.values():
        flat = torch.cat([g.flatten() for g in grads])
        all_reduce_sum(flat)
        flat /= size
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(mean.view_as(grad))


def sync_buffers(modules: Sequence[torch.nn.Module]) -> None:
    """Running statistics (``running_mean``, ``running_var``) become their mean over the ranks; other buffers rank 0's.

    The statistics are averaged as timm's ``distribute_bn(reduce=True)`` does; any
    other buffer is copied, so constants stay exact whatever the number of ranks.
    """
    buffers = {id(b): (name, b) for m in modules for name, b in m.named_buffers()}
    averaged = [b for name, b in buffers.values() if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    all_reduce_sum(*averaged)
    for buffer in averaged:
        buffer /= world()[1]
    _broadcast(b for name, b in buffers.values() if name.rsplit(".", 1)[-1] not in ("running_mean", "running_var"))
