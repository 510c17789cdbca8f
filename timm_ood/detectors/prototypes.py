"""Detectors built on class prototypes: the mean activation of the correctly classified training images.

- ``she``: Simplified Hopfield Energy, the inner product of the pre-logits with
  the stored pattern of the predicted class;
- ``openmax``: OpenMax, per-class Weibull models of the distances to the mean
  activation vectors, recalibrating the logits with an "unknown" class.

Both fit on labelled in-distribution data and keep only training images the
model classifies correctly (the papers' choice). A class without any has no
prototype; what each detector then does is said in its docstring.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..distributed import all_gather_stacked
from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, fit_in_progress, score_dtype

__all__ = ["SHE", "OpenMax", "WeibullFit", "fit_weibull"]


class _CorrectClassMeans:
    """Streaming per-class sums and counts of the correctly classified samples' vectors, in float64."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def update(self, vectors: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, who: str) -> None:
        labels = labels.to(device=logits.device, dtype=torch.long)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{who}: fit data contains negative labels (OOD samples): fit on in-distribution data only")
        vectors = vectors.detach().flatten(1).to(torch.float64)
        sums, counts = self.sums, self.counts
        if sums is None or counts is None:  # the two are set together
            sums = self.sums = vectors.new_zeros(logits.shape[1], vectors.shape[1])
            counts = self.counts = vectors.new_zeros(logits.shape[1])
        correct = logits.argmax(dim=1) == labels
        sums.index_add_(0, labels[correct], vectors[correct])
        counts += torch.bincount(labels[correct], minlength=len(counts)).to(torch.float64)  # in place

    def finish(self, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means [K, D], has_mean [K])``, zero means for classes without a correct sample (with a warning)."""
        sums, counts = self.sums, self.counts
        if sums is None or counts is None:  # the two are set together
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(sums, counts)
        has_mean = counts > 0
        if not bool(has_mean.any()):
            raise ValueError(f"{who}: the model classifies none of the fit images correctly")
        if not bool(has_mean.all()):
            missing = torch.nonzero(~has_mean).squeeze(1).tolist()
            warnings.warn(f"{who}: no correctly classified fit image of classes {missing}", stacklevel=3)
        return sums / counts.clamp_min(1)[:, None], has_mean


def _check_labels(detector: Detector, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError(f"{detector.name} needs class labels to fit: pass (images, labels) batches")
    return labels


class SHE(Detector):
    """Simplified Hopfield Energy (Zhang et al., ICLR 2023).

    Fit (labels used): the stored pattern ``S_c`` of each class, the mean
    pre-logits of the training images of class c that the model
    classifies correctly. Paper score: ``ξᵀ S_ŷ`` for the pre-logits ``ξ`` of an
    input and its predicted class ŷ (the negated simplified Hopfield energy;
    higher = in-distribution); returned negated, ``-ξᵀ S_ŷ``. No
    hyperparameters. A class with no correctly classified fit image stores a
    zero pattern (nothing memorised): inputs predicted as it score 0, the
    energy of an empty memory (fit warns).
    """

    name = "she"
    paper = ("Zhang et al., Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization "
             "with Modern Hopfield Energy, ICLR 2023")
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS, Need.LOGITS}), fit=True, fit_labels=True)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("patterns", None)  # [K, D]
        self._means: _CorrectClassMeans | None = None

    def reset_fit(self, tap: Tap) -> None:
        self._means = _CorrectClassMeans()

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        fit_in_progress(self._means, self.name).update(outputs.pre_logits, outputs.logits, _check_labels(self, labels),
                                                       self.name)

    def finish_fit(self) -> None:
        self.patterns, _ = fit_in_progress(self._means, self.name).finish(self.name)
        self._means = None

    def score(self, outputs: Outputs) -> torch.Tensor:
        pre_logits = outputs.pre_logits.flatten(1)
        patterns = self.patterns.to(pre_logits.dtype)[outputs.logits.argmax(dim=1)]
        return -score_dtype((pre_logits * patterns).sum(dim=1))


#: libMR's ``translate_amount``: ``FitHigh`` shifts the tail so that its smallest value lands here.
LIBMR_TRANSLATION = 10000.0


class WeibullFit:
    """Maximum-likelihood Weibull fits of several samples at once, and their CDF.

    Attributes:
        shape: κ per sample [K].
        scale: λ per sample [K].
    """

    def __init__(self, shape: torch.Tensor, scale: torch.Tensor) -> None:
        self.shape, self.scale = shape, scale

    def cdf(self, values: torch.Tensor) -> torch.Tensor:
        """``1 - exp(-(x/λ)^κ)`` (0 for x <= 0), elementwise; ``shape`` and ``scale`` broadcast against ``values``."""
        ratio = (values / self.scale).clamp_min(0)
        power = torch.exp(self.shape * torch.log(ratio))  # log(0) = -inf gives 0
        return -torch.expm1(-power)


def fit_weibull(samples: torch.Tensor, valid: torch.Tensor, iterations: int = 200) -> WeibullFit:
    """Two-parameter Weibull maximum-likelihood fits of each row of ``samples`` (positive values).

    Solves ``1/κ + mean(ln x) - Σ x^κ ln x / Σ x^κ = 0`` (strictly decreasing in
    κ, one root) by bisection on ``log κ`` in [-20, 40], all rows at once, in
    float64 on values divided by their row maximum (the equation does not
    change, and ``x^κ`` cannot overflow); then ``λ = (mean x^κ)^(1/κ)``. A row
    whose values are all equal has no finite MLE: κ ends at ``e^40``, a step
    at that value.

    Args:
        samples: [K, n] values, > 0 where ``valid``.
        valid: [K, n] which entries belong to each row's sample (at least one per row).
        iterations: bisection steps.
    """
    samples = samples.to(torch.float64)
    weights = valid.to(torch.float64)
    count = weights.sum(1)
    top = torch.where(valid, samples, torch.zeros_like(samples)).amax(dim=1)
    logs = torch.where(valid, torch.log(samples / top[:, None]), torch.zeros_like(samples))  # <= 0
    mean_log = logs.sum(1) / count

    def equation(shape: torch.Tensor) -> torch.Tensor:
        powered = torch.exp(shape[:, None] * logs) * weights  # t^κ, the maximum contributes 1
        return 1 / shape + mean_log - (powered * logs).sum(1) / powered.sum(1)

    low = torch.full_like(count, -20.0)
    high = torch.full_like(count, 40.0)
    for _ in range(iterations):
        middle = (low + high) / 2
        positive = equation(middle.exp()) > 0  # the root lies above
        low, high = torch.where(positive, middle, low), torch.where(positive, high, middle)
    shape = ((low + high) / 2).exp()
    mean_power = (torch.exp(shape[:, None] * logs) * weights).sum(1) / count
    return WeibullFit(shape, top * mean_power ** (1 / shape))


DISTANCES = ("eucos", "euclidean", "cosine")


class OpenMax(Detector):
    """OpenMax (Bendale & Boult, Towards Open Set Deep Networks, CVPR 2016, Algorithms 1-2).

    The activation vector (AV) of an input is its logit vector. Fit (two
    passes, labels used; the correctly classified training images only):
    the mean AV ``μ_c`` of each class (pass 1), then a Weibull model of the
    ``tail_size`` largest distances ``d(v, μ_c)`` of the class's AVs to it
    (pass 2; libMR's ``FitHigh``: the tail is shifted so that its smallest
    value sits at 10000, then a two-parameter MLE, :func:`fit_weibull`).

    Score: with ``s(1..α)`` the α top classes of v and ``w_c = WeibullCDF_c(d(v, μ_c))``,
    the revised AV ``v̂_c = v_c (1 - r_c w_c)`` and the unknown class's
    ``v̂_0 = Σ_c v_c r_c w_c``; the score is ``log P(unknown) =
    log softmax([v̂_0, v̂])_0`` (higher = more OOD; the log of the probability
    OpenMax assigns to "unknown", the same ranking). The paper's Algorithm 2
    prints the rank weights ``r_s(i) = (α - i)/α``, which never revises the
    α-th class and nothing at α = 1; this uses ``(α + 1 - i)/α`` as the
    authors' released code (OSDN's ``compute_openmax.py``) and pytorch-ood do.
    The distance is OSDN's default ``eucos``: ``‖v - μ‖₂ / 200 + (1 - cos(v, μ))``.

    A class without any correctly classified fit image has no model: its
    ``w_c`` is 1 (its activation goes fully to "unknown"; fit warns).

    Args:
        tail_size: largest distances per class the Weibull is fitted to (paper: 20).
        alpha: number of top classes revised (paper: 10 for 1000 classes; capped at the class count).
        distance: ``"eucos"``, ``"euclidean"`` or ``"cosine"``.
    """

    name = "openmax"
    paper = "Bendale & Boult, Towards Open Set Deep Networks, CVPR 2016, Algorithms 1-2"
    requirements = Requirements(outputs=frozenset({Need.LOGITS}), fit=True, fit_labels=True, fit_passes=2)
    search_space: ClassVar = {"tail_size": (10, 20, 50, 100), "alpha": (1, 2, 5, 10), "distance": DISTANCES}
    fit_hyperparameters: ClassVar = frozenset({"tail_size", "distance"})

    def __init__(self, tail_size: int = 20, alpha: int = 10, distance: str = "eucos") -> None:
        super().__init__()
        self.tail_size = tail_size
        self.alpha = alpha
        self.distance = distance
        self.check_hyperparameters()
        self.register_buffer("means", None)  # mean AV per class [K, K]
        self.register_buffer("has_model", None)  # bool [K]
        self.register_buffer("weibull_shift", None)  # added to distances before the CDF [K]
        self.register_buffer("weibull_shape", None)  # κ [K]
        self.register_buffer("weibull_scale", None)  # λ [K]
        self._means: _CorrectClassMeans | None = None
        self._fitted_means: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tails: torch.Tensor | None = None

    def check_hyperparameters(self) -> None:
        for name in ("tail_size", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"openmax: {name} must be an int >= 1, got {value!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"openmax: distance must be one of {DISTANCES}, got {self.distance!r}")

    def distances(self, vectors: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """``d(v, μ)`` between matching rows of ``vectors`` and ``means`` [..., K] -> [...], float64."""
        vectors, means = vectors.to(torch.float64), means.to(torch.float64)
        cosine = 1 - F.cosine_similarity(vectors, means, dim=-1)
        euclidean = (vectors - means).norm(dim=-1)
        return {"eucos": euclidean / 200 + cosine, "euclidean": euclidean, "cosine": cosine}[self.distance]

    def reset_fit(self, tap: Tap) -> None:
        self._means, self._fitted_means, self._tails = _CorrectClassMeans(), None, None

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        labels = _check_labels(self, labels)
        logits = outputs.logits
        if self._fitted_means is None or self._tails is None:  # pass 1: the mean AVs (pass 2 sets both)
            fit_in_progress(self._means, self.name).update(logits, logits, labels, self.name)
            return
        # pass 2: the largest distances of each class's correct AVs to its mean, merged into the tails
        labels = labels.to(device=logits.device, dtype=torch.long)
        correct = logits.argmax(dim=1) == labels
        labels = labels[correct]
        distances = self.distances(logits[correct], self._fitted_means[0][labels])
        candidates = distances.new_full((len(self._tails), len(labels)), -math.inf)
        candidates[labels, torch.arange(len(labels), device=labels.device)] = distances
        merged = torch.cat([self._tails, candidates], dim=1)
        self._tails = merged.topk(self.tail_size, dim=1).values

    def next_fit_pass(self) -> None:
        self._fitted_means = fit_in_progress(self._means, self.name).finish(self.name)
        self._means = None
        means = self._fitted_means[0]
        self._tails = means.new_full((len(means), self.tail_size), -math.inf)

    def finish_fit(self) -> None:
        means, has_model = fit_in_progress(self._fitted_means, self.name)
        local_tails = fit_in_progress(self._tails, self.name)
        tails = all_gather_stacked(local_tails).permute(1, 0, 2).flatten(1)  # [K, world · tail]
        tails = tails.topk(self.tail_size, dim=1).values  # descending, -inf where a class has fewer
        finite = torch.isfinite(tails)
        smallest = torch.where(finite, tails, torch.full_like(tails, math.inf)).amin(dim=1)
        shift = LIBMR_TRANSLATION - torch.where(has_model, smallest, torch.zeros_like(smallest))
        valid = finite | (~has_model[:, None] & (torch.arange(self.tail_size, device=tails.device) == 0))
        # classes without a model get a placeholder sample; their Weibull is never read
        samples = torch.where(finite, tails + shift[:, None], torch.full_like(tails, LIBMR_TRANSLATION))
        weibull = fit_weibull(samples, valid)
        self.means, self.has_model = means, has_model
        self.weibull_shift, self.weibull_shape, self.weibull_scale = shift, weibull.shape, weibull.scale
        self._fitted_means = self._tails = None

    def score(self, outputs: Outputs) -> torch.Tensor:
        logits = outputs.logits.to(torch.float64)
        alpha = min(int(self.alpha), logits.shape[1])
        top = logits.topk(alpha, dim=1).indices  # [B, α], descending
        rank_weights = (alpha - torch.arange(alpha, dtype=torch.float64, device=logits.device)) / alpha
        distances = self.distances(logits[:, None, :], self.means.to(torch.float64)[top])  # [B, α]
        weibull = WeibullFit(self.weibull_shape.to(torch.float64)[top], self.weibull_scale.to(torch.float64)[top])
        outlier = weibull.cdf(distances + self.weibull_shift.to(torch.float64)[top])
        outlier = torch.where(self.has_model[top], outlier, torch.ones_like(outlier))
        top_logits = logits.gather(1, top)
        moved = top_logits * rank_weights * outlier  # v_c r_c w_c: what goes to "unknown"
        revised = logits.scatter(1, top, top_logits - moved)
        unknown = moved.sum(dim=1, keepdim=True)
        log_unknown = unknown[:, 0] - torch.logsumexp(torch.cat([unknown, revised], dim=1), dim=1)
        return score_dtype(log_unknown.to(outputs.logits.dtype))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [SHE, OpenMax]
