"""Training losses for OOD detection, as ``nn.Module`` s usable in any training loop.

- :class:`IsoMaxLoss` ``(logits, targets)``: ``CE(E_s * logits, y)`` with
  logits = -distances to class prototypes (Macêdo et al., Eq. 4).
- :class:`ConfidenceLoss` ``(logits_in, targets, logits_out)``:
  ``CE(logits_in, y) + β KL(U || softmax(logits_out))`` (Lee et al. 2018, Eq. 1).
- :class:`OutlierExposureLoss` ``(logits_in, targets, logits_out)``:
  ``CE(logits_in, y) + λ CE(U, softmax(logits_out))`` (Hendrycks et al. 2019, Eq. 1).

Every term is a mean over its batch. :func:`timm_ood.training.fit` runs the
two-batch losses with one auxiliary outlier batch per step (``outliers=``), ID
and outlier images in one forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConfidenceLoss", "IsoMaxLoss", "OutlierExposureLoss", "cross_entropy_to_uniform", "kl_to_uniform"]


def cross_entropy_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy from the uniform distribution to ``softmax(logits)``: [B, K] -> [B].

    ``CE(U, p) = -(1/K) Σ_k log p_k = logsumexp(z) - mean_k z_k`` (>= log K).
    """
    return -torch.log_softmax(logits, dim=1).mean(dim=1)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(U || softmax(logits))``, U uniform over the K classes: [B, K] -> [B] (>= 0).

    ``KL(U || p) = Σ_k (1/K) log((1/K) / p_k) = CE(U, p) - log K``. The
    direction is Lee et al.'s (Eq. 1): the expectation is under U, so every
    class's log-probability is pushed up equally.
    """
    return cross_entropy_to_uniform(logits) - math.log(logits.shape[1])


def _check_outlier_logits(logits_in: torch.Tensor, logits_out: torch.Tensor, who: str) -> None:
    if logits_out.ndim != 2 or logits_out.shape[0] == 0:
        raise ValueError(f"{who} needs a non-empty batch of outlier logits [N, K], got shape {tuple(logits_out.shape)}")
    if logits_out.shape[1] != logits_in.shape[1]:
        raise ValueError(f"{who}: in-distribution logits have {logits_in.shape[1]} classes but outlier logits "
                         f"have {logits_out.shape[1]}")


class IsoMaxLoss(nn.Module):
    """IsoMax loss (Macêdo et al., arXiv 1908.05569, Eq. 4) over an :class:`~timm_ood.training.IsoMaxHead`.

    ``L = -log( exp(-E_s d_y) / Σ_j exp(-E_s d_j) ) = CE(E_s * logits, y)``
    with ``logits = -d`` the negated distances to the class prototypes and
    ``E_s`` the entropic scale. ``E_s`` is used in training only: inference
    (the ``entropic`` detector, predictions) uses ``softmax(-d)`` at scale 1
    (Eq. 5-6). Computed with log-softmax (stable), which equals the authors'
    ``log(softmax(.))`` wherever that is finite, and has no ``log 0 = -inf``
    once a probability underflows. No regularisation term: weight decay on the
    prototypes comes from the optimiser.

    Args:
        entropic_scale: ``E_s`` > 0 (10, the paper's choice from {1, 3, 10}).

    Raises (on call):
        ValueError: a positive logit: these are not negated distances (did you
            forget ``training.replace_head(model, "isomax")``?).
    """

    def __init__(self, entropic_scale: float = 10.0) -> None:
        super().__init__()
        if not entropic_scale > 0:
            raise ValueError(f"entropic_scale must be > 0, got {entropic_scale!r}")
        self.entropic_scale = float(entropic_scale)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if bool((logits > 0).any()):
            raise ValueError("IsoMaxLoss expects logits = -distances (<= 0) from an IsoMax head, got positive "
                             "logits; call training.replace_head(model, 'isomax') before training")
        return F.cross_entropy(self.entropic_scale * logits, targets)

    def extra_repr(self) -> str:
        return f"entropic_scale={self.entropic_scale:g}"


class ConfidenceLoss(nn.Module):
    """Lee et al.'s confidence loss (ICLR 2018, Eq. 1) with an explicit outlier batch.

    ``L = mean_i CE(f(x_i), y_i) + β mean_j KL(U || softmax(f(x'_j)))`` over
    in-distribution ``(x_i, y_i)`` and outliers ``x'_j``. The KL is summed over
    classes and averaged over outlier *samples* (``batchmean``): an
    element-wise mean would silently divide β by K. The same loss trains the
    classifier of :func:`~timm_ood.training.fit_joint_confidence` on generated samples.

    It differs from :class:`OutlierExposureLoss` with ``lam = β`` only by the
    constant ``β log K``: the gradients are the same.

    Args:
        beta: β >= 0 (Lee et al. tune it on {0, 0.1, ..., 2}; 1 for SVHN, 0.1 for CIFAR-10 in their code).
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.beta = float(beta)

    def forward(self, logits_in: torch.Tensor, targets: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        _check_outlier_logits(logits_in, logits_out, "ConfidenceLoss")
        return F.cross_entropy(logits_in, targets) + self.beta * kl_to_uniform(logits_out).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class OutlierExposureLoss(nn.Module):
    """Outlier exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019, Eq. 1, classification case).

    ``L = mean_i CE(f(x_i), y_i) + λ mean_j CE(U, softmax(f(x'_j)))``: the
    outliers' cross-entropy to the uniform distribution, ``-(1/K) Σ_k log p_k``,
    averaged over outlier samples (the authors' code:
    ``-(x_out.mean(1) - logsumexp(x_out, 1)).mean()``).

    Args:
        lam: λ >= 0 (0.5, the paper's value for vision).
    """

    def __init__(self, lam: float = 0.5) -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam = float(lam)

    def forward(self, logits_in: torch.Tensor, targets: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        _check_outlier_logits(logits_in, logits_out, "OutlierExposureLoss")
        return F.cross_entropy(logits_in, targets) + self.lam * cross_entropy_to_uniform(logits_out).mean()

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}"
