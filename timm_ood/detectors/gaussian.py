"""The class-conditional Gaussian mixture density of the pre-logits: ``gmm``.

One Gaussian per class, with one covariance per class or one tied covariance,
mixed with the class frequencies. It fits in one streaming pass of float64
sufficient statistics, the Mahalanobis family's accumulator
(:class:`~timm_ood.detectors.mahalanobis.ClassStatistics`, per-class second
moments for ``covariance="full"``), and scores with vectorised distances to
every class at once.

This module also registers ``rmd`` and ``multi-mahalanobis``, which live with
the rest of the Mahalanobis family in :mod:`timm_ood.detectors.mahalanobis`:
registered here, where they always were, ``list_detectors()`` keeps its order.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, fit_in_progress, score_dtype
from .mahalanobis import (
    ClassStatistics,
    MultiMahalanobis,
    RelativeMahalanobis,
    TiedGaussians,
    require_labels,
    squared_mahalanobis,
)

__all__ = ["ClassGaussianMixture"]


class ClassGaussianMixture(Detector):
    """Class-conditional Gaussian mixture density of the pre-logits, higher score = lower density.

    One Gaussian per class fitted on labelled in-distribution pre-logits
    (maximum likelihood, float64), mixed with the class frequencies
    ``π_c = n_c / N``: ``p(z) = Σ_c π_c N(z | μ_c, Σ_c)``; score ``-log p(z)``
    (a log-sum-exp over the classes, where ``mahalanobis`` keeps only the
    closest class). ``regularization · I`` is added to every covariance so it
    is invertible with fewer samples than dimensions (scikit-learn's
    ``reg_covar``, whose default it takes).

    ``covariance="full"``: one covariance per class (pytorch-ood's ``GMM``),
    ``K·D²`` floats of state, e.g. 34 GB in float64 for 1000 classes of
    2048-dimensional pre-logits; ``"tied"``: one shared covariance (the
    covariance type of OpenOOD's GMM postprocessor), ``D²``. OpenOOD fits
    its mixture by EM on unlabelled, dimension-reduced features; fitting on
    the class labels instead keeps the fit a single streaming pass of
    sufficient statistics (an unsupervised EM mixture is the ``sklearn-gmm``
    plugin detector).

    Args:
        covariance: ``"full"`` (per class) or ``"tied"`` (shared).
        regularization: added to the covariances' diagonal, >= 0.
    """

    name = "gmm"
    paper = ("Class-conditional Gaussian mixture (generative classifier density), as pytorch-ood's GMM and "
             "OpenOOD's GMM postprocessor (Zhang et al., OpenOOD v1.5, 2023)")
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), fit=True, fit_labels=True)
    search_space: ClassVar = {"covariance": ("full", "tied"), "regularization": (1e-6, 1e-4, 1e-2)}
    fit_hyperparameters: ClassVar = frozenset({"covariance", "regularization"})

    def __init__(self, covariance: str = "full", regularization: float = 1e-6) -> None:
        super().__init__()
        self.covariance = covariance
        self.regularization = regularization
        self.check_hyperparameters()
        self.register_buffer("log_weights", None)  # log π_c [K']
        self.register_buffer("means", None)  # [K', D]
        self.register_buffer("precisions", None)  # [K', D, D] (full) or [D, D] (tied)
        self.register_buffer("log_normalizers", None)  # log of the Gaussians' normalising constants [K']
        self._statistics: ClassStatistics | None = None

    def check_hyperparameters(self) -> None:
        if self.covariance not in ("full", "tied"):
            raise ValueError(f"gmm: covariance must be 'full' or 'tied', got {self.covariance!r}")
        if not float(self.regularization) >= 0:
            raise ValueError(f"gmm: regularization must be >= 0, got {self.regularization!r}")

    def reset_fit(self, tap: Tap) -> None:
        self._statistics = ClassStatistics(max(tap.head_info.num_classes, 0), per_class=self.covariance == "full")

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        fit_in_progress(self._statistics, self.name).update(outputs.pre_logits, require_labels(self.name, labels))

    def finish_fit(self) -> None:
        statistics = fit_in_progress(self._statistics, self.name)
        if self.covariance == "full":
            _, counts, means, covariances = statistics.finish()
        else:
            gaussians = TiedGaussians.fit(statistics)
            counts, means, covariances = gaussians.counts, gaussians.means, gaussians.covariance
        dim = means.shape[1]
        eye = torch.eye(dim, dtype=covariances.dtype, device=covariances.device)
        cholesky, info = torch.linalg.cholesky_ex(covariances + float(self.regularization) * eye)
        if bool((info != 0).any()):
            raise ValueError(
                f"gmm: a covariance is not positive definite with regularization={self.regularization}; "
                "increase it"
            )
        log_det = 2 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        self.log_weights = (counts / counts.sum()).log()
        self.means = means
        self.precisions = torch.cholesky_inverse(cholesky)
        self.log_normalizers = (-0.5 * (log_det + dim * math.log(2 * math.pi))).expand(len(counts)).clone()
        self._statistics = None

    def log_densities(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """``log π_c + log N(z | μ_c, Σ_c)`` for every input and class, [B, K'] float64."""
        z = pre_logits.flatten(1).to(torch.float64)
        means, precisions = self.means.to(torch.float64), self.precisions.to(torch.float64)
        if precisions.ndim == 2:  # tied: expand (z - μ_c)ᵀ P (z - μ_c) around the mean of the means
            center = means.mean(0)
            centered, centered_means = z - center, means - center
            means_precision = centered_means @ precisions
            distances = squared_mahalanobis(centered, precisions, means_precision,
                                            (means_precision * centered_means).sum(1))
        else:
            difference = z[None] - means[:, None]  # [K', B, D]
            distances = ((difference @ precisions) * difference).sum(-1).T
        return self.log_weights.to(torch.float64) + self.log_normalizers.to(torch.float64) - 0.5 * distances

    def score(self, outputs: Outputs) -> torch.Tensor:
        pre_logits = outputs.pre_logits
        return score_dtype((-torch.logsumexp(self.log_densities(pre_logits), dim=1)).to(pre_logits.dtype))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [RelativeMahalanobis, MultiMahalanobis, ClassGaussianMixture]
