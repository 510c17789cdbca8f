"""Activation shaping: change a late layer's activations, then score the logits they give.

Where each paper applies its operation, and so where it is applied here:

- on the **pre-logits** ``forward_head(features, pre_logits=True)``, the
  penultimate activations after global pooling (after the ViT's final norm,
  its class token): ReAct, ASH-P/B/S, SCALE, DICE, VRA, LTS. Their papers and
  released code all shape this vector (the ASH code calls ``ash_*`` on the
  output of ``avgpool``, 2048 x 1 x 1 on a ResNet-50, and on the ViT's class
  token, not on the map before pooling). The shaped vector goes through the
  model's own linear classifier (``get_classifier()``; these detectors refuse
  models whose classifier is not one linear layer) and is scored by its free
  energy ``-logsumexp``, as in all of the papers. LTS scales the model's own
  logits and works with any head.
- on the **feature map** ``forward_features(x)`` before pooling: RankFeat,
  whose operation is a matrix one (see :class:`RankFeat`); the model's own
  ``forward_head`` pools and classifies the result.

The papers assume non-negative (post-ReLU) pre-logits, as CNNs have. On heads
that normalise them (ConvNeXt's LayerNorm head, a ViT's final norm) the
pre-logits are signed; the operations are applied unchanged, as the ASH and
LTS authors' own ViT code does, and are documented per detector.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import IncompatibleModelError
from ..free_energy import free_energy
from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, fit_in_progress, score_dtype
from .quantiles import StreamingHistogram, histogram_percentile, linear_percentile

__all__ = [
    "ASHB",
    "ASHP",
    "ASHS",
    "DICE",
    "SCALE",
    "VRA",
    "LogitScaling",
    "RankFeat",
    "ReAct",
    "ash_b",
    "ash_p",
    "ash_s",
    "kept_count",
    "logit_scale_factor",
    "remove_rank_one",
    "scale_activations",
]

#: Percentile grid shared by the pruning methods (OpenOOD's and pytorch-ood's sweep).
PERCENTILE_GRID: tuple[float, ...] = (65, 70, 75, 80, 85, 90, 95)


def kept_count(width: int, percentile: float) -> int:
    """How many of ``width`` activations a cut at the ``percentile``-th percentile keeps.

    ``k = n - round(n p / 100)``, the papers' code (NumPy's round half to
    even), but at least 1 so that a short vector keeps its largest activation.
    """
    return max(1, width - round(width * float(percentile) / 100))


def _mass_ratio(total: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``s1 / s2``; 1 where the kept mass is 0 (no activation at all: nothing to rescale)."""
    return torch.where(kept == 0, torch.ones_like(total), total / torch.where(kept == 0, 1, kept))


