"""GReg+'s energy-based sampling of auxiliary outliers (Sharifi et al., ECCV 2024, Sec. 4.2, Algorithm 1).

Each training step, a pool of candidate auxiliary images is embedded by the
current model (eval mode, no gradient) as L2-normalised pre-logits,
clustered by k-means with k = the ID batch size, and from every cluster the
lowest-energy candidate (useful to the energy hinge ``L_S``) and the
highest-energy one (useful to the gradient penalty ``L_∇S``) are kept: 2k
outliers for the step. :class:`EnergyClusterSampler` is an
:class:`~timm_ood.training.OutlierSource`; pass it to :func:`timm_ood.training.fit`
as ``outliers=`` together with :class:`~timm_ood.training.GRegObjective`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime import eval_mode, model_device
from ..errors import IncompatibleModelError
from ..model_info import timm_api
from .energy import energy_score
from .outliers import OutlierSource, as_outlier_source

__all__ = ["EnergyClusterSampler", "SamplingTimings", "cluster_energy_extremes", "kmeans"]


def kmeans(points: torch.Tensor, k: int, *, iterations: int = 10, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Lloyd's k-means in torch, vectorised over points and clusters: the cluster of each point.

    Centroids start at ``k`` distinct points chosen by k-means++ (Arthur &
    Vassilvitskii 2007: each next one drawn with probability proportional to
    its squared distance to the nearest chosen one; seeded; one start, where
    scikit-learn, which the GReg code uses, keeps the best of three). Seeding
    loops over the k centroids (one vectorised distance update each); Lloyd
    rounds stop after ``iterations`` or when no assignment changes. A cluster
    that loses all its points keeps its centroid.

    Args:
        points: [N, D] (GReg+ passes unit-norm pre-logits).
        k: number of clusters, 1 <= k <= N.
        iterations: at most this many assignment/update rounds (>= 1).
        generator: a CPU generator for the initial draw (seeded runs).

    Returns:
        Cluster indices [N] (int64, in ``[0, k)``, some clusters possibly empty).

    Raises:
        ValueError: ``k`` out of range, ``iterations < 1`` or points not [N, D].
    """
    if points.ndim != 2:
        raise ValueError(f"kmeans needs points [N, D], got shape {tuple(points.shape)}")
    if not 1 <= k <= len(points):
        raise ValueError(f"kmeans needs 1 <= k <= the number of points ({len(points)}), got k={k}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    centroids = points[_kmeans_plus_plus(points, k, generator)]
    assignments = torch.cdist(points, centroids).argmin(dim=1)
    for _ in range(iterations - 1):
        counts = torch.bincount(assignments, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, points)
        centroids = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None].to(points.dtype), centroids)
        updated = torch.cdist(points, centroids).argmin(dim=1)
        if torch.equal(updated, assignments):
            break
        assignments = updated
    return assignments


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k distinct seed indices by D^2 sampling (duplicates of chosen points are drawn last, uniformly)."""
    available = torch.ones(len(points), dtype=torch.bool)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = torch.randint(len(points), (1,), generator=generator)
    available[chosen[0]] = False
    nearest = (points - points[chosen[0]]).square().sum(dim=1).cpu()
    for i in range(1, k):
        weights = torch.where(available, nearest + 1e-12, 0.0)
        chosen[i] = torch.multinomial(weights, 1, generator=generator)
        available[chosen[i]] = False
        nearest = torch.minimum(nearest, (points - points[chosen[i]]).square().sum(dim=1).cpu())
    return chosen.to(points.device)


def cluster_energy_extremes(assignments: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
    """The lowest- and the highest-energy point of every non-empty cluster (Algorithm 1's picks).

    A singleton cluster gives its one point once; ties go to the lower index.

    Args:
        assignments: cluster index of each point [N] (int64, >= 0).
        energies: the energy score of each point [N].

    Returns:
        Sorted distinct point indices [M], ``non-empty clusters <= M <= 2 * non-empty clusters``.

    Raises:
        ValueError: mismatched or empty inputs.
    """
    if assignments.ndim != 1 or assignments.shape != energies.shape or len(assignments) == 0:
        raise ValueError(f"need non-empty, equally long [N] assignments and energies, got shapes "
                         f"{tuple(assignments.shape)} and {tuple(energies.shape)}")
    by_energy = torch.argsort(energies, stable=True)
    order = by_energy[torch.argsort(assignments[by_energy], stable=True)]  # by cluster, then energy
    counts = torch.bincount(assignments)
    ends = counts.cumsum(0)
    nonempty = counts > 0
    lowest, highest = order[(ends - counts)[nonempty]], order[ends[nonempty] - 1]
    return torch.unique(torch.cat([lowest, highest]))


@dataclass
class SamplingTimings:
    """Wall-clock seconds an :class:`EnergyClusterSampler` spent, summed over its steps."""

    steps: int = 0
    embed_seconds: float = 0.0
    kmeans_seconds: float = 0.0


class EnergyClusterSampler:
    """GReg+ outlier sampling (Sharifi et al., ECCV 2024, Algorithm 1) as an ``OutlierSource``.

    Per step, for an ID batch of B images: draw ``round(pool_ratio * B)``
    candidates from ``candidates``; embed them with the current model in eval
    mode without gradient, ``z = normalize(forward_head(forward_features(x),
    pre_logits=True))``, and score their energy ``-logsumexp(logits)``; cluster
    ``z`` by :func:`kmeans` with ``k = B``; keep each cluster's lowest- and
    highest-energy candidate (:func:`cluster_energy_extremes`), and fill the
    shortfall left by singleton or empty clusters with candidates drawn at
    random, as the authors' code does: 2B outliers per step (the paper's 1:2
    in:out ratio). Both picks of a cluster go to every loss term; the hinges
    decide which term each one feeds.

    Choices the paper leaves open, made here: the pool is ``pool_ratio`` ID
    batches (6, the paper's CIFAR setting: 300K auxiliary / 50K ID images, so
    each epoch passes over the auxiliary set once; set it to
    ``|auxiliary| / |ID|`` for that property elsewhere); candidates are taken
    in order from ``candidates`` (shuffle the loader); k-means is
    :func:`kmeans` (one seeded k-means++ start, at most ``kmeans_iterations``
    Lloyd rounds) instead of scikit-learn's best of three starts run to
    convergence, so that it runs on the model's device in a fraction of a
    training step.

    Args:
        candidates: the auxiliary set (cycled): a DataLoader or iterable of
            batches, a Hugging Face dataset with an ``image`` column (loaded on
            the first step with that step's model's data config, in batches of the
            ID batch size, reshuffled with ``seed`` on every pass; see
            :func:`~timm_ood.training.outliers.outlier_batches`), or an ``OutlierSource``.
        pool_ratio: candidates per ID image per step (>= 2, so 2B picks exist).
        kmeans_iterations: Lloyd rounds at most.
        embed_batch_size: candidates embedded per forward.
        seed: seeds k-means starts and the random fill.

    Raises:
        ValueError: bad settings; on a step, candidates that yield an empty batch.
        IncompatibleModelError: on a step, a model without timm's
            ``forward_features`` / ``forward_head(pre_logits=True)``.
    """

    def __init__(self, candidates: Iterable | OutlierSource | Any, *, pool_ratio: float = 6.0, kmeans_iterations: int = 10,
                 embed_batch_size: int = 512, seed: int = 0) -> None:
        if not pool_ratio >= 2:
            raise ValueError(f"pool_ratio must be >= 2 (each step keeps 2 outliers per ID image), got {pool_ratio!r}")
        if kmeans_iterations < 1 or embed_batch_size < 1:
            raise ValueError(f"kmeans_iterations and embed_batch_size must be >= 1, got {kmeans_iterations} and "
                             f"{embed_batch_size}")
        self.candidates = as_outlier_source(candidates, seed=seed)
        self.pool_ratio, self.kmeans_iterations, self.embed_batch_size = pool_ratio, kmeans_iterations, embed_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.timings = SamplingTimings()
        self._leftover: torch.Tensor | None = None

    def next_batch(self, model: nn.Module, id_batch_size: int) -> torch.Tensor:
        pool = self._draw(model, round(self.pool_ratio * id_batch_size), id_batch_size)
        start = time.perf_counter()
        pre_logits, energies = self.embed(model, pool)
        middle = time.perf_counter()
        picks = self.select(pre_logits, energies, k=id_batch_size)
        self.timings.steps += 1
        self.timings.embed_seconds += middle - start
        self.timings.kmeans_seconds += time.perf_counter() - middle
        return pool[picks.cpu()]

    @torch.no_grad()
    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised pre-logits [N, D] and energies [N] of ``images``, in eval mode, without gradient."""
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise IncompatibleModelError(f"GReg+ sampling embeds candidates with timm's forward_features / "
                                         f"forward_head(pre_logits=True), which {type(model).__name__} lacks")
        device, pre_logits, energies = model_device(model), [], []
        timm_model = timm_api(model)  # both methods checked above
        with eval_mode(model):
            for chunk in images.split(self.embed_batch_size):
                maps = timm_model.forward_features(chunk.to(device))
                pre_logits.append(F.normalize(timm_model.forward_head(maps, pre_logits=True).flatten(1), dim=1))
                energies.append(energy_score(timm_model.forward_head(maps)))
        return torch.cat(pre_logits), torch.cat(energies)

    def select(self, pre_logits: torch.Tensor, energies: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the step's 2k outliers among the candidates: per-cluster extremes, then a random fill."""
        assignments = kmeans(pre_logits, k, iterations=self.kmeans_iterations, generator=self.generator)
        picks = cluster_energy_extremes(assignments, energies)
        shortfall = min(2 * k, len(pre_logits)) - len(picks)
        if shortfall > 0:
            unpicked = torch.ones(len(pre_logits), dtype=torch.bool, device=picks.device)
            unpicked[picks] = False
            rest = unpicked.nonzero().squeeze(1)
            picks = torch.cat([picks, rest[torch.randperm(len(rest), generator=self.generator)[:shortfall]
                                           .to(rest.device)]])
        return picks

    def _draw(self, model: nn.Module, count: int, id_batch_size: int) -> torch.Tensor:
        """``count`` candidates, in order, from the auxiliary batches (the rest is kept for the next step)."""
        batches = [] if self._leftover is None else [self._leftover]
        drawn = 0 if self._leftover is None else len(self._leftover)
        while drawn < count:
            batch = self.candidates.next_batch(model, id_batch_size).cpu()
            if len(batch) == 0:
                raise ValueError("the auxiliary candidates yielded an empty batch")
            batches.append(batch)
            drawn += len(batch)
        pool = torch.cat(batches)
        self._leftover = pool[count:] if drawn > count else None
        return pool[:count]
