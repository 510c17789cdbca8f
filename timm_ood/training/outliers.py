"""Where a training step's auxiliary outlier batch comes from.

An :class:`OutlierSource` hands the loop one batch of outlier images per step.
:class:`CyclingOutliers` cycles through any iterable of batches (a DataLoader
over the benchmark's auxiliary set); samplers that choose outliers with the
current model (GReg+'s energy-based sampling) implement the same method.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..batches import split_batch

__all__ = ["CyclingOutliers", "OutlierSource", "as_outlier_source"]


@runtime_checkable
class OutlierSource(Protocol):
    """Gives the training loop one outlier batch per step."""

    def next_batch(self, model: nn.Module, id_batch_size: int) -> torch.Tensor:
        """Outlier images [N, C, H, W] for a step whose in-distribution batch has ``id_batch_size`` images."""
        ...


class CyclingOutliers:
    """Outlier batches from an iterable, restarted whenever it is exhausted."""

    def __init__(self, data: Iterable) -> None:
        self.data = data
        self._batches: Iterator | None = None

    def next_batch(self, model: nn.Module, id_batch_size: int) -> torch.Tensor:
        for _ in range(2):
            if self._batches is not None:
                try:
                    return split_batch(next(self._batches))[0]
                except StopIteration:
                    pass
            self._batches = iter(self.data)
        raise ValueError("the outlier data yielded no batches: the auxiliary set is empty")


def as_outlier_source(outliers: Iterable | OutlierSource) -> OutlierSource:
    """``outliers`` itself if it is a source, else a :class:`CyclingOutliers` over it."""
    return outliers if isinstance(outliers, OutlierSource) else CyclingOutliers(outliers)
