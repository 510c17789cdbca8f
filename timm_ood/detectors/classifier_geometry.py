"""Detectors that read the linear classifier's geometry against the pre-logits.

- ``vim``: the residual of the pre-logits outside their principal subspace,
  measured from the origin ``-W⁺b`` of the classifier, as a virtual logit;
- ``fdbd``: the mean distance to the decision boundaries of the predicted class;
- ``nci``: the alignment of the centred pre-logits with the predicted class's weight.

Each needs the weight ``W`` [K, D] and bias ``b`` [K] of a single linear
classifier over the pre-logits (``Requirements.linear_classifier``): models
with distilled or MLP heads are refused at ``wrap`` with an
``IncompatibleModelError``. They apply to ViTs as to CNNs (the pre-logits are
the pooled / class token vectors timm's ``forward_head`` returns).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, fit_in_progress, score_dtype

__all__ = ["FDBD", "NCI", "ViM", "vim_principal_dim"]


def vim_principal_dim(pre_logits_dim: int, principal_dim: int | float | None = None) -> int:
    """ViM's principal subspace dimension D for pre-logits of dimension N.

    ``None``: the authors' rule (their released ``benchmark.py``), D = 1000 for
    N >= 2048 and 512 otherwise, with D = N // 2 where that leaves no residual
    (N <= 512, narrower than the paper's models). A float in (0, 1): that
    fraction of N. An int: D itself.

    Raises:
        ValueError: D is not in [1, N - 1].
    """
    if principal_dim is None:
        dim = 1000 if pre_logits_dim >= 2048 else 512
        if dim >= pre_logits_dim:
            dim = pre_logits_dim // 2
    elif isinstance(principal_dim, float):
        dim = round(principal_dim * pre_logits_dim)
    else:
        dim = int(principal_dim)
    if not 1 <= dim < pre_logits_dim:
        raise ValueError(
            f"vim: principal_dim={principal_dim!r} gives D={dim} for {pre_logits_dim}-dimensional pre-logits; "
            f"D must be in [1, {pre_logits_dim - 1}] to leave a residual"
        )
    return dim


class ViM(Detector):
    """Virtual-logit matching (Wang, Li, Feng & Zhang, CVPR 2022).

    Fit (two passes over in-distribution training data, no labels):

    1. the origin ``o = -W⁺b`` of the classifier and the principal subspace
       ``P``: the eigenvectors of the D largest eigenvalues of
       ``(1/N) Σ_i (x_i - o)(x_i - o)ᵀ`` (the uncentred second moment around
       ``o``, as the authors' ``EmpiricalCovariance(assume_centered=True)``);
    2. ``α = Σ_i max_j l_j(x_i) / Σ_i ‖x_i^{P⊥}‖`` over the same data, with
       ``x^{P⊥}`` the residual of ``x - o`` outside ``P``; this needs
       ``P``, hence the second pass.

    Score: the virtual logit ``α ‖x^{P⊥}‖`` minus the energy
    ``log Σ_j exp(l_j)``; the paper's ViM score is the softmax probability of
    the virtual logit among the real ones, a monotone function of this
    difference (higher = more OOD either way; the authors' code scores the
    difference).

    Args:
        principal_dim: D (int), a fraction of the pre-logits dimension (float in
            (0, 1)), or None for the authors' rule (:func:`vim_principal_dim`).
    """

    name = "vim"
    paper = "Wang, Li, Feng & Zhang, ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"
    requirements = Requirements(
        outputs=frozenset({Need.PRE_LOGITS, Need.LOGITS}), linear_classifier=True, fit=True, fit_passes=2,
    )
    search_space: ClassVar = {"principal_dim": (None, 0.25, 0.5, 0.75, 0.9)}
    fit_hyperparameters: ClassVar = frozenset({"principal_dim"})

    def __init__(self, principal_dim: int | float | None = None) -> None:
        super().__init__()
        self.principal_dim = principal_dim
        self.check_hyperparameters()
        self.register_buffer("origin", None)  # o = -W⁺b [D]
        self.register_buffer("residual_basis", None)  # orthonormal basis of P⊥ [D, D - d]
        self.register_buffer("alpha", None)  # []
        self._origin: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None  # set between the passes
        self._moment: torch.Tensor | None = None
        self._count: torch.Tensor | None = None
        self._max_logit_sum: torch.Tensor | None = None
        self._residual_sum: torch.Tensor | None = None

    def check_hyperparameters(self) -> None:
        value = self.principal_dim
        valid = (value is None or (isinstance(value, float) and 0 < value < 1)
                 or (isinstance(value, int) and not isinstance(value, bool) and value >= 1))
        if not valid:
            raise ValueError(
                f"vim: principal_dim must be an int >= 1, a float in (0, 1) or None, got {value!r}"
            )

    def reset_fit(self, tap: Tap) -> None:
        self._origin = self._basis = self._moment = self._count = self._max_logit_sum = self._residual_sum = None

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        if self._origin is None:  # read after the tap's first forward has checked the head is linear
            weight, bias = outputs.tap.linear_classifier(f"detector {self.name!r}")
            self._origin = -(torch.linalg.pinv(weight.detach().to(torch.float64)) @ bias.detach().to(torch.float64))
        centered = outputs.pre_logits.flatten(1).to(torch.float64) - self._origin
        if self._basis is None:  # pass 1: the second moment around o, and the max logits
            moment, count, max_logit_sum = self._moment, self._count, self._max_logit_sum
            if moment is None or count is None or max_logit_sum is None:  # the three are set together
                dim = centered.shape[1]
                moment = self._moment = centered.new_zeros(dim, dim)
                count = self._count = centered.new_zeros(())
                max_logit_sum = self._max_logit_sum = centered.new_zeros(())
            moment += centered.T @ centered  # in place, as the two below
            count += len(centered)
            max_logit_sum += outputs.logits.to(torch.float64).amax(dim=1).sum()
        else:  # pass 2: the norms of the residuals outside the principal subspace
            residual_sum = fit_in_progress(self._residual_sum, self.name)  # set with the basis
            residual_sum += (centered @ self._basis).norm(dim=1).sum()  # in place

    def next_fit_pass(self) -> None:
        moment, count, max_logit_sum = self._moment, self._count, self._max_logit_sum
        if moment is None or count is None or max_logit_sum is None:  # the three are set together
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(moment, count, max_logit_sum)
        eigenvalues, eigenvectors = torch.linalg.eigh(moment / count)  # ascending
        dim = vim_principal_dim(len(eigenvalues), self.principal_dim)
        self._basis = eigenvectors[:, :len(eigenvalues) - dim].contiguous()
        self._residual_sum = moment.new_zeros(())
        self._moment = None

    def finish_fit(self) -> None:
        residual_sum = fit_in_progress(self._residual_sum, self.name)  # next_fit_pass set it
        all_reduce_sum(residual_sum)
        self.origin = fit_in_progress(self._origin, self.name)  # set by the first batch
        self.residual_basis = fit_in_progress(self._basis, self.name)  # set by next_fit_pass
        max_logit_sum = fit_in_progress(self._max_logit_sum, self.name)
        self.alpha = max_logit_sum / residual_sum.clamp_min(torch.finfo(torch.float64).tiny)
        self._origin = self._basis = self._residual_sum = self._max_logit_sum = self._count = None

    def virtual_logit(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """``α ‖x^{P⊥}‖`` [B] float64."""
        centered = pre_logits.flatten(1).to(torch.float64) - self.origin.to(torch.float64)
        residual = centered @ self.residual_basis.to(torch.float64)
        return self.alpha.to(torch.float64) * residual.norm(dim=1)

    def score(self, outputs: Outputs) -> torch.Tensor:
        energy = torch.logsumexp(outputs.logits.to(torch.float64), dim=1)
        return score_dtype((self.virtual_logit(outputs.pre_logits) - energy).to(outputs.logits.dtype))


class _TrainingMean(Detector):
    """A detector whose only fitted state is the mean of the training pre-logits (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("feature_mean", None)
        self._sum: torch.Tensor | None = None
        self._count = torch.zeros((), dtype=torch.float64)

    def reset_fit(self, tap: Tap) -> None:
        self._sum, self._count = None, torch.zeros((), dtype=torch.float64)

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        pre_logits = outputs.pre_logits.flatten(1).to(torch.float64)
        self._sum = pre_logits.sum(0) if self._sum is None else self._sum + pre_logits.sum(0)
        self._count = self._count.to(pre_logits.device) + len(pre_logits)

    def finish_fit(self) -> None:
        if self._sum is None:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(self._sum, self._count)
        self.feature_mean = self._sum / self._count
        self._sum = None


class FDBD(_TrainingMean):
    """Fast decision boundary distance (Liu & Qin, ICML 2024).

    The distance of the pre-logits ``z`` to the decision boundary between the
    predicted class ŷ and class c of a linear classifier is closed-form,
    ``|(w_ŷ - w_c)ᵀz + b_ŷ - b_c| / ‖w_ŷ - w_c‖ = |l_ŷ - l_c| / ‖w_ŷ - w_c‖``.
    Paper score: its mean over ``c ≠ ŷ`` divided by ``‖z - μ_train‖₂``, the
    distance to the mean of the training pre-logits (the only fitted state;
    no labels); higher = in-distribution, returned negated. No
    hyperparameters. ``‖w_ŷ - w_c‖`` is computed per input from ``W Wᵀ``
    rows (no [K, K, D] tensor).
    """

    name = "fdbd"
    paper = "Liu & Qin, Fast Decision Boundary based Out-of-Distribution Detector, ICML 2024"
    requirements = Requirements(
        outputs=frozenset({Need.PRE_LOGITS, Need.LOGITS}), linear_classifier=True, fit=True,
    )

    def score(self, outputs: Outputs) -> torch.Tensor:
        weight, _ = outputs.tap.linear_classifier(f"detector {self.name!r}")
        weight = weight.detach().to(torch.float64)
        logits = outputs.logits.to(torch.float64)
        top, predicted = logits.max(dim=1)
        squared_norms = weight.square().sum(1)
        # ‖w_ŷ - w_c‖² = ‖w_ŷ‖² + ‖w_c‖² - 2 w_ŷ·w_c, for the predicted ŷ of each input: [B, K]
        gaps = (squared_norms[predicted][:, None] + squared_norms[None] - 2 * weight[predicted] @ weight.T)
        gaps = gaps.clamp_min(0).sqrt()
        distances = torch.where(gaps > 0, (top[:, None] - logits).abs() / gaps, torch.zeros_like(gaps))
        mean_distance = distances.sum(1) / max(logits.shape[1] - 1, 1)  # the ŷ term is 0
        spread = (outputs.pre_logits.flatten(1).to(torch.float64) - self.feature_mean.to(torch.float64)).norm(dim=1)
        score = -mean_distance / spread.clamp_min(torch.finfo(torch.float64).tiny)
        return score_dtype(score.to(outputs.logits.dtype))


class NCI(_TrainingMean):
    """Neural-collapse inspired detector (Liu & Qin, CVPR 2025).

    With ``μ_G`` the mean of the training pre-logits ``h`` (the
    fitted state; no labels) and ŷ the predicted class: proximity
    ``pScore(x) = w_ŷᵀ(h - μ_G) / ‖h - μ_G‖₂`` and the paper's score
    ``pScore(x) + α ‖h‖₁`` (the L1 norm of the pre-logits filters OOD inputs near the
    origin), higher = in-distribution; returned negated. ``pScore`` is the
    cosine between ``w_ŷ`` and ``h - μ_G`` up to ``‖w_ŷ‖``, which neural
    collapse makes equal across classes; it is computed as in the authors'
    released implementation (their OpenOOD postprocessor), without dividing
    by ``‖w_ŷ‖``.

    Args:
        alpha: weight of the pre-logits-norm filter, >= 0 (the authors' default
            1e-4; tuned on held-out data in the paper).
    """

    name = "nci"
    paper = "Liu & Qin, Detecting Out-of-Distribution through the Lens of Neural Collapse, CVPR 2025"
    requirements = Requirements(
        outputs=frozenset({Need.PRE_LOGITS, Need.LOGITS}), linear_classifier=True, fit=True,
    )
    search_space: ClassVar = {"alpha": (0.0, 1e-4, 1e-3, 1e-2, 1e-1)}

    def __init__(self, alpha: float = 1e-4) -> None:
        super().__init__()
        self.alpha = alpha
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        if not float(self.alpha) >= 0:
            raise ValueError(f"nci: alpha must be >= 0, got {self.alpha!r}")

    def score(self, outputs: Outputs) -> torch.Tensor:
        weight, _ = outputs.tap.linear_classifier(f"detector {self.name!r}")
        pre_logits = outputs.pre_logits.flatten(1).to(torch.float64)
        predicted = outputs.logits.argmax(dim=1)
        centered = pre_logits - self.feature_mean.to(torch.float64)
        alignment = (weight.detach().to(torch.float64)[predicted] * centered).sum(1)
        proximity = alignment / centered.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        score = -(proximity + float(self.alpha) * pre_logits.abs().sum(1))
        return score_dtype(score.to(outputs.logits.dtype))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [ViM, FDBD, NCI]
