"""timm-ood-sklearn: scikit-learn outlier detectors on a timm model's pre-logits features.

A timm-ood plugin: installing the package registers ``isolation-forest``,
``one-class-svm``, ``lof``, ``elliptic-envelope`` and ``sklearn-gmm`` through
the ``timm_ood`` entry point, so that ``timm_ood.wrap(model,
"isolation-forest")`` works with no import.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import timm_ood
from timm_ood import Detector

from .detectors import (
    EllipticEnvelopeDetector,
    GaussianMixtureDetector,
    IsolationForestDetector,
    LocalOutlierFactorDetector,
    OneClassSVMDetector,
)
from .persistence import UntrustedEstimatorError

try:
    __version__ = version("timm-ood-sklearn")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = [
    "EllipticEnvelopeDetector",
    "GaussianMixtureDetector",
    "IsolationForestDetector",
    "LocalOutlierFactorDetector",
    "OneClassSVMDetector",
    "UntrustedEstimatorError",
    "__version__",
    "timm_ood_detectors",
]


@timm_ood.hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    """The plugin's detectors, registered by timm-ood through the ``timm_ood`` entry point."""
    return [
        IsolationForestDetector,
        OneClassSVMDetector,
        LocalOutlierFactorDetector,
        EllipticEnvelopeDetector,
        GaussianMixtureDetector,
    ]
