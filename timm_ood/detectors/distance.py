"""Distance detectors on pre-logits features.

Mahalanobis (Lee, Lee, Lee & Shin, NeurIPS 2018): class-conditional Gaussians
with one tied covariance, fitted in one streaming pass that keeps only
sufficient statistics (per-class sums and counts, and the Gram matrix), in
float64.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, score_dtype
from .perturbation import gradient_sign, signed_step

__all__ = ["ClassGaussianStatistics", "Mahalanobis"]


class ClassGaussianStatistics:
    """Streaming sufficient statistics of class-conditional Gaussians with a tied covariance.

    Accumulates per-class feature sums and counts and the total Gram matrix
    ``Σ_i f_i f_iᵀ`` in float64; :meth:`finish` all-reduces them across
    processes and returns the class means and the maximum-likelihood tied
    covariance ``Σ = (1/N) Σ_c Σ_{i∈c} (f_i - μ_c)(f_i - μ_c)ᵀ``.
    """

    def __init__(self, num_classes: int = 0) -> None:
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        features = features.detach().flatten(1).to(torch.float64)
        labels = labels.to(device=features.device, dtype=torch.long)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(
                "fit data contains negative labels (OOD samples are labelled -1): fit detectors "
                "on in-distribution training data only"
            )
        needed = max(self.num_classes, int(labels.max()) + 1 if labels.numel() else 0)
        if self.sums is None:
            dim = features.shape[1]
            self.sums = features.new_zeros(needed, dim)
            self.counts = features.new_zeros(needed)
            self.gram = features.new_zeros(dim, dim)
        elif needed > self.sums.shape[0]:  # a class seen for the first time
            grow = needed - self.sums.shape[0]
            self.sums = torch.cat([self.sums, self.sums.new_zeros(grow, self.sums.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
        self.sums.index_add_(0, labels, features)
        self.counts += torch.bincount(labels, minlength=self.sums.shape[0]).to(torch.float64)
        self.gram += features.T @ features

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(class_ids [K'], means [K', D], covariance [D, D])`` over the classes that occurred.

        Raises:
            ValueError: no data was seen.
        """
        if self.sums is None:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(self.sums, self.counts, self.gram)
        if float(self.counts.sum()) == 0:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        present = torch.nonzero(self.counts > 0).squeeze(1)
        counts = self.counts[present]
        means = self.sums[present] / counts[:, None]
        total = counts.sum()
        between = (means * counts[:, None]).T @ means  # Σ_c n_c μ_c μ_cᵀ
        covariance = (self.gram - between) / total
        return present, means, (covariance + covariance.T) / 2


def squared_mahalanobis(centered: torch.Tensor, precision: torch.Tensor,
                        means_precision: torch.Tensor, means_norm: torch.Tensor) -> torch.Tensor:
    """``(f - μ_c)ᵀ P (f - μ_c)`` for every row and class, [B, K], without a [B, K, D] tensor.

    Expanded as ``fᵀPf - 2 fᵀPμ_c + μ_cᵀPμ_c`` on features and means that are
    both centred on the training mean, in the dtype of the arguments (float64
    here): centring keeps the three terms close to the distance itself, so the
    subtraction does not cancel away the digits that order the scores.
    """
    projected = centered @ precision
    return (projected * centered).sum(1, keepdim=True) - 2 * centered @ means_precision.T + means_norm


