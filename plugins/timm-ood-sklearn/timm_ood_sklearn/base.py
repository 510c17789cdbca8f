"""What every scikit-learn detector shares: standardised pre-logits features, a bounded fit sample.

Fitting streams batches: exact per-feature means and standard deviations over
all of them, and a seeded uniform sample of at most ``reservoir_size``
feature vectors. ``finish_fit`` standardises the sample and fits the
scikit-learn model on it. Scores are the model's ``score_samples`` negated
(scikit-learn's is higher for inliers), so higher = more out-of-distribution.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from timm_ood import Detector, Need, Outputs, Requirements, Tap

from .persistence import estimator_from_tensor, estimator_to_tensor
from .sampling import FeatureMoments, FeatureReservoir

__all__ = ["SerialisedEstimatorDetector", "SklearnDetector"]


class SklearnDetector(Detector):
    """Base of the plugin's detectors: standardised pre-logits features, fitted in one streaming pass.

    Every hyperparameter changes the fit (``fit_hyperparameters`` lists them all).

    Args:
        reservoir_size: the most feature vectors the scikit-learn model is
            fitted on (a uniform sample of the fit data; memory is bounded by
            twice this many vectors).
        random_state: seed of the sample and of the scikit-learn model.
    """

    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), fit=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.fit_hyperparameters = frozenset(cls.hyperparameter_names())

    def __init__(self, reservoir_size: int = 50_000, random_state: int | None = 0) -> None:
        super().__init__()
        self.reservoir_size = reservoir_size
        self.random_state = random_state
        self.register_buffer("feature_mean", None)
        self.register_buffer("feature_scale", None)
        self._moments: FeatureMoments | None = None
        self._reservoir: FeatureReservoir | None = None

    def check_hyperparameters(self) -> None:
        if isinstance(self.reservoir_size, bool) or not isinstance(self.reservoir_size, int) or self.reservoir_size < 2:
            raise ValueError(f"{self.name}: reservoir_size must be an integer >= 2, got {self.reservoir_size!r}")

    # -- fitting ----------------------------------------------------------------------------------
    def reset_fit(self, tap: Tap) -> None:
        self._moments = FeatureMoments()
        self._reservoir = FeatureReservoir(self.reservoir_size, self.random_state)

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        features = outputs.pre_logits.flatten(1)
        self._moments.update(features)
        self._reservoir.add(features)

    def finish_fit(self) -> None:
        mean, scale = self._moments.finish()
        sample = self._reservoir.sample().to(torch.float64)
        self.feature_mean, self.feature_scale = mean, scale
        self.fit_estimator(((sample - mean.cpu()) / scale.cpu()).numpy())
        self._moments = self._reservoir = None

    @abstractmethod
    def fit_estimator(self, features: np.ndarray) -> None:
        """Fit the scikit-learn model on standardised features [N, D] and keep it in buffers."""

    # -- scoring ----------------------------------------------------------------------------------
    def standardise(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """``(f - mean) / std`` in float64, with the fit data's mean and std."""
        features = pre_logits.flatten(1).to(torch.float64)
        return (features - self.feature_mean.to(torch.float64)) / self.feature_scale.to(torch.float64)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.score_standardised(self.standardise(outputs.pre_logits))

    @abstractmethod
    def score_standardised(self, features: torch.Tensor) -> torch.Tensor:
        """``-score_samples`` [B] in float64 for standardised features [B, D], on their device."""


class SerialisedEstimatorDetector(SklearnDetector):
    """A detector whose fitted scikit-learn model is kept whole, in skops' format, in a uint8 buffer.

    Subclasses name the estimator class, the types beyond skops' defaults its
    saved form may contain (``trusted_types``), and build the estimator from
    their hyperparameters (:meth:`make_estimator`). Scoring calls the
    estimator's ``score_samples`` on the CPU.
    """

    estimator_class: ClassVar[type]
    trusted_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, reservoir_size: int = 50_000, random_state: int | None = 0) -> None:
        super().__init__(reservoir_size=reservoir_size, random_state=random_state)
        self.register_buffer("estimator_skops", None)
        self._estimator: Any = None

    @abstractmethod
    def make_estimator(self) -> Any:
        """A new, unfitted estimator with this detector's hyperparameters."""

    def fit_estimator(self, features: np.ndarray) -> None:
        estimator = self.make_estimator().fit(features)
        self.estimator_skops = estimator_to_tensor(estimator)
        self._estimator = estimator

    def load_fitted_state(
        self, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> None:
        """Install saved state; the estimator is rebuilt from trusted types only.

        Raises:
            UntrustedEstimatorError: the saved estimator references a type this
                detector does not trust, or is not a ``estimator_class``.
            KeyError: the state is not this detector's.
        """
        if "estimator_skops" not in state:
            raise KeyError(f"detector {self.name!r}: the saved state has no 'estimator_skops'")
        estimator = estimator_from_tensor(state["estimator_skops"], self.estimator_class, self.trusted_types)
        super().load_fitted_state(state, device)
        self._estimator = estimator

    def score_standardised(self, features: torch.Tensor) -> torch.Tensor:
        samples = self._estimator.score_samples(features.cpu().numpy())
        return torch.from_numpy(-np.asarray(samples, dtype=np.float64)).to(features.device)
