"""scikit-learn outlier models on standardised pre-logits features.

Each detector fits its scikit-learn model on a uniform sample of the
in-distribution features and returns ``-score_samples`` (scikit-learn's
score is higher for inliers): higher = more out-of-distribution. The
hyperparameters are scikit-learn's, under the same names. ``contamination``
is left out: it only sets scikit-learn's ``predict`` threshold, never
``score_samples``; calibrate a threshold with ``OODModel.calibrate`` instead.

Fitted state is saved without pickle: the Gaussian models (elliptic
envelope, mixture) as their arrays, scored in torch on the model's device;
the others whole, in skops' secure format (:mod:`timm_ood_sklearn.persistence`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from sklearn.covariance import EllipticEnvelope
from sklearn.ensemble import IsolationForest
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import LocalOutlierFactor
from sklearn.svm import OneClassSVM

from .base import SerialisedEstimatorDetector, SklearnDetector

__all__ = [
    "EllipticEnvelopeDetector",
    "GaussianMixtureDetector",
    "IsolationForestDetector",
    "LocalOutlierFactorDetector",
    "OneClassSVMDetector",
]


class IsolationForestDetector(SerialisedEstimatorDetector):
    """Isolation Forest (Liu, Ting & Zhou, ICDM 2008) on standardised pre-logits features.

    Score: the anomaly score ``s(x, n) = 2^(-E[h(x)] / c(n))`` (Eq. 2) of
    scikit-learn's ``IsolationForest``, i.e. ``-score_samples``: inputs that
    random axis-aligned splits isolate in few steps score higher.

    Args:
        n_estimators: number of trees.
        max_samples: samples drawn to build each tree (``"auto"``: min(256, N)).
        max_features: features drawn to build each tree (int or fraction).
        bootstrap: draw samples with replacement.
        reservoir_size: the most feature vectors fitted on.
        random_state: seed of the sample and of the forest.
    """

    name = "isolation-forest"
    paper = "Liu, Ting & Zhou, Isolation Forest, ICDM 2008, Eq. 2"
    search_space: ClassVar = {"n_estimators": (50, 100, 200, 400), "max_samples": ("auto", 512, 1024)}
    estimator_class = IsolationForest
    trusted_types = ("sklearn.tree._tree.Tree",)

    def __init__(
        self,
        n_estimators: int = 100,
        max_samples: int | float | str = "auto",
        max_features: int | float = 1.0,
        bootstrap: bool = False,
        reservoir_size: int = 50_000,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(reservoir_size=reservoir_size, random_state=random_state)
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.bootstrap = bootstrap
        self.check_hyperparameters()

    def make_estimator(self) -> IsolationForest:
        return IsolationForest(
            n_estimators=self.n_estimators, max_samples=self.max_samples, max_features=self.max_features,
            bootstrap=self.bootstrap, random_state=self.random_state,
        )


class OneClassSVMDetector(SerialisedEstimatorDetector):
    """One-class SVM (Schölkopf et al., Neural Computation 2001) on standardised pre-logits features.

    Score: ``-Σ_i α_i k(x_i, x)``, the negated kernel expansion over the
    support vectors (scikit-learn's ``-score_samples``): inputs far from the
    estimated support score higher. Fitting is quadratic to cubic in the
    number of samples, hence the smaller default ``reservoir_size``.

    Args:
        kernel: ``"rbf"``, ``"linear"``, ``"poly"`` or ``"sigmoid"``.
        nu: upper bound on the fraction of training errors, lower bound on
            the fraction of support vectors, in (0, 1].
        gamma: kernel coefficient: ``"scale"``, ``"auto"`` or a float.
        degree: degree of the ``"poly"`` kernel.
        coef0: independent term of the ``"poly"`` and ``"sigmoid"`` kernels.
        reservoir_size: the most feature vectors fitted on.
        random_state: seed of the sample.
    """

    name = "one-class-svm"
    paper = "Schölkopf, Platt, Shawe-Taylor, Smola & Williamson, Estimating the Support of a High-Dimensional Distribution, Neural Computation 2001"
    search_space: ClassVar = {"nu": (0.01, 0.05, 0.1, 0.5), "gamma": ("scale", 0.001, 0.01, 0.1)}
    estimator_class = OneClassSVM

    def __init__(
        self,
        kernel: str = "rbf",
        nu: float = 0.5,
        gamma: float | str = "scale",
        degree: int = 3,
        coef0: float = 0.0,
        reservoir_size: int = 10_000,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(reservoir_size=reservoir_size, random_state=random_state)
        self.kernel = kernel
        self.nu = nu
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.check_hyperparameters()

    def make_estimator(self) -> OneClassSVM:
        return OneClassSVM(kernel=self.kernel, nu=self.nu, gamma=self.gamma, degree=self.degree, coef0=self.coef0)


class LocalOutlierFactorDetector(SerialisedEstimatorDetector):
    """Local Outlier Factor (Breunig, Kriegel, Ng & Sander, SIGMOD 2000), novelty mode.

    Score: ``LOF_k(x)`` (Def. 7), the mean ratio of the local reachability
    density of ``x``'s k nearest fitted neighbours to its own, in Euclidean
    distance on standardised pre-logits features (scikit-learn's
    ``-score_samples`` with ``novelty=True``): about 1 inside a cluster,
    higher for inputs in sparser regions than their neighbours.

    Args:
        n_neighbors: k, the neighbourhood size.
        algorithm: neighbour search: ``"auto"``, ``"ball_tree"``, ``"kd_tree"`` or ``"brute"``.
        leaf_size: leaf size of the ball or k-d tree.
        reservoir_size: the most feature vectors fitted on.
        random_state: seed of the sample.
    """

    name = "lof"
    paper = "Breunig, Kriegel, Ng & Sander, LOF: Identifying Density-Based Local Outliers, SIGMOD 2000, Def. 7"
    search_space: ClassVar = {"n_neighbors": (5, 10, 20, 50)}
    estimator_class = LocalOutlierFactor
    trusted_types = (
        "sklearn.metrics._dist_metrics.EuclideanDistance64",
        "sklearn.neighbors._ball_tree.BallTree",
        "sklearn.neighbors._kd_tree.KDTree",
    )

    def __init__(
        self,
        n_neighbors: int = 20,
        algorithm: str = "auto",
        leaf_size: int = 30,
        reservoir_size: int = 50_000,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(reservoir_size=reservoir_size, random_state=random_state)
        self.n_neighbors = n_neighbors
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self.check_hyperparameters()

    def make_estimator(self) -> LocalOutlierFactor:
        return LocalOutlierFactor(
            n_neighbors=self.n_neighbors, algorithm=self.algorithm, leaf_size=self.leaf_size, novelty=True,
        )


class EllipticEnvelopeDetector(SklearnDetector):
    """Robust Gaussian: Minimum Covariance Determinant (Rousseeuw & Van Driessen, Technometrics 1999).

    Fit: scikit-learn's ``EllipticEnvelope`` (FAST-MCD) estimates a robust
    location ``μ`` and covariance ``Σ`` of the standardised features. Score:
    the squared Mahalanobis distance ``(x - μ)ᵀ Σ⁻¹ (x - μ)``
    (``-score_samples``), computed in torch from the saved location and
    precision, on the model's device.

    Args:
        support_fraction: fraction of points in the MCD support (None:
            ``(N + D + 1) / 2N``, the maximum breakdown point).
        assume_centered: estimate the covariance around zero.
        reservoir_size: the most feature vectors fitted on.
        random_state: seed of the sample and of FAST-MCD's random starts.
    """

    name = "elliptic-envelope"
    paper = "Rousseeuw & Van Driessen, A Fast Algorithm for the Minimum Covariance Determinant Estimator, Technometrics 1999"
    search_space: ClassVar = {"support_fraction": (None, 0.6, 0.8, 1.0)}

    def __init__(
        self,
        support_fraction: float | None = None,
        assume_centered: bool = False,
        reservoir_size: int = 50_000,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(reservoir_size=reservoir_size, random_state=random_state)
        self.support_fraction = support_fraction
        self.assume_centered = assume_centered
        self.register_buffer("location", None)
        self.register_buffer("precision", None)
        self.check_hyperparameters()

    def fit_estimator(self, features: np.ndarray) -> None:
        envelope = EllipticEnvelope(
            support_fraction=self.support_fraction, assume_centered=self.assume_centered,
            random_state=self.random_state,
        ).fit(features)
        self.location = torch.from_numpy(envelope.location_).to(self.feature_mean)
        self.precision = torch.from_numpy(envelope.precision_).to(self.feature_mean)

    def score_standardised(self, features: torch.Tensor) -> torch.Tensor:
        centered = features - self.location.to(features)
        return ((centered @ self.precision.to(features)) * centered).sum(dim=1)


class GaussianMixtureDetector(SklearnDetector):
    """Gaussian mixture density (scikit-learn's ``GaussianMixture``, fitted by EM) of standardised features.

    Registered as ``sklearn-gmm``: ``gmm`` is the name of timm-ood's own
    class-conditional mixture detector (OpenOOD's), and a plugin cannot reuse
    a built-in's name. Score: the negated log-likelihood
    ``-log Σ_k π_k N(x; μ_k, Σ_k)`` (``-score_samples``), computed in torch
    from the saved weights, means and Cholesky factors of the precisions.

    Args:
        n_components: number of mixture components.
        covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
        reg_covar: added to the covariances' diagonals.
        max_iter: EM iterations.
        n_init: EM initialisations; the best is kept.
        init_params: ``"kmeans"``, ``"k-means++"``, ``"random"`` or ``"random_from_data"``.
        tol: EM convergence threshold on the lower bound.
        reservoir_size: the most feature vectors fitted on.
        random_state: seed of the sample and of EM's initialisation.
    """

    name = "sklearn-gmm"
    paper = "Dempster, Laird & Rubin, Maximum Likelihood from Incomplete Data via the EM Algorithm, JRSS-B 1977"
    search_space: ClassVar = {
        "n_components": (1, 2, 4, 8, 16),
        "covariance_type": ("full", "tied", "diag", "spherical"),
    }

    def __init__(
        self,
        n_components: int = 1,
        covariance_type: str = "full",
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        tol: float = 1e-3,
        reservoir_size: int = 50_000,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(reservoir_size=reservoir_size, random_state=random_state)
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.tol = tol
        self.register_buffer("weights", None)
        self.register_buffer("means", None)
        self.register_buffer("precisions_cholesky", None)
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        super().check_hyperparameters()
        if self.covariance_type not in ("full", "tied", "diag", "spherical"):
            raise ValueError(
                f"sklearn-gmm: covariance_type must be 'full', 'tied', 'diag' or 'spherical', "
                f"got {self.covariance_type!r}"
            )

    def fit_estimator(self, features: np.ndarray) -> None:
        mixture = GaussianMixture(
            n_components=self.n_components, covariance_type=self.covariance_type, reg_covar=self.reg_covar,
            max_iter=self.max_iter, n_init=self.n_init, init_params=self.init_params, tol=self.tol,
            random_state=self.random_state,
        ).fit(features)
        like = self.feature_mean
        self.weights = torch.from_numpy(mixture.weights_).to(like)
        self.means = torch.from_numpy(mixture.means_).to(like)
        self.precisions_cholesky = torch.from_numpy(mixture.precisions_cholesky_).to(like)

    def score_standardised(self, features: torch.Tensor) -> torch.Tensor:
        means, cholesky = self.means.to(features), self.precisions_cholesky.to(features)
        offsets = features[:, None, :] - means[None]  # [B, K, D]
        if self.covariance_type == "full":  # cholesky [K, D, D]
            whitened = torch.einsum("bkd,kde->bke", offsets, cholesky)
            log_det = torch.diagonal(cholesky, dim1=-2, dim2=-1).log().sum(dim=-1)
        elif self.covariance_type == "tied":  # [D, D]
            whitened = offsets @ cholesky
            log_det = torch.diagonal(cholesky).log().sum()
        elif self.covariance_type == "diag":  # [K, D]
            whitened = offsets * cholesky
            log_det = cholesky.log().sum(dim=-1)
        else:  # spherical: [K]
            whitened = offsets * cholesky[:, None]
            log_det = features.shape[1] * cholesky.log()
        log_gaussians = log_det - 0.5 * (features.shape[1] * math.log(2 * math.pi) + whitened.square().sum(dim=-1))
        return -torch.logsumexp(log_gaussians + self.weights.to(features).log(), dim=1)