class Mahalanobis(Detector):
    """Mahalanobis distance to the closest class (Lee et al., NeurIPS 2018, Eq. 2-3).

    Fit: class means ``μ_c`` and one tied covariance ``Σ`` of the pre-logits
    features ``f(x)`` of in-distribution training data (labels used). Paper
    score ``M(x) = max_c -(f(x) - μ_c)ᵀ Σ⁻¹ (f(x) - μ_c)`` (higher =
    in-distribution); returned negated: the smallest squared distance.
    ``Σ⁻¹`` is the pseudo-inverse, as the authors' ``EmpiricalCovariance``.

    With ``epsilon > 0``, the input is first preprocessed (Eq. 3): ``x̂ = x -
    ε · sign(∇_x (f(x) - μ_ĉ)ᵀ Σ⁻¹ (f(x) - μ_ĉ)) / σ`` with ĉ the closest
    class, i.e. a step that raises ``M``; ε is in pixel units like ODIN's.

    This is the single-layer detector on the pre-logits features; the
    feature ensemble over intermediate layers is ``multi-mahalanobis``.

    Args:
        epsilon: input preprocessing magnitude in [0, 1] pixel units (0 = off).
    """

    name = "mahalanobis"
    paper = "Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting OOD Samples and Adversarial Attacks, NeurIPS 2018, Eq. 2-3"
    search_space: ClassVar = {"epsilon": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)}
    _plain = Requirements(outputs=frozenset({Need.PRE_LOGITS}), fit=True, fit_labels=True)
    _preprocessing = Requirements(
        outputs=frozenset(), fit_outputs=frozenset({Need.PRE_LOGITS}),
        input_gradients=True, fit=True, fit_labels=True,
    )

    def __init__(self, epsilon: float = 0.0) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.check_hyperparameters()
        self.register_buffer("class_ids", None)
        self.register_buffer("class_means", None)
        self.register_buffer("feature_mean", None)
        self.register_buffer("precision", None)
        self.register_buffer("means_precision", None)
        self.register_buffer("means_norm", None)
        self._statistics: ClassGaussianStatistics | None = None

    @property
    def requirements(self) -> Requirements:  # type: ignore[override]
        return self._preprocessing if float(self.epsilon) > 0 else self._plain

    def check_hyperparameters(self) -> None:
        if not float(self.epsilon) >= 0:
            raise ValueError(f"mahalanobis: epsilon must be >= 0 (pixel units), got {self.epsilon!r}")

    def reset_fit(self, tap: Tap) -> None:
        self._statistics = ClassGaussianStatistics(max(tap.head_info.num_classes, 0))

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        if labels is None:
            raise ValueError("mahalanobis needs class labels to fit: pass (images, labels) batches")
        self._statistics.update(outputs.pre_logits, labels)

    def finish_fit(self) -> None:
        class_ids, means, covariance = self._statistics.finish()
        counts = self._statistics.counts[class_ids]
        feature_mean = (means * counts[:, None]).sum(0) / counts.sum()
        precision = torch.linalg.pinv(covariance, hermitian=True)
        centered_means = means - feature_mean
        means_precision = centered_means @ precision
        # fitted state stays float64: the distances are computed in float64
        self.class_ids = class_ids
        self.class_means = means
        self.feature_mean = feature_mean
        self.precision = precision
        self.means_precision = means_precision
        self.means_norm = (means_precision * centered_means).sum(1)
        self._statistics = None
        self.is_fitted = True

    def distances(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances [B, K'] to every fitted class, in float64."""
        f = pre_logits.flatten(1).to(torch.float64) - self.feature_mean.to(torch.float64)
        return squared_mahalanobis(
            f, self.precision.to(torch.float64), self.means_precision.to(torch.float64),
            self.means_norm.to(torch.float64),
        )

    def _pre_logits(self, tap: Tap, x: torch.Tensor) -> torch.Tensor:
        return tap.head(tap.features(x), pre_logits=True)

    def score(self, outputs: Outputs) -> torch.Tensor:
        if float(self.epsilon) == 0:
            return self._closest(outputs.pre_logits)
        tap, x = outputs.tap, outputs.inputs

        def closest_distance(inputs: torch.Tensor) -> torch.Tensor:
            return self.distances(self._pre_logits(tap, inputs)).amin(dim=1).sum()

        sign = gradient_sign(x, closest_distance)
        perturbed = signed_step(x, sign, float(self.epsilon), tap.input_std(x))
        return self._closest(self._pre_logits(tap, perturbed))

    def _closest(self, pre_logits: torch.Tensor) -> torch.Tensor:
        return score_dtype(self.distances(pre_logits).amin(dim=1).to(pre_logits.dtype))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [Mahalanobis]
