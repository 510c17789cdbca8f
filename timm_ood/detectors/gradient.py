"""Gradient detectors: GradNorm.

``gradnorm`` (Huang, Geng & Li, NeurIPS 2021): the L1 norm of the gradient of
``KL(u || softmax(f(x)/T))`` with respect to the weight of the last layer. The
last layer is linear, ``z = W h + b``, so the per-sample gradient is the outer
product ``(∂KL/∂z) hᵀ`` and its L1 norm factorises into ``‖∂KL/∂z‖₁ · ‖h‖₁``:
one forward, no backward, no loop over samples.

This module also registers ``mahalanobis-odin`` (Mahalanobis with input
preprocessing), which lives with the Mahalanobis family in
:mod:`timm_ood.detectors.mahalanobis`: registered here, where it always was,
``list_detectors()`` keeps its order.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..hookspecs import hookimpl
from ..tap import Need, Outputs
from .base import Detector, Requirements
from .logits import check_temperature
from .mahalanobis import MahalanobisODIN

__all__ = ["GradNorm", "gradnorm_scores"]


def gradnorm_scores(logits: torch.Tensor, pre_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """GradNorm's ``S(x) = ‖∂ KL(u ‖ softmax(z/T)) / ∂W‖₁`` per row, in float64 (higher = in-distribution).

    With ``z = W h + b`` and ``KL(u ‖ p) = Σ_k u_k log(u_k / p_k)``, ``u_k = 1/K``:
    ``∂KL/∂z_k = (p_k - 1/K) / T``, so ``∂KL/∂W = ((p - u)/T) hᵀ`` and
    ``S(x) = (1/T) Σ_k |p_k - 1/K| · Σ_d |h_d|``.

    Args:
        logits: ``z`` [B, K], the output of the last (linear) layer.
        pre_logits: ``h`` [B, D], its input.
        temperature: T > 0.
    """
    probabilities = torch.softmax(logits.to(torch.float64) / temperature, dim=1)
    logit_gradient_norm = (probabilities - 1.0 / logits.shape[1]).abs().sum(dim=1) / temperature
    return logit_gradient_norm * pre_logits.flatten(1).to(torch.float64).abs().sum(dim=1)


class GradNorm(Detector):
    """GradNorm (Huang, Geng & Li, NeurIPS 2021, Sec. 3): the gradient norm of the last layer.

    Paper score ``S(x) = ‖∂ D_KL(u ‖ softmax(f(x)/T)) / ∂w‖₁`` with ``u`` the
    uniform distribution and ``w`` the weight of the last layer (not its
    bias, as in the authors' code); higher = in-distribution, so it is
    returned negated. Computed in closed form from the logits and the
    pre-logits (:func:`gradnorm_scores`: the paper's own analysis writes it
    as ``S = U · V``, pre-logits norm times logit-gradient norm), which
    equals the per-sample autograd gradient. The authors' code takes the
    gradient of the cross-entropy to an all-ones target, ``K`` times this one:
    the same ranking.

    Architectures: any model whose classifier is one linear layer over the
    pre-logits (CNNs and ViTs alike: for a ViT the pre-logits are the pooled,
    normalised token); other heads are refused with IncompatibleModelError,
    since their last layer's input is not what the tap exposes.

    Args:
        temperature: T > 0 of the softmax (the paper's default, 1).
    """

    name = "gradnorm"
    paper = ("Huang, Geng & Li, On the Importance of Gradients for Detecting Distributional Shifts in the "
             "Wild, NeurIPS 2021, Sec. 3: S(x) = ||dKL(u || softmax(f(x)/T)) / dW||_1")
    requirements = Requirements(outputs=frozenset({Need.LOGITS, Need.PRE_LOGITS}), linear_classifier=True)
    search_space: ClassVar = {"temperature": (0.5, 1.0, 2.0, 5.0, 10.0)}

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        check_temperature(self)

    def score(self, outputs: Outputs) -> torch.Tensor:
        # the tap demotes a head whose classifier(pre_logits) differs from forward_head to "other": refuse it
        outputs.tap.linear_classifier(f"detector {self.name!r}")
        logits = outputs.logits
        scores = gradnorm_scores(logits, outputs.pre_logits, float(self.temperature))
        return -scores.to(torch.promote_types(logits.dtype, torch.float32))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [GradNorm, MahalanobisODIN]