def ash_p(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-P: zero all but the ``k`` largest activations of each row of ``x`` [B, D]."""
    top = x.topk(kept_count(x.shape[1], percentile), dim=1)
    return torch.zeros_like(x).scatter_(1, top.indices, top.values)


def ash_b(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-B: the ``k`` largest activations all become ``s1 / k`` (the row's sum is kept), others 0."""
    k = kept_count(x.shape[1], percentile)
    top = x.topk(k, dim=1)
    fill = (x.sum(dim=1, keepdim=True) / k).expand_as(top.values)
    return torch.zeros_like(x).scatter_(1, top.indices, fill)


def ash_s(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-S: ASH-P, then the kept activations are multiplied by ``exp(s1 / s2)``."""
    top = x.topk(kept_count(x.shape[1], percentile), dim=1)
    factor = torch.exp(_mass_ratio(x.sum(dim=1), top.values.sum(dim=1)))
    return torch.zeros_like(x).scatter_(1, top.indices, top.values * factor[:, None])


def scale_activations(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """SCALE: every activation multiplied by ``exp(s1 / s2)``, nothing pruned."""
    top = x.topk(kept_count(x.shape[1], percentile), dim=1).values
    return x * torch.exp(_mass_ratio(x.sum(dim=1), top.sum(dim=1)))[:, None]


def logit_scale_factor(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """LTS's ``S = (s1 / s2)^2`` of ``ReLU(x)``, per row [B]."""
    x = x.clamp_min(0)
    top = x.topk(kept_count(x.shape[1], percentile), dim=1).values
    return _mass_ratio(x.sum(dim=1), top.sum(dim=1)).square()


def _check_percentile(detector: Detector, name: str, upper_inclusive: bool = False) -> None:
    value = getattr(detector, name)
    below_top = float(value) <= 100 if upper_inclusive else float(value) < 100
    if not (float(value) >= 0 and below_top):
        interval = "[0, 100]" if upper_inclusive else "[0, 100)"
        raise ValueError(f"{detector.name}: {name} must be a percentile in {interval}, got {value!r}")


def _classifier_energy(outputs: Outputs, who: str, pre_logits: torch.Tensor) -> torch.Tensor:
    """Free energy of the model's linear classifier applied to (shaped) pre-logits."""
    weight, bias = outputs.tap.linear_classifier(who)
    return free_energy(F.linear(pre_logits, weight.to(pre_logits), bias.to(pre_logits)))


class _ShapedPreLogits(Detector):
    """Free energy of ``W shape(h) + b``: ``h`` the pre-logits, ``(W, b)`` the model's linear classifier."""

    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), linear_classifier=True)

    @abstractmethod
    def shape(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """The shaped pre-logits [B, D] (float32 or wider)."""

    def score(self, outputs: Outputs) -> torch.Tensor:
        return _classifier_energy(outputs, self.name, self.shape(score_dtype(outputs.pre_logits)))


class _FittedPercentiles(_ShapedPreLogits):
    """A shaping whose thresholds are percentiles of every pre-logit activation on in-distribution data.

    The fit keeps a :class:`~timm_ood.detectors.quantiles.StreamingHistogram`
    of all activations (bounded memory, exact to one bin width) as the fitted
    state, so a percentile can be changed after the fit without refitting.
    """

    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), linear_classifier=True, fit=True)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("activation_counts", None)
        self.register_buffer("bin_exponent", None)
        self._histogram: StreamingHistogram | None = None
        self._percentiles_of: torch.Tensor | None = None  # the counts that _percentiles were computed from
        self._percentiles: dict[float, torch.Tensor] = {}

    def reset_fit(self, tap: Tap) -> None:
        self._histogram = StreamingHistogram()

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        fit_in_progress(self._histogram, self.name).update(outputs.pre_logits)

    def finish_fit(self) -> None:
        self.activation_counts, self.bin_exponent = fit_in_progress(self._histogram, self.name).finish()
        self._histogram = None

    def activation_percentile(self, percentile: float) -> torch.Tensor:
        """The ``percentile``-th percentile of the fitted activations (0-d float64), cached per state."""
        if self._percentiles_of is not self.activation_counts:  # a new fit, a loaded state or a move
            self._percentiles_of, self._percentiles = self.activation_counts, {}
        key = float(percentile)
        if key not in self._percentiles:
            self._percentiles[key] = histogram_percentile(self.activation_counts, self.bin_exponent, key)
        return self._percentiles[key]


