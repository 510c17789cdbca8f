"""torch.distributed in one place: who this process is, and the few collectives the driver needs.

Every function works without a process group (one process: rank 0 of 1, and
the collectives return their input), so the same code runs under ``torchrun``,
Accelerate or Lightning and in a plain script. Collectives take and return
tensors on the process group's device (CPU for gloo, the rank's GPU for NCCL):
:func:`collective_device` says which.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_rows",
    "all_gather_rows_and_counts",
    "all_gather_stacked",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "collective_device",
    "is_main_process",
    "world",
]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes reports and stores."""
    return world()[0] == 0


def collective_device() -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors over processes in place (a no-op in one process)."""
    if world()[1] > 1:
        for tensor in tensors:
            _in_place(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over processes (``tensor`` itself in one process)."""
    if world()[1] > 1:
        _in_place(tensor, dist.ReduceOp.MAX)
    return tensor


def _in_place(tensor: torch.Tensor, op: dist.ReduceOp | dist.ReduceOp.RedOpType) -> None:
    device = collective_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=op)
        return
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    tensor.copy_(moved)


def all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every process stacked in rank order, [world, ...] (the same shape on every process).

    In one process: ``tensor[None]``.
    """
    size = world()[1]
    if size == 1:
        return tensor[None]
    local = tensor.to(collective_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return torch.stack(parts).to(tensor.device)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process concatenated in rank order, [ΣN_rank, ...]; counts may differ, 0 included.

    Every process passes the same trailing shape and dtype. In one process the
    rows are returned as they are.
    """
    return all_gather_rows_and_counts(rows)[0]


def all_gather_rows_and_counts(rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """:func:`all_gather_rows` and each rank's row count, in rank order (two ``all_gather`` calls)."""
    size = world()[1]
    if size == 1:
        return rows, [rows.shape[0]]
    device = collective_device()
    counts = all_gather_stacked(torch.tensor(rows.shape[0], dtype=torch.long)).tolist()
    longest = max(counts)
    if longest == 0:
        return rows, counts
    padded = rows.new_zeros(longest, *rows.shape[1:], device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded)
    merged = torch.cat([part[:c] for part, c in zip(gathered, counts, strict=True)])
    return merged.to(rows.device), counts


def broadcast_object(value: Any, source: int = 0) -> Any:
    """``value`` of rank ``source`` on every process (picklable Python objects only; one process: ``value``)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def barrier() -> None:
    """Wait for every process (a no-op in one process)."""
    if world()[1] > 1:
        dist.barrier()
