"""The Mahalanobis family: class-conditional Gaussians of features with one tied covariance.

- ``mahalanobis`` (Lee, Lee, Lee & Shin, NeurIPS 2018, Eq. 2-3): the distance
  to the closest class on the pre-logits, with optional input
  preprocessing (``epsilon > 0``);
- ``mahalanobis-odin``: the same detector with input preprocessing switched
  on and the paper's grid of noise magnitudes;
- ``rmd`` (Ren et al. 2021): the class-conditional distance minus the distance
  under one background Gaussian of all the pre-logits;
- ``multi-mahalanobis``: Lee et al.'s feature ensemble, Mahalanobis scores of
  several intermediate layers combined by logistic regression.

All fit in one streaming pass that keeps only float64 sufficient statistics,
:class:`ClassStatistics` (per-class counts and sums, and the second moments
that give the pooled within-class scatter; all-reduced across processes),
turned into :class:`TiedGaussians`, and score with vectorised distances to
every class at once (:func:`squared_mahalanobis`). The class-conditional GMM
(:mod:`timm_ood.detectors.gaussian`) fits from the same accumulator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..distributed import all_gather_rows
from ..hookspecs import hookimpl
from ..model_info import timm_api
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, fit_in_progress, score_dtype
from .perturbation import gradient_sign, signed_step

__all__ = [
    "MAHALANOBIS_EPSILON_GRID",
    "ClassStatistics",
    "Mahalanobis",
    "MahalanobisODIN",
    "MultiMahalanobis",
    "RelativeMahalanobis",
    "TiedGaussians",
    "require_labels",
    "resolve_layers",
    "squared_mahalanobis",
]

#: Lee et al.'s noise magnitudes (the authors' released code), without 0 (no preprocessing).
MAHALANOBIS_EPSILON_GRID: tuple[float, ...] = (0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def require_labels(who: str, labels: torch.Tensor | None) -> torch.Tensor:
    """``labels``, or a ``ValueError`` saying that detector ``who`` fits on labelled batches."""
    if labels is None:
        raise ValueError(f"{who} needs class labels to fit: pass (images, labels) batches")
    return labels


# -- the one accumulator -------------------------------------------------------------------------------
class ClassStatistics:
    """Streaming float64 sufficient statistics of labelled features, summed across processes in :meth:`finish`.

    Per-class counts ``n_c`` and feature sums ``Σ_{i∈c} f_i``, and second
    moments, from which :meth:`finish` gives the class means and covariances:

    - ``per_class=False`` (the tied covariance of the Mahalanobis family and
      the tied GMM): the Gram matrix of all features ``Σ_i f_i f_iᵀ`` [D, D];
      the covariance is the pooled within-class scatter over N,
      ``Σ = (1/N) Σ_c Σ_{i∈c} (f_i - μ_c)(f_i - μ_c)ᵀ`` [D, D];
    - ``per_class=True`` (the full-covariance GMM): one second moment per class
      ``Σ_{i∈c} f_i f_iᵀ`` [K, D, D]; covariances ``Σ_c`` [K', D, D].

    Classes are rows ``0..K-1`` with ``K`` at least ``num_classes``; a label
    beyond them grows the statistics. Negative labels (OOD samples) are refused.
    """

    def __init__(self, num_classes: int = 0, *, per_class: bool = False) -> None:
        self.num_classes = num_classes
        self.per_class = per_class
        self.sums: torch.Tensor | None = None  # [K, D]
        self.counts: torch.Tensor | None = None  # [K]
        self.moments: torch.Tensor | None = None  # [D, D], or [K, D, D] per class

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``features`` [B, ...] (flattened to [B, D]) of the classes ``labels`` [B]."""
        features = features.detach().flatten(1).to(torch.float64)
        labels = labels.to(device=features.device, dtype=torch.long)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(
                "fit data contains negative labels (OOD samples are labelled -1): fit detectors "
                "on in-distribution training data only"
            )
        needed = max(self.num_classes, int(labels.max()) + 1 if labels.numel() else 0)
        dim = features.shape[1]
        sums, counts, moments = self.sums, self.counts, self.moments
        if sums is None or counts is None or moments is None:  # the three are set together
            sums = features.new_zeros(needed, dim)
            counts = features.new_zeros(needed)
            moments = features.new_zeros(needed, dim, dim) if self.per_class else features.new_zeros(dim, dim)
        elif needed > sums.shape[0]:  # a class seen for the first time
            grow = needed - sums.shape[0]
            sums = torch.cat([sums, sums.new_zeros(grow, dim)])
            counts = torch.cat([counts, counts.new_zeros(grow)])
            if self.per_class:
                moments = torch.cat([moments, moments.new_zeros(grow, dim, dim)])
        self.sums, self.counts, self.moments = sums, counts, moments
        sums.index_add_(0, labels, features)
        counts += torch.bincount(labels, minlength=sums.shape[0]).to(torch.float64)  # in place
        if not self.per_class:
            moments += features.T @ features  # in place
            return
        if labels.numel() == 0:
            return  # an empty batch (a process without data under torch.distributed) adds nothing
        # group the batch by class, pad the groups to one length and multiply them in one bmm
        order = labels.argsort(stable=True)
        classes, sizes = torch.unique_consecutive(labels[order], return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(classes), device=labels.device), sizes)
        position = torch.arange(len(labels), device=labels.device) - (sizes.cumsum(0) - sizes)[group]
        padded = features.new_zeros(len(classes), int(sizes.max()), dim)
        padded[group, position] = features[order]
        moments.index_add_(0, classes, padded.transpose(1, 2) @ padded)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(class_ids [K'], counts [K'], means [K', D], covariance)`` over the classes that occurred.

        All-reduces the statistics across processes first. ``covariance`` is the
        tied one [D, D], or one per class [K', D, D] with ``per_class``; both
        maximum likelihood (divided by the counts) and symmetrised.

        Raises:
            ValueError: no data was seen.
        """
        sums, all_counts, moments = self.sums, self.counts, self.moments
        if sums is None or all_counts is None or moments is None:  # the three are set together
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(sums, all_counts, moments)
        if float(all_counts.sum()) == 0:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        present = torch.nonzero(all_counts > 0).squeeze(1)
        counts = all_counts[present]
        means = sums[present] / counts[:, None]
        if self.per_class:
            covariances = moments[present] / counts[:, None, None] - means[:, :, None] * means[:, None, :]
            return present, counts, means, (covariances + covariances.transpose(1, 2)) / 2
        total = counts.sum()
        between = (means * counts[:, None]).T @ means  # Σ_c n_c μ_c μ_cᵀ
        covariance = (moments - between) / total
        return present, counts, means, (covariance + covariance.T) / 2


@dataclass(frozen=True)
class TiedGaussians:
    """Class-conditional Gaussians with one tied covariance, in the centred form the distances use.

    Attributes:
        class_ids: the classes that occurred in the fit data [K'].
        counts: samples per class [K'].
        means: class means [K', D].
        feature_mean: mean of all features [D]; features and means are centred on it.
        covariance: the maximum-likelihood tied covariance [D, D].
        precision: its pseudo-inverse [D, D] (the authors' ``EmpiricalCovariance``).
        means_precision: ``(μ_c - μ) P`` [K', D].
        means_norm: ``(μ_c - μ)ᵀ P (μ_c - μ)`` [K'].
    """

    class_ids: torch.Tensor
    counts: torch.Tensor
    means: torch.Tensor
    feature_mean: torch.Tensor
    covariance: torch.Tensor
    precision: torch.Tensor
    means_precision: torch.Tensor
    means_norm: torch.Tensor

    @classmethod
    def fit(cls, statistics: ClassStatistics) -> TiedGaussians:
        """Means, covariance and precision from streamed statistics (all-reduced across processes)."""
        if statistics.per_class:
            raise ValueError("TiedGaussians.fit needs the pooled statistics: ClassStatistics(per_class=False)")
        class_ids, counts, means, covariance = statistics.finish()
        feature_mean = (means * counts[:, None]).sum(0) / counts.sum()
        precision = torch.linalg.pinv(covariance, hermitian=True)
        centered_means = means - feature_mean
        means_precision = centered_means @ precision
        return cls(class_ids, counts, means, feature_mean, covariance, precision, means_precision,
                   (means_precision * centered_means).sum(1))

    @property
    def background_covariance(self) -> torch.Tensor:
        """Covariance of all features ignoring the classes: ``Σ + Σ_c (n_c/N)(μ_c - μ)(μ_c - μ)ᵀ``."""
        centered_means = self.means - self.feature_mean
        weights = self.counts / self.counts.sum()
        return self.covariance + (centered_means * weights[:, None]).T @ centered_means

    @property
    def expected_distance(self) -> torch.Tensor:
        """Mean squared distance of the fit features to their own class: ``tr(P Σ)``, the rank of ``Σ``."""
        return (self.precision * self.covariance).sum()


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


def _class_distances(detector: Mahalanobis | RelativeMahalanobis, centered: torch.Tensor) -> torch.Tensor:
    """Squared distances [B, K'] of pre-logits centred on the training mean to every class of a fitted detector."""
    as64 = torch.float64
    return squared_mahalanobis(centered, detector.precision.to(as64), detector.means_precision.to(as64),
                               detector.means_norm.to(as64))


# -- mahalanobis, and with input preprocessing ---------------------------------------------------------
class Mahalanobis(Detector):
    """Mahalanobis distance to the closest class (Lee et al., NeurIPS 2018, Eq. 2-3).

    Fit: class means ``μ_c`` and one tied covariance ``Σ`` of the pre-logits
    ``f(x)`` of in-distribution training data (labels used). Paper
    score ``M(x) = max_c -(f(x) - μ_c)ᵀ Σ⁻¹ (f(x) - μ_c)`` (higher =
    in-distribution); returned negated: the smallest squared distance.
    ``Σ⁻¹`` is the pseudo-inverse, as the authors' ``EmpiricalCovariance``.

    With ``epsilon > 0``, the input is first preprocessed (Eq. 3): ``x̂ = x -
    ε · sign(∇_x (f(x) - μ_ĉ)ᵀ Σ⁻¹ (f(x) - μ_ĉ)) / σ`` with ĉ the closest
    class, i.e. a step that raises ``M``; ε is in pixel units like ODIN's.

    This is the single-layer detector on the pre-logits; the
    feature ensemble over intermediate layers is ``multi-mahalanobis``.

    Args:
        epsilon: input preprocessing magnitude in [0, 1] pixel units (0 = off).
    """

    name = "mahalanobis"
    paper = "Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting OOD Samples and Adversarial Attacks, NeurIPS 2018, Eq. 2-3"
    search_space: ClassVar = {"epsilon": (0.0, *MAHALANOBIS_EPSILON_GRID)}
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
        self._statistics: ClassStatistics | None = None

    @property
    def requirements(self) -> Requirements:  # type: ignore[override]
        return self._preprocessing if float(self.epsilon) > 0 else self._plain

    def check_hyperparameters(self) -> None:
        if not float(self.epsilon) >= 0:
            raise ValueError(f"mahalanobis: epsilon must be >= 0 (pixel units), got {self.epsilon!r}")

    def reset_fit(self, tap: Tap) -> None:
        self._statistics = ClassStatistics(max(tap.head_info.num_classes, 0))

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        fit_in_progress(self._statistics, self.name).update(outputs.pre_logits, require_labels("mahalanobis", labels))

    def finish_fit(self) -> None:
        gaussians = TiedGaussians.fit(fit_in_progress(self._statistics, self.name))
        # fitted state stays float64: the distances are computed in float64
        self.class_ids = gaussians.class_ids
        self.class_means = gaussians.means
        self.feature_mean = gaussians.feature_mean
        self.precision = gaussians.precision
        self.means_precision = gaussians.means_precision
        self.means_norm = gaussians.means_norm
        self._statistics = None
        self.is_fitted = True

    def distances(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances [B, K'] to every fitted class, in float64."""
        return _class_distances(self, pre_logits.flatten(1).to(torch.float64) - self.feature_mean.to(torch.float64))

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


class MahalanobisODIN(Mahalanobis):
    """Mahalanobis with input preprocessing (Lee, Lee, Lee & Shin, NeurIPS 2018, Sec. 2.2, Eq. 3).

    ``x̂ = x + ε · sign(∇_x M(x))``, ``M(x) = max_c -(f(x) - μ_c)ᵀ Σ⁻¹ (f(x) - μ_c)``,
    then the ``mahalanobis`` score at ``x̂``. ε is in [0, 1] pixel units and
    divided by the model's normalisation std, as in the authors' code. The
    implementation is :class:`Mahalanobis` with ``epsilon > 0``; this name
    gives it the paper's noise grid as its search space and refuses
    ``epsilon = 0`` (that is ``mahalanobis``).

    The paper tunes ε on validation data over ``{0.0005, 0.001, 0.0014,
    0.002, 0.005, 0.01}`` (and 0) and fixes no default; the default here is
    0.0014, the grid's middle value (also ODIN's CIFAR choice). pytorch-ood's
    ``MahalanobisODIN`` defaults to 0.002.

    Args:
        epsilon: noise magnitude ε > 0 in pixel units.
    """

    name = "mahalanobis-odin"
    paper = ("Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting OOD Samples and Adversarial "
             "Attacks, NeurIPS 2018, Sec. 2.2, Eq. 3 (input preprocessing)")
    search_space: ClassVar = {"epsilon": MAHALANOBIS_EPSILON_GRID}

    def __init__(self, epsilon: float = 0.0014) -> None:
        super().__init__(epsilon=epsilon)

    def check_hyperparameters(self) -> None:
        if not float(self.epsilon) > 0:
            raise ValueError(
                f"mahalanobis-odin: epsilon must be > 0 (pixel units), got {self.epsilon!r}; "
                "without input preprocessing use the 'mahalanobis' detector"
            )


# -- rmd ---------------------------------------------------------------------------------------------
class RelativeMahalanobis(Detector):
    """Relative Mahalanobis distance (Ren et al. 2021, Eq. 3-4) on the pre-logits.

    Fit (labels used): class means ``μ_k`` and the tied covariance ``Σ`` as
    ``mahalanobis``, plus a background Gaussian of all training pre-logits
    ``N(μ_0, Σ_0)``, both maximum likelihood in float64. With
    ``MD_k(z) = (z - μ_k)ᵀ Σ⁻¹ (z - μ_k)`` and ``MD_0(z) = (z - μ_0)ᵀ Σ_0⁻¹ (z - μ_0)``,
    ``RMD_k(z) = MD_k(z) - MD_0(z)`` and the paper's confidence is
    ``-min_k RMD_k(z)``; returned negated, ``min_k MD_k(z) - MD_0(z)`` (higher = more OOD).
    Inverses are pseudo-inverses, as for ``mahalanobis``.

    pytorch-ood's ``RMD`` inverts the scatter matrix ``N Σ_0`` instead of
    ``Σ_0``, which scales ``MD_0`` by 1/N and changes the ranking; this follows
    the paper's covariance. The paper has no hyperparameters.
    """

    name = "rmd"
    paper = ("Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, A Simple Fix to Mahalanobis Distance for "
             "Improving Near-OOD Detection, arXiv:2106.09022 (ICML 2021 UDL workshop), Eq. 3-4")
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), fit=True, fit_labels=True)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("class_ids", None)
        self.register_buffer("feature_mean", None)
        self.register_buffer("precision", None)
        self.register_buffer("means_precision", None)
        self.register_buffer("means_norm", None)
        self.register_buffer("background_precision", None)
        self._statistics: ClassStatistics | None = None

    def reset_fit(self, tap: Tap) -> None:
        self._statistics = ClassStatistics(max(tap.head_info.num_classes, 0))

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        fit_in_progress(self._statistics, self.name).update(outputs.pre_logits, require_labels(self.name, labels))

    def finish_fit(self) -> None:
        gaussians = TiedGaussians.fit(fit_in_progress(self._statistics, self.name))
        self.class_ids = gaussians.class_ids
        self.feature_mean = gaussians.feature_mean
        self.precision = gaussians.precision
        self.means_precision = gaussians.means_precision
        self.means_norm = gaussians.means_norm
        self.background_precision = torch.linalg.pinv(gaussians.background_covariance, hermitian=True)
        self._statistics = None

    def score(self, outputs: Outputs) -> torch.Tensor:
        pre_logits = outputs.pre_logits
        centered = pre_logits.flatten(1).to(torch.float64) - self.feature_mean.to(torch.float64)
        background = ((centered @ self.background_precision.to(torch.float64)) * centered).sum(1)
        return score_dtype((_class_distances(self, centered).amin(dim=1) - background).to(pre_logits.dtype))


# -- multi-mahalanobis ---------------------------------------------------------------------------------
def _pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Channel-wise mean over the spatial positions (Lee et al.'s pooling): [B, C, ...] -> [B, C]."""
    return feature_map.flatten(2).mean(dim=2)


def resolve_layers(layers: Sequence[int] | None, available: int, who: str) -> list[int]:
    """Non-negative positions in the list ``forward_intermediates`` returns (None = all of them)."""
    if layers is None:
        return list(range(available))
    resolved = [index + available if index < 0 else index for index in layers]
    if not resolved or any(not 0 <= index < available for index in resolved) or len(set(resolved)) != len(resolved):
        raise ValueError(
            f"{who}: layers={list(layers)} must be distinct positions in the model's "
            f"{available} intermediate feature maps (0..{available - 1}, or negative from the end)"
        )
    return resolved


def _intermediate(tap: Tap, x: torch.Tensor, position: int) -> torch.Tensor:
    """One intermediate feature map, the forward stopped right after it (timm's ``forward_intermediates``)."""
    (feature_map,) = timm_api(tap.model).forward_intermediates(
        x, indices=[position], intermediates_only=True, stop_early=True)
    return feature_map


class MultiMahalanobis(Detector):
    """Lee et al.'s feature ensemble: Mahalanobis scores of intermediate layers (NeurIPS 2018, Algorithm 1).

    For each layer ℓ of ``forward_intermediates()`` (each stage of a CNN, each
    block of a ViT), the feature map is mean-pooled over its spatial positions
    (channel-wise means, the paper's Sec. 2.2; a ViT's patch tokens, the class
    token excluded) and class Gaussians with one tied covariance are fitted, as
    ``mahalanobis`` does on the pre-logits. Layer score: the squared distance to
    the closest class ``d_ℓ(x) = min_c (f_ℓ(x) - μ_ℓ,c)ᵀ Σ_ℓ⁻¹ (f_ℓ(x) - μ_ℓ,c)``
    (the paper's ``M_ℓ = -d_ℓ``). Ensemble (Algorithm 1): ``Σ_ℓ α_ℓ M_ℓ(x)``,
    higher = in-distribution; returned as ``Σ_ℓ w_ℓ d_ℓ(x) + b``, the
    log-odds of OOD of the logistic regression when the weights are fitted.

    Weights: the paper fits them by logistic regression on validation data
    with OOD (or adversarial) samples: the detector's held-out step
    (``model.fit_held_out(id_data, ood_data)``, :meth:`finish_held_out`). Until then the
    layers are weighted equally in units of their own scale, ``w_ℓ = 1 /
    E_train[d_ℓ]`` where the mean squared distance of the training features to
    their class is exactly ``rank(Σ_ℓ)`` (no OOD data needed), and ``b = 0``.

    With ``epsilon > 0`` each layer scores its own preprocessed input (Algorithm
    1): ``x̂_ℓ = x - ε · sign(∇_x d_ℓ(x)) / σ``, then ``d_ℓ(x̂_ℓ)``; one
    backward and one forward (stopped at layer ℓ) per layer, ε in pixel units
    as for ``mahalanobis``. Fit the weights with the ε you score with.

    The paper's CNN layers are the ends of the dense/residual blocks; here they
    are what timm's ``forward_intermediates()`` returns, so the same code runs
    on CNNs and ViTs.

    Args:
        layers: positions in the list of intermediate feature maps to use
            (negative from the end); None = all of them.
        epsilon: input preprocessing magnitude in [0, 1] pixel units (0 = off).
    """

    name = "multi-mahalanobis"
    paper = ("Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting OOD Samples and Adversarial "
             "Attacks, NeurIPS 2018, Sec. 2.2 (feature ensemble) and Algorithm 1")
    search_space: ClassVar = {"epsilon": Mahalanobis.search_space["epsilon"]}
    fit_hyperparameters: ClassVar = frozenset({"layers"})
    _plain = Requirements(outputs=frozenset({Need.INTERMEDIATES}), fit=True, fit_labels=True, held_out="id+ood")
    _preprocessing = Requirements(
        outputs=frozenset(), fit_outputs=frozenset({Need.INTERMEDIATES}),
        input_gradients=True, fit=True, fit_labels=True, held_out="id+ood",
    )

    def __init__(self, layers: list[int] | None = None, epsilon: float = 0.0) -> None:
        super().__init__()
        self.layers = layers
        self.epsilon = epsilon
        self.check_hyperparameters()
        self.register_buffer("layer_indices", None)  # positions in forward_intermediates' list [L]
        self.register_buffer("layer_dims", None)  # channels per layer [L]
        self.register_buffer("class_ids", None)  # [K']
        self.register_buffer("feature_means", None)  # per-layer means, concatenated [ΣD]
        self.register_buffer("precisions", None)  # per-layer precisions, flattened and concatenated [ΣD²]
        self.register_buffer("means_precision", None)  # [K', ΣD]
        self.register_buffer("means_norm", None)  # [K', L]
        self.register_buffer("layer_weights", None)  # [L]
        self.register_buffer("weights_bias", None)  # []
        self._statistics: list[ClassStatistics] = []
        self._positions: list[int] = []
        self._num_classes = 0
        self._held_out: dict[bool, list[torch.Tensor]] = {False: [], True: []}

    @property
    def requirements(self) -> Requirements:  # type: ignore[override]
        return self._preprocessing if float(self.epsilon) > 0 else self._plain

    def check_hyperparameters(self) -> None:
        if not float(self.epsilon) >= 0:
            raise ValueError(f"multi-mahalanobis: epsilon must be >= 0 (pixel units), got {self.epsilon!r}")
        if self.layers is not None and not all(isinstance(i, int) for i in self.layers):
            raise ValueError(f"multi-mahalanobis: layers must be a list of ints or None, got {self.layers!r}")

    # -- fit ----------------------------------------------------------------------------------
    def reset_fit(self, tap: Tap) -> None:
        self._num_classes = max(tap.head_info.num_classes, 0)
        self._statistics, self._positions = [], []

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        labels = require_labels(self.name, labels)
        maps = outputs.intermediates
        if not self._statistics:
            self._positions = resolve_layers(self.layers, len(maps), self.name)
            self._statistics = [ClassStatistics(self._num_classes) for _ in self._positions]
        for position, statistics in zip(self._positions, self._statistics, strict=True):
            statistics.update(_pooled(maps[position]), labels)

    def finish_fit(self) -> None:
        layers = [TiedGaussians.fit(statistics) for statistics in self._statistics]
        class_ids = layers[0].class_ids
        device = class_ids.device
        self.layer_indices = torch.tensor(self._positions, device=device)
        self.layer_dims = torch.tensor([g.feature_mean.numel() for g in layers], device=device)
        self.class_ids = class_ids
        self.feature_means = torch.cat([g.feature_mean for g in layers])
        self.precisions = torch.cat([g.precision.flatten() for g in layers])
        self.means_precision = torch.cat([g.means_precision for g in layers], dim=1)
        self.means_norm = torch.stack([g.means_norm for g in layers], dim=1)
        self.layer_weights = 1 / torch.stack([g.expected_distance for g in layers]).clamp_min(1.0)
        self.weights_bias = torch.zeros((), dtype=torch.float64, device=device)
        self._statistics = []

    # -- distances ------------------------------------------------------------------------------
    def _layer_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean [D], precision [D, D], means_precision [K', D], means_norm [K'])`` of one layer, float64."""
        dims = self.layer_dims.tolist()
        start, dim = sum(dims[:layer]), dims[layer]
        matrix_start = sum(d * d for d in dims[:layer])
        as64 = torch.float64
        return (
            self.feature_means[start:start + dim].to(as64),
            self.precisions[matrix_start:matrix_start + dim * dim].view(dim, dim).to(as64),
            self.means_precision[:, start:start + dim].to(as64),
            self.means_norm[:, layer].to(as64),
        )

    def layer_distance(self, layer: int, feature_map: torch.Tensor) -> torch.Tensor:
        """``d_ℓ``: squared distance to the closest class of one layer's feature map, [B] float64.

        Args:
            layer: the layer's position among the fitted layers (0..L-1).
            feature_map: that layer's intermediate map [B, C, H, W].
        """
        mean, precision, means_precision, means_norm = self._layer_state(layer)
        centered = _pooled(feature_map).to(torch.float64) - mean
        return squared_mahalanobis(centered, precision, means_precision, means_norm).amin(dim=1)

    def layer_distances(self, outputs: Outputs) -> torch.Tensor:
        """``d_ℓ`` of every fitted layer, [B, L] float64, preprocessing the input per layer when ε > 0."""
        positions = self.layer_indices.tolist()
        if float(self.epsilon) == 0:
            maps = outputs.intermediates
            return torch.stack([self.layer_distance(layer, maps[position])
                                for layer, position in enumerate(positions)], dim=1)
        return torch.stack([self._preprocessed_distance(outputs.tap, outputs.inputs, layer, position)
                            for layer, position in enumerate(positions)], dim=1)

    def _preprocessed_distance(self, tap: Tap, x: torch.Tensor, layer: int, position: int) -> torch.Tensor:
        """``d_ℓ(x̂_ℓ)`` with ``x̂_ℓ = x - ε · sign(∇_x d_ℓ(x)) / σ``: a step towards layer ℓ's closest class."""

        def distance(inputs: torch.Tensor) -> torch.Tensor:
            return self.layer_distance(layer, _intermediate(tap, inputs, position))

        sign = gradient_sign(x, lambda inputs: distance(inputs).sum())
        return distance(signed_step(x, sign, float(self.epsilon), tap.input_std(x)))

    def score(self, outputs: Outputs) -> torch.Tensor:
        combined = self.layer_distances(outputs) @ self.layer_weights.to(torch.float64)
        combined = combined + self.weights_bias.to(torch.float64)
        reference = outputs.inputs if float(self.epsilon) > 0 else outputs.intermediates[0]
        return score_dtype(combined.to(reference.dtype))

    # -- the paper's weighting: the held-out step ------------------------------------------------
    def reset_held_out(self) -> None:
        self._held_out = {False: [], True: []}

    def update_held_out(self, outputs: Outputs, is_ood: bool) -> None:
        self._held_out[is_ood].append(self.layer_distances(outputs).detach())

    def finish_held_out(self) -> None:
        """Fit the layer weights by logistic regression on held-out ID and OOD data (the paper's Sec. 3).

        The per-layer distances ``d_ℓ`` of both sets (with this detector's ε)
        are the regression's inputs, OOD the positive class. As the authors'
        ``LogisticRegressionCV()``: L2 penalty, ``C`` chosen among
        ``logspace(-4, 4, 10)`` by 5-fold stratified cross-validated accuracy,
        then refitted on all samples; here on standardised inputs, whose scale
        is folded back into ``w_ℓ`` and ``b``, with seeded shuffled folds over
        the samples in a canonical order, so the weights do not depend on the
        order of the data or on how it was split over processes. Scores become the regression's
        log-odds of OOD. Run it through ``model.fit_held_out(id_data, ood_data)``.

        Raises:
            ValueError: fewer than 5 samples of a set (5-fold cross-validation).
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold

        layers = len(self.layer_dims)
        sets = [all_gather_rows(torch.cat(self._held_out[is_ood]) if self._held_out[is_ood]
                                else torch.zeros(0, layers, dtype=torch.float64, device=self.layer_dims.device))
                .cpu() for is_ood in (False, True)]
        self._held_out = {False: [], True: []}
        if min(len(s) for s in sets) < 5:
            raise ValueError(
                f"multi-mahalanobis: the held-out step needs at least 5 in-distribution and 5 OOD samples (5-fold "
                f"cross-validation), got {len(sets[0])} and {len(sets[1])}"
            )
        inputs = torch.cat(sets)
        targets = torch.cat([torch.zeros(len(sets[0])), torch.ones(len(sets[1]))])
        # a canonical row order and seeded folds: the fit depends on the samples, not on how the data was
        # ordered or split over processes
        order = torch.from_numpy(np.lexsort((*inputs.numpy().T[::-1], targets.numpy())))
        inputs, targets = inputs[order], targets[order]
        mean, scale = inputs.mean(0), inputs.std(0).clamp_min(torch.finfo(torch.float64).tiny)
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
        search = GridSearchCV(LogisticRegression(), {"C": np.logspace(-4, 4, 10)}, cv=folds, scoring="accuracy")
        regression = search.fit(((inputs - mean) / scale).numpy(), targets.numpy()).best_estimator_
        coefficients = torch.from_numpy(regression.coef_[0]).to(torch.float64) / scale
        bias = float(regression.intercept_[0]) - float((coefficients * mean).sum())
        self.layer_weights = coefficients.to(self.layer_weights.device)
        self.weights_bias = torch.tensor(bias, dtype=torch.float64, device=self.layer_weights.device)


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    # Only ``mahalanobis`` is registered from here; ``mahalanobis-odin`` is registered by
    # :mod:`.gradient` and ``rmd`` / ``multi-mahalanobis`` by :mod:`.gaussian`, where they always were,
    # so that ``list_detectors()`` keeps its order (registration follows ``BUILTIN_PLUGINS``).
    return [Mahalanobis]
