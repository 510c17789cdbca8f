"""Percentiles of activations: exact for a tensor at hand, streamed for a whole data set.

ReAct and VRA clip activations at percentiles of *all* in-distribution
activations, N x D values for N training images: too many to keep. A
:class:`StreamingHistogram` keeps a fixed number of counts instead (512 KiB),
on a grid that coarsens by powers of two as larger values arrive, so that

- memory is bounded and independent of N;
- the result does not depend on the order or size of the batches: the counts
  are exactly those of one histogram drawn on the final grid;
- processes merge by summing counts (torch.distributed);
- a percentile is within one bin width of NumPy's ``np.percentile`` (linear
  interpolation) of all the values: at most ``max|a| / 16384`` with the
  default 2^16 bins, where ``max|a|`` is the largest magnitude seen.
"""

from __future__ import annotations

import math

import torch

from ..distributed import all_reduce_max, all_reduce_sum

__all__ = ["HISTOGRAM_BINS", "StreamingHistogram", "histogram_percentile", "linear_percentile"]

#: Bins of a :class:`StreamingHistogram`: a percentile is exact to 2 max|a| / 2^15.
HISTOGRAM_BINS = 2**16
#: Bin width 2^-64 before any non-zero value is seen (all values are then exactly 0).
_SMALLEST_EXPONENT = -64


def linear_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of all ``values``, as ``np.percentile`` (linear interpolation).

    Unlike ``torch.quantile`` it takes tensors of any size; two selections, no sort.

    Args:
        values: any tensor; every element counts.
        percentile: in [0, 100].

    Returns:
        A 0-d tensor in the dtype of ``values``.
    """
    flat = values.flatten()
    position = (flat.numel() - 1) * float(percentile) / 100
    below = math.floor(position)
    low = flat.kthvalue(below + 1).values
    if below + 1 >= flat.numel() or position == below:
        return low
    return low + (position - below) * (flat.kthvalue(below + 2).values - low)


def _coarsen(counts: torch.Tensor, steps: int) -> torch.Tensor:
    """Counts of the same values on a grid ``2**steps`` times coarser (bins nest exactly)."""
    if steps <= 0:
        return counts
    half = counts.numel() // 2
    index = torch.arange(counts.numel(), device=counts.device) - half
    # bin i covers [(i - half) w, (i - half + 1) w): it lies inside coarse bin half + floor((i - half) / 2^s)
    coarse = half + torch.bitwise_right_shift(index, min(steps, 32))
    return torch.zeros_like(counts).index_add_(0, coarse, counts)


class StreamingHistogram:
    """Counts of every value seen on the grid ``[(i - B/2) w, (i - B/2 + 1) w)``, ``w = 2**exponent``.

    The exponent is the smallest that covers the largest magnitude seen
    (``B/2 · w >= max|a|``); when a larger value arrives, the counts are merged
    into a grid 2, 4, ... times coarser, whose bins contain the old ones
    exactly. Fit with :meth:`update` per batch, then :meth:`finish`.

    Args:
        bins: number of bins B, a power of two.
    """

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.counts: torch.Tensor | None = None
        self.exponent = _SMALLEST_EXPONENT

    def _exponent_for(self, magnitude: float) -> int:
        if magnitude == 0:
            return _SMALLEST_EXPONENT
        mantissa, exponent = math.frexp(magnitude / (self.bins // 2))  # magnitude / (B/2) = mantissa 2^exponent
        return max(exponent - 1 if mantissa == 0.5 else exponent, _SMALLEST_EXPONENT)

    def update(self, values: torch.Tensor) -> None:
        """Count every element of ``values``.

        Raises:
            ValueError: a value is NaN or infinite.
        """
        values = values.detach().flatten().to(torch.float64)
        if values.numel() == 0:
            return
        magnitude = float(values.abs().max())
        if not math.isfinite(magnitude):
            raise ValueError("activations contain NaN or infinite values; check the inputs and the model")
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.int64, device=values.device)
        exponent = self._exponent_for(magnitude)
        if exponent > self.exponent:
            self.counts = _coarsen(self.counts, exponent - self.exponent)
            self.exponent = exponent
        index = torch.floor(torch.ldexp(values, torch.tensor(-self.exponent, device=values.device)))
        index = (index + self.bins // 2).clamp_(0, self.bins - 1).to(torch.int64)
        self.counts += torch.bincount(index, minlength=self.bins)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [B] int64, exponent 0-d int64)`` merged over processes.

        Raises:
            ValueError: no value was seen.
        """
        if self.counts is None:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        exponent = torch.tensor(self.exponent, dtype=torch.int64, device=self.counts.device)
        all_reduce_max(exponent)
        counts = _coarsen(self.counts, int(exponent) - self.exponent)
        all_reduce_sum(counts)
        return counts, exponent


def histogram_percentile(counts: torch.Tensor, exponent: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of the values a :class:`StreamingHistogram` counted.

    NumPy's linear interpolation between the order statistics at ranks
    ``floor(h)`` and ``ceil(h)``, ``h = (N - 1) p / 100``, each placed inside
    its bin as if the bin's values were evenly spread: every order statistic,
    and so the result, is off by less than one bin width.

    Args:
        counts: the histogram's counts [B].
        exponent: its bin width is ``2**exponent``.
        percentile: in [0, 100].

    Returns:
        A 0-d float64 tensor on the device of ``counts``.
    """
    cumulative = counts.cumsum(0)
    total = int(cumulative[-1])
    position = (total - 1) * float(percentile) / 100
    ranks = torch.tensor([math.floor(position), math.ceil(position)], device=counts.device)
    bins = torch.searchsorted(cumulative, ranks, right=True)  # first bin holding more than `rank` values
    before = torch.where(bins > 0, cumulative[(bins - 1).clamp_min(0)], 0)
    within = (ranks - before).to(torch.float64) + 0.5
    width = 2.0 ** int(exponent)
    values = (bins - counts.numel() // 2).to(torch.float64) * width + width * within / counts[bins].to(torch.float64)
    return values[0] + (position - math.floor(position)) * (values[1] - values[0])
