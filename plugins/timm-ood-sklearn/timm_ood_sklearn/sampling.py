"""Streaming statistics of features: exact moments, and a bounded uniform sample."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FeatureMoments", "FeatureReservoir"]


class FeatureMoments:
    """Per-feature mean and standard deviation over a stream of batches, in float64.

    Accumulates the count, the sum and the sum of squares; :meth:`finish`
    returns the mean and the population standard deviation, with 1 for a
    feature that is constant (as scikit-learn's ``StandardScaler``), so that
    standardising never divides by zero.
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_squares: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [N, D]."""
        features = features.detach().to(torch.float64)
        if self.total is None:
            self.total = features.new_zeros(features.shape[1])
            self.total_squares = features.new_zeros(features.shape[1])
        self.count += features.shape[0]
        self.total += features.sum(dim=0)
        self.total_squares += features.square().sum(dim=0)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [D], scale [D])`` of everything seen.

        Raises:
            ValueError: no features were seen.
        """
        if self.count == 0 or self.total is None:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        mean = self.total / self.count
        std = (self.total_squares / self.count - mean.square()).clamp_min(0).sqrt()
        constant = std <= 1e-8 * mean.abs().clamp_min(1.0)
        return mean, torch.where(constant, torch.ones_like(std), std)


class FeatureReservoir:
    """A uniform random sample of at most ``capacity`` rows from a stream of batches.

    Every row gets an independent uniform random key and the sample is the
    ``capacity`` rows with the smallest keys (bottom-k sampling, Efraimidis &
    Spirakis 2006 with unit weights): a uniform sample without replacement,
    the same whatever the batch sizes, since keys are drawn row by row from
    one seeded generator. Rows whose key cannot make the sample are dropped
    at once, and the kept rows are compacted whenever they reach twice the
    capacity, so memory stays below ``2 * capacity`` rows plus one batch.
    Rows are kept on the CPU in their dtype (at least float32).

    Args:
        capacity: the most rows to keep (>= 1).
        seed: seed of the key generator (None: fresh entropy).
    """

    def __init__(self, capacity: int, seed: int | None = 0) -> None:
        if capacity < 1:
            raise ValueError(f"the reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._generator = np.random.default_rng(seed)
        self._keys: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        self._kept = 0
        self._largest_kept_key = float("inf")

    @property
    def held(self) -> int:
        """How many rows are in memory now (at most ``2 * capacity`` plus one batch)."""
        return self._kept

    def add(self, rows: torch.Tensor) -> None:
        """Offer a batch of rows [N, D] to the sample."""
        rows = rows.detach().flatten(1)
        rows = rows.to("cpu", torch.promote_types(rows.dtype, torch.float32))
        keys = torch.from_numpy(self._generator.random(rows.shape[0]))
        self.seen += rows.shape[0]
        candidates = keys < self._largest_kept_key
        if not bool(candidates.all()):
            keys, rows = keys[candidates], rows[candidates]
        self._keys.append(keys)
        self._rows.append(rows)
        self._kept += keys.shape[0]
        if self._kept >= 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        keys, rows = torch.cat(self._keys), torch.cat(self._rows)
        if keys.shape[0] > self.capacity:
            smallest = keys.topk(self.capacity, largest=False).indices
            keys, rows = keys[smallest], rows[smallest]
            self._largest_kept_key = float(keys.max())
        self._keys, self._rows, self._kept = [keys], [rows], keys.shape[0]

    def sample(self) -> torch.Tensor:
        """The sampled rows [min(seen, capacity), D], ordered by key (independent of batching).

        Raises:
            ValueError: no rows were offered.
        """
        if self.seen == 0:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        self._compact()
        return self._rows[0][self._keys[0].argsort()]
