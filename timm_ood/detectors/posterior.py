"""Detectors on the shape of the softmax posterior: GEN, KL matching, weighted energy.

All three read only the logits and compute in float64 from ``log_softmax``:
probabilities of confident inputs sit within 1e-7 of 0 and 1, where float32
(and ``1 - p`` formed by subtraction) would tie inputs that the scores tell
apart (``docs/metrics.md``, "saturated softmax scores").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..errors import IncompatibleModelError
from ..hookspecs import hookimpl
from ..tap import Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, score_dtype

__all__ = ["GeneralizedEntropy", "KLMatching", "WeightedEnergy", "generalized_entropy"]


def generalized_entropy(logits: torch.Tensor, gamma: float, top_classes: int) -> torch.Tensor:
    """``G_γ(p) = Σ_{j ∈ top-M} p_j^γ (1 - p_j)^γ`` of ``p = softmax(logits)``, per row, in float64.

    Each term is ``exp(γ (log p_j + log(1 - p_j)))``. ``log(1 - p_j)`` is
    ``log(-expm1(log p_j))``, exact for every class but the most probable,
    whose ``1 - p`` is the mass of all the others: ``logsumexp`` of their
    log-probabilities, exact even when ``p`` rounds to 1.
    """
    log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
    top = log_p.topk(min(int(top_classes), log_p.shape[1]), dim=1)
    log_rest = torch.log(-torch.expm1(top.values))
    others = log_p.scatter(1, top.indices[:, :1], float("-inf"))
    log_rest[:, 0] = torch.logsumexp(others, dim=1)
    return torch.exp(gamma * (top.values + log_rest)).sum(dim=1)


class GeneralizedEntropy(Detector):
    """GEN (Liu, Lochman & Zach, CVPR 2023, Sec. 3): generalized entropy of the softmax.

    ``G_γ(p) = Σ_{j=1}^{M} p_j^γ (1 - p_j)^γ`` over the ``M`` largest class
    probabilities ``p_j`` (the paper truncates the sum to discard the noisy
    tail of near-zero probabilities). The paper's confidence is ``-G``
    (higher = in-distribution); the OOD score returned is ``G`` itself.
    The paper sums (OpenOOD too); pytorch-ood averages, a constant factor.

    Args:
        gamma: γ in (0, 1] makes the score most sensitive near p = 0 and 1;
            the paper's choice is 0.1.
        top_classes: M, the number of largest probabilities summed (the
            paper's 100 on ImageNet; all classes when the model has fewer).
    """

    name = "gen"
    paper = "Liu, Lochman & Zach, GEN: Pushing the Limits of Softmax-Based OOD Detection, CVPR 2023, Sec. 3"
    search_space: ClassVar = {"gamma": (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0),
                              "top_classes": (10, 50, 100, 200, 500, 1000)}

    def __init__(self, gamma: float = 0.1, top_classes: int = 100) -> None:
        super().__init__()
        self.gamma = gamma
        self.top_classes = top_classes
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        if not float(self.gamma) > 0:
            raise ValueError(f"gen: gamma must be > 0, got {self.gamma!r}")
        if int(self.top_classes) != self.top_classes or self.top_classes < 1:
            raise ValueError(f"gen: top_classes must be a positive integer, got {self.top_classes!r}")

    def score(self, outputs: Outputs) -> torch.Tensor:
        return generalized_entropy(outputs.logits, float(self.gamma), int(self.top_classes))


class KLMatching(Detector):
    """KL matching (Hendrycks et al., Scaling OOD Detection to Real-World Settings, ICML 2022).

    Fit: for every class k the model predicts on in-distribution data, the
    typical posterior ``d_k = mean{ p(y|x') : argmax_y p(y|x') = k }``, from
    streamed per-class sums of posteriors (no labels: the paper groups by
    the predicted class). Score: ``min_k KL[p(y|x) ‖ d_k]``, higher = more OOD
    (no negation), over the classes predicted at least once.

    A ``d_k`` entry that underflows to 0 in float64 (every fitted posterior
    below 1e-308 there) is taken as 1e-308: the divergence stays finite.
    """

    name = "kl-matching"
    paper = "Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022"
    requirements = Requirements(fit=True)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("typical_log_posteriors", None)
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def reset_fit(self, tap: Tap) -> None:
        self._sums = self._counts = None

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        probabilities = torch.softmax(outputs.logits.detach().to(torch.float64), dim=1)
        predicted = probabilities.argmax(dim=1)
        sums, counts = self._sums, self._counts
        if sums is None or counts is None:  # the two are set together
            classes = probabilities.shape[1]
            sums = self._sums = probabilities.new_zeros(classes, classes)
            counts = self._counts = probabilities.new_zeros(classes)
        sums.index_add_(0, predicted, probabilities)
        counts += torch.bincount(predicted, minlength=counts.numel()).to(torch.float64)  # in place

    def finish_fit(self) -> None:
        sums, counts = self._sums, self._counts
        if sums is None or counts is None:  # the two are set together
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(sums, counts)
        predicted = counts > 0
        typical = sums[predicted] / counts[predicted, None]
        self.typical_log_posteriors = typical.clamp_min(torch.finfo(torch.float64).tiny).log()
        self._sums = self._counts = None

    def score(self, outputs: Outputs) -> torch.Tensor:
        log_p = torch.log_softmax(outputs.logits.to(torch.float64), dim=1)
        p = log_p.exp()
        divergences = (p * log_p).sum(dim=1, keepdim=True) - p @ self.typical_log_posteriors.to(p).T
        return divergences.amin(dim=1)


class WeightedEnergy(Detector):
    """Weighted energy (WeightedEBO) of VOS (Du, Wang, Cai & Li, ICLR 2022, Sec. 3.2).

    ``E_w(x) = -log Σ_k w_k exp f_k(x)``, low for in-distribution inputs, so it
    is the OOD score as it stands. The class weights ``w_k`` are learnt with
    the network by VOS's uncertainty loss (on virtual outliers); this detector
    does not train them: pass the learnt weights of a VOS-trained model. As in
    the authors' code, negative weights count as 0 (``w = ReLU(w_raw)``), so the
    raw learnt weights can be passed as they are. Without weights every
    ``w_k = 1`` and the score is exactly ``energy`` (T = 1).

    Args:
        weights: the K class weights, or None for all ones.

    Raises:
        ValueError: no weight is positive.
        IncompatibleModelError: (when wrapping) the model has another number of classes.
    """

    name = "weighted-energy"
    paper = "Du, Wang, Cai & Li, VOS: Learning What You Don't Know by Virtual Outlier Synthesis, ICLR 2022, Sec. 3.2"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.weights = weights
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        if self.weights is not None and not any(float(w) > 0 for w in self.weights):
            raise ValueError("weighted-energy: at least one class weight must be positive (negative ones count as 0)")

    def check_model(self, tap: Tap) -> None:
        super().check_model(tap)
        classes = tap.head_info.num_classes
        if self.weights is not None and classes and len(self.weights) != classes:
            raise IncompatibleModelError(
                f"detector {self.name!r} has {len(self.weights)} class weights, but the model has {classes} classes"
            )

    def score(self, outputs: Outputs) -> torch.Tensor:
        logits = score_dtype(outputs.logits)
        if self.weights is not None:
            weights = torch.as_tensor(self.weights, dtype=logits.dtype, device=logits.device)
            logits = logits + weights.clamp_min(0).log()
        return -torch.logsumexp(logits, dim=1)


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [GeneralizedEntropy, KLMatching, WeightedEnergy]
