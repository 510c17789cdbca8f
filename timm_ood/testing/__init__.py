"""The detector conformance kit: check that a detector keeps timm-ood's contract.

Modelled on scikit-learn's ``check_estimator``: one generator of named checks,
each testing one property on small seeded data and saying how to fix the
detector when it fails; which checks run follows from what the detector
declares (its :class:`~timm_ood.Requirements`). Plugin authors run it in their
own tests::

    from timm_ood.testing import check_detector, parametrize_with_checks

    check_detector(MyDetector)                       # raises DetectorCheckError on the first failure

    @parametrize_with_checks([MyDetector, MyDetector(k=5)])
    def test_conformance(check):                     # one pytest test per check
        check()

The checks run on a tiny timm ``test_*`` model that the kit trains in a second
or two on scikit-learn's digits (cached per process), with uniform-noise
images as the easy out-of-distribution case: the model is trained with
outlier exposure on other noise images (Hendrycks, Mazeika & Dietterich,
ICLR 2019), so that noise is out-of-distribution both for its predictions and
for its features. The default architecture is ``test_convnext``; pass
``model="test_resnet"`` (any timm architecture name) to check on another, or
a model of your own trained on the kit's task as :func:`conformance_model`
trains one. Nothing here imports pytest except :func:`parametrize_with_checks`.

The package, as scikit-learn keeps ``estimator_checks`` apart from its test data:

- ``task``: the conformance task, the digits and noise (:func:`conformance_data`)
  and the model trained on them (:func:`conformance_model`);
- ``checks``: the checks themselves (:data:`ALL_CHECKS`), cheapest first, each
  with when it applies;
- ``runner``: running them (:func:`detector_checks`, :func:`check_detector`,
  :func:`parametrize_with_checks`, :class:`DetectorCheck`,
  :class:`DetectorCheckError`);
- ``_helpers``: what the checks share (the detector under check with its model
  and data, scoring helpers), private.

Import from ``timm_ood.testing``; the modules' layout is not part of the API.
"""

from __future__ import annotations

from .checks import ALL_CHECKS, MIN_SEPARATION_AUROC
from .runner import (
    DetectorCheck,
    DetectorCheckError,
    check_detector,
    detector_checks,
    parametrize_with_checks,
)
from .task import DEFAULT_ARCHITECTURE, ConformanceData, conformance_data, conformance_model

__all__ = [
    "ALL_CHECKS",
    "DEFAULT_ARCHITECTURE",
    "MIN_SEPARATION_AUROC",
    "ConformanceData",
    "DetectorCheck",
    "DetectorCheckError",
    "check_detector",
    "conformance_data",
    "conformance_model",
    "detector_checks",
    "parametrize_with_checks",
]
