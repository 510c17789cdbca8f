"""timm-ood's conformance kit on every detector of the plugin."""

from __future__ import annotations

from timm_ood.testing import parametrize_with_checks

from timm_ood_sklearn import (
    EllipticEnvelopeDetector,
    GaussianMixtureDetector,
    IsolationForestDetector,
    LocalOutlierFactorDetector,
    OneClassSVMDetector,
    timm_ood_detectors,
)

DETECTORS = [
    IsolationForestDetector(n_estimators=25),  # the contract does not depend on the number of trees
    OneClassSVMDetector,
    LocalOutlierFactorDetector,
    EllipticEnvelopeDetector,
    GaussianMixtureDetector,
    GaussianMixtureDetector(n_components=3, covariance_type="diag"),
]


def test_every_detector_of_the_plugin_is_checked() -> None:
    assert set(timm_ood_detectors()) <= {d if isinstance(d, type) else type(d) for d in DETECTORS}


@parametrize_with_checks(DETECTORS)
def test_conformance(check) -> None:
    check()