class ReAct(_FittedPercentiles):
    """ReAct (Sun, Guo & Li, NeurIPS 2021, Sec. 3): clip the penultimate activations, then energy.

    ``h̄ = min(h(x), c)``, ``f = W h̄ + b``, score ``E = -logsumexp(f)``
    (higher = more OOD). ``c`` is the ``percentile``-th percentile of all
    pre-logit activations of the in-distribution fit data, from a streaming
    histogram (within ``max|h| / 16384`` of the exact percentile; see
    :mod:`~timm_ood.detectors.quantiles`). Changing ``percentile`` needs no refit.

    Args:
        percentile: p in [0, 100]; the paper's default 90.
    """

    name = "react"
    paper = "Sun, Guo & Li, ReAct: Out-of-distribution Detection With Rectified Activations, NeurIPS 2021, Sec. 3"
    search_space: ClassVar = {"percentile": (80, 85, 90, 95, 99)}

    def __init__(self, percentile: float = 90) -> None:
        super().__init__()
        self.percentile = percentile
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        _check_percentile(self, "percentile", upper_inclusive=True)

    @property
    def threshold(self) -> torch.Tensor:
        """The clipping threshold ``c`` (0-d float64)."""
        return self.activation_percentile(self.percentile)

    def shape(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return pre_logits.clamp_max(self.threshold.to(pre_logits))


class VRA(_FittedPercentiles):
    """VRA (Xu, Lian, Liu & Tao, Variational Rectified Activation, NeurIPS 2023): a piecewise activation.

    ``g(z) = 0`` for ``z < α``, ``z + γ`` for ``α <= z <= β``, ``β`` for
    ``z > β``, on each penultimate activation; then ``f = W g(h) + b`` and the
    energy. Abnormally low activations are suppressed (zeroed), high ones
    clipped as in ReAct, and with γ > 0 the ones in between are raised. α and
    β are the ``lower_percentile``-th and ``upper_percentile``-th percentiles of
    all pre-logit activations of the in-distribution fit data (one streaming
    histogram, as ReAct's; the authors' ImageNet runs also use one pair for
    all units, their CIFAR code one pair per unit). Defaults: the authors'
    CIFAR-10 VRA setting (quantiles 0.6 and 0.9, γ = 0); their VRA+ setting
    is γ = 0.6 with 60/95. pytorch-ood's VRA, a two-sided clip per feature-map
    element, is a different method.

    Args:
        lower_percentile: percentile giving α.
        upper_percentile: percentile giving β (> ``lower_percentile``).
        gamma: γ, added to activations between α and β.
    """

    name = "vra"
    paper = "Xu, Lian, Liu & Tao, VRA: Variational Rectified Activation for OOD Detection, NeurIPS 2023"
    search_space: ClassVar = {"lower_percentile": (40, 50, 60, 70), "upper_percentile": (85, 90, 95, 99),
                              "gamma": (0.0, 0.3, 0.6)}

    def __init__(self, lower_percentile: float = 60, upper_percentile: float = 90, gamma: float = 0.0) -> None:
        super().__init__()
        self.lower_percentile = lower_percentile
        self.upper_percentile = upper_percentile
        self.gamma = gamma
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        _check_percentile(self, "lower_percentile", upper_inclusive=True)
        _check_percentile(self, "upper_percentile", upper_inclusive=True)
        if not float(self.lower_percentile) < float(self.upper_percentile):
            raise ValueError(f"vra: lower_percentile ({self.lower_percentile!r}) must be below "
                             f"upper_percentile ({self.upper_percentile!r})")

    def shape(self, pre_logits: torch.Tensor) -> torch.Tensor:
        low = self.activation_percentile(self.lower_percentile).to(pre_logits)
        high = self.activation_percentile(self.upper_percentile).to(pre_logits)
        shifted = torch.where(pre_logits > high, high, pre_logits + float(self.gamma))
        return torch.where(pre_logits < low, torch.zeros_like(pre_logits), shifted)


class _ASH(_ShapedPreLogits):
    """ASH (Djurisic, Bozanic, Ashok & Liu, ICLR 2023, Sec. 3): prune each sample's activations, then energy.

    Per sample, all but the ``k = D - round(D p / 100)`` largest pre-logit
    activations are set to 0; the kept ones are left (ASH-P), binarised
    (ASH-B) or rescaled (ASH-S); then ``f = W h' + b`` and the energy; no fit.
    The authors apply it after the last global average pooling (2048 x 1 x 1
    on a ResNet-50; the class token on a ViT), i.e. to the pre-logits, as here.
    On signed pre-logits (LayerNorm heads: ConvNeXt, ViT) it is applied
    unchanged, as in the authors' ViT code, although the paper's picture of a
    few large positive activations no longer holds.

    Args:
        percentile: p in [0, 100). The paper reports ASH-P@60, ASH-B@65 and
            ASH-S@90 on ImageNet and 90 on CIFAR; 90 is the default of all three.
    """

    paper = "Djurisic, Bozanic, Ashok & Liu, Extremely Simple Activation Shaping for OOD Detection, ICLR 2023, Sec. 3"
    search_space: ClassVar = {"percentile": PERCENTILE_GRID}

    def __init__(self, percentile: float = 90) -> None:
        super().__init__()
        self.percentile = percentile
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        _check_percentile(self, "percentile")


class ASHP(_ASH):
    """ASH-P (Djurisic et al., ICLR 2023): prune, keep the largest activations unchanged, energy.

    ``h'_j = h_j`` for the ``k`` largest activations, 0 otherwise (see
    :func:`ash_p`; placement and signed pre-logits as for every ASH variant).

    Args:
        percentile: p in [0, 100); the default 90.
    """

    name = "ash-p"

    def shape(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return ash_p(pre_logits, float(self.percentile))


class ASHB(_ASH):
    """ASH-B (Djurisic et al., ICLR 2023): prune, binarise the kept activations, energy.

    ``h'_j = s1 / k`` for the ``k`` largest activations, 0 otherwise, with
    ``s1`` the sum of all activations (the sum is preserved; see :func:`ash_b`).
    After a LayerNorm head ``s1`` hardly varies between inputs, and neither
    does the score.

    Args:
        percentile: p in [0, 100); the default 90 (the paper's ImageNet value 65).
    """

    name = "ash-b"

    def shape(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return ash_b(pre_logits, float(self.percentile))


class ASHS(_ASH):
    """ASH-S (Djurisic et al., ICLR 2023): prune, rescale the kept activations by ``exp(s1 / s2)``, energy.

    ``s1`` and ``s2`` are the sums of the activations before and after pruning
    (a row whose kept activations sum to 0 is left unscaled; see :func:`ash_s`).

    Args:
        percentile: p in [0, 100); the paper's ImageNet and CIFAR value 90.
    """

    name = "ash-s"

    def shape(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return ash_s(pre_logits, float(self.percentile))


class SCALE(_ShapedPreLogits):
    """SCALE (Xu, Chen, Franchi & Yao, ICLR 2024): ASH-S's scaling without its pruning.

    ``h' = h · exp(s1 / s2)`` with ``s1`` the sum of a sample's penultimate
    activations and ``s2`` the sum of its ``k = D - round(D p / 100)`` largest;
    then ``f = W h' + b`` and the energy. The paper shows that the scaling,
    not the pruning, is what helps, and applies it after the last global
    pooling, as here; no fit.

    Args:
        percentile: p in [0, 100); the paper's ImageNet value 85.
    """

    name = "scale"
    paper = ("Xu, Chen, Franchi & Yao, Scaling for Training Time and Post-hoc Out-of-distribution "
             "Detection Enhancement, ICLR 2024")
    search_space: ClassVar = {"percentile": PERCENTILE_GRID}

    def __init__(self, percentile: float = 85) -> None:
        super().__init__()
        self.percentile = percentile
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        _check_percentile(self, "percentile")

    def shape(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return scale_activations(pre_logits, float(self.percentile))


class LogitScaling(Detector):
    """LTS (Djurisic, Liu & Nikolić, Logit Scaling for OOD Detection, Mach. Vis. Appl. 2025): scaled energy.

    ``S(x) = (s1 / s2)^2`` from the penultimate activations ``h`` (pre-logits):
    ``s1`` the sum of ``ReLU(h)``, ``s2`` the sum of its
    ``k = D - round(D p / 100)`` largest entries (the ReLU is the authors'
    code; the paper writes the sums of activations). Score
    ``E = -log Σ_k exp(S(x) f_k(x))`` on the model's own logits, so any head
    works; no fit and no training statistics, as the paper requires. An input
    without a positive activation gets ``S = 1``.

    Args:
        percentile: p in [0, 100); the authors' ViT setting 95 (top 5% kept).
    """

    name = "lts"
    paper = "Djurisic, Liu & Nikolić, Logit Scaling for Out-of-Distribution Detection, Machine Vision and Applications 2025"
    requirements = Requirements(outputs=frozenset({Need.LOGITS, Need.PRE_LOGITS}))
    search_space: ClassVar = {"percentile": (*PERCENTILE_GRID, 99)}

    def __init__(self, percentile: float = 95) -> None:
        super().__init__()
        self.percentile = percentile
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        _check_percentile(self, "percentile")

    def score(self, outputs: Outputs) -> torch.Tensor:
        logits = score_dtype(outputs.logits)
        factor = logit_scale_factor(outputs.pre_logits.to(logits), float(self.percentile))
        return free_energy(logits * factor[:, None])


class DICE(Detector):
    """DICE (Sun & Li, ECCV 2022, Sec. 3): energy of a classifier sparsified by weight contribution.

    Fit: ``h̄``, the mean pre-logit vector on in-distribution data (streamed
    sums in float64), and the contribution matrix ``V = W ⊙ h̄`` (``v_kj =
    w_kj h̄_j``). The weights whose contribution exceeds the ``p``-th
    percentile of ``V`` are kept (mask ``M``), the rest set to 0. Score:
    ``E = -logsumexp((M ⊙ W) h + b)``. The fitted state is the mask; the weight
    is read from the model at scoring time.

    Args:
        p: sparsity in [0, 100): the percentage of weights dropped; the paper's
            ImageNet choice 90.
    """

    name = "dice"
    paper = "Sun & Li, DICE: Leveraging Sparsification for Out-of-Distribution Detection, ECCV 2022, Sec. 3"
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), linear_classifier=True, fit=True)
    search_space: ClassVar = {"p": (10, 30, 50, 70, 90)}
    fit_hyperparameters = frozenset({"p"})

    def __init__(self, p: float = 90) -> None:
        super().__init__()
        self.p = p
        self.check_hyperparameters()
        self.register_buffer("weight_mask", None)
        self._weight: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def check_hyperparameters(self) -> None:
        _check_percentile(self, "p")

    def reset_fit(self, tap: Tap) -> None:
        self._weight = tap.linear_classifier(self.name)[0].detach()
        self._sum = self._count = None

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        pre_logits = outputs.pre_logits.detach().to(torch.float64)
        total, count = self._sum, self._count
        if total is None or count is None:  # the two are set together
            total = self._sum = pre_logits.new_zeros(pre_logits.shape[1])
            count = self._count = pre_logits.new_zeros(())
        total += pre_logits.sum(dim=0)  # in place
        count += pre_logits.shape[0]  # in place

    def finish_fit(self) -> None:
        total, count = self._sum, self._count
        if total is None or count is None:  # the two are set together
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(total, count)
        weight = score_dtype(fit_in_progress(self._weight, self.name))
        contribution = weight * (total / count).to(weight)[None, :]
        self.weight_mask = contribution > linear_percentile(contribution, float(self.p))
        self._weight = self._sum = self._count = None

    def score(self, outputs: Outputs) -> torch.Tensor:
        pre_logits = score_dtype(outputs.pre_logits)
        weight, bias = outputs.tap.linear_classifier(self.name)
        sparse = weight.to(pre_logits) * self.weight_mask
        return free_energy(F.linear(pre_logits, sparse, bias.to(pre_logits)))


def remove_rank_one(matrices: torch.Tensor) -> torch.Tensor:
    """``X - s1 u1 v1ᵀ`` for every matrix ``X`` of a batch [B, R, S]: its rank-1 component removed.

    ``s1 u1 v1ᵀ = X v1 v1ᵀ`` with ``v1`` the top eigenvector of the smaller
    Gram matrix (``XᵀX``, or ``XXᵀ`` and the same on the left): exact like a
    full SVD and independent of the singular vectors' signs. The Gram matrix
    is formed in at least float32 and decomposed in float64 (its side is
    ``min(R, S)``: 49 for a 7 x 7 map).
    """
    x = score_dtype(matrices)
    if x.shape[2] <= x.shape[1]:
        v = torch.linalg.eigh((x.transpose(1, 2) @ x).double()).eigenvectors[..., -1:].to(x)  # [B, S, 1]
        residual = x - (x @ v) @ v.transpose(1, 2)
    else:
        u = torch.linalg.eigh((x @ x.transpose(1, 2)).double()).eigenvectors[..., -1:].to(x)  # [B, R, 1]
        residual = x - u @ (u.transpose(1, 2) @ x)
    return residual.to(matrices.dtype)


class RankFeat(Detector):
    """RankFeat (Song, Sebe & Wang, NeurIPS 2022, Sec. 3): remove the feature map's rank-1 component.

    Each sample's final feature map, as a ``C x HW`` matrix ``X``, loses its
    dominant singular component, ``X' = X - s1 u1 v1ᵀ``; the model's own
    ``forward_head`` pools and classifies ``X'``, and the score is the energy
    ``-logsumexp`` of those logits. Exact rank-1 removal (see
    :func:`remove_rank_one`), not the paper's optional 20-step power iteration.

    This is the paper's single-layer "Block 4" RankFeat on ``forward_features``.
    Its "Block 3 + 4" fusion would run the last stage on a modified Block 3
    map, which timm's public interface cannot do.

    On a ViT the feature map is the token sequence [N, D] (class token
    included); the same removal applies to that matrix and ``forward_head``
    then pools as the model does. The paper evaluates CNNs. A feature map
    with a single position (1 x 1) or a single channel is its own rank-1
    component, so nothing would remain: such a model is refused with
    :class:`~timm_ood.errors.IncompatibleModelError` at scoring time (give it
    larger images).
    """

    name = "rankfeat"
    paper = "Song, Sebe & Wang, RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection, NeurIPS 2022, Sec. 3"
    requirements = Requirements(outputs=frozenset({Need.FEATURES}))

    def check_model(self, tap: Tap) -> None:
        super().check_model(tap)
        tap.check_available({Need.LOGITS}, f"detector {self.name!r}")

    def score(self, outputs: Outputs) -> torch.Tensor:
        features, tap = outputs.features, outputs.tap
        channels_last = features.ndim == 4 and getattr(tap.model, "output_fmt", "NCHW") == "NHWC"
        matrices = features.flatten(1, 2) if channels_last else features.flatten(2)
        if min(matrices.shape[1:]) < 2:
            raise IncompatibleModelError(
                f"detector {self.name!r} removes the rank-1 component of the final feature map, but this "
                f"model's map is {tuple(features.shape[1:])} for these inputs: a single position or channel "
                "is all rank 1 and nothing would remain. Use larger input images (a final map of at least 2 x 2)."
            )
        shaped = remove_rank_one(matrices).reshape(features.shape)
        return free_energy(score_dtype(tap.head(shaped)))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [ReAct, ASHP, ASHB, ASHS, SCALE, DICE, VRA, RankFeat, LogitScaling]
