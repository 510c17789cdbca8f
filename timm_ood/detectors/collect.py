"""Collecting fitted state that is not a sum from every process.

Sufficient statistics that are sums are all-reduced with
:func:`~timm_ood.detectors.base.all_reduce_sum`. Per-class order statistics
(``gram``, ``openmax``) are gathered from every process with
:func:`gather_stacked`, built on the same all-reduce so that it needs nothing
but a process group; rows are gathered with
:func:`timm_ood.distributed.all_gather_rows`.
"""

from __future__ import annotations

import torch

from ..distributed import all_reduce_sum, world

__all__ = ["gather_stacked"]


def gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` from every process stacked on a new first dimension, [world, ...] (all ranks in order).

    Every process must pass a tensor of the same shape; without torch.distributed
    the result is ``tensor[None]``.
    """
    rank, size = world()
    if size == 1:
        return tensor[None]
    stacked = tensor.new_zeros(size, *tensor.shape)
    stacked[rank] = tensor
    all_reduce_sum(stacked)
    return stacked
