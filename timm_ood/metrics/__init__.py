"""OOD detection metrics: torchmetrics classes over one exact functional core.

Scores are higher for more out-of-distribution inputs; ``is_ood`` is 1 for OOD
and 0 for in-distribution samples. Definitions: ``docs/metrics.md``. The
default reading has the in-distribution class positive (ODIN, Lee et al.);
``positive="ood"`` gives the OpenOOD / pytorch-ood reading.

Classes (:mod:`.classes`) are :class:`torchmetrics.Metric` subclasses;
:class:`OODMetrics` computes all seven from one sort. The functions
(:mod:`.functional`) take all scores at once, and their ``*_from_curve``
variants reuse one :class:`OODCurve`.
"""

from typing import TYPE_CHECKING, Any

from .calibration import expected_calibration_error
from .functional import (
    OOD_METRIC_KEYS,
    DetectionErrorAt,
    OODCurve,
    Positive,
    PRMethod,
    aupr_in,
    aupr_in_from_curve,
    aupr_out,
    aupr_out_from_curve,
    auroc,
    auroc_from_curve,
    binary_curve,
    detection_accuracy,
    detection_accuracy_from_curve,
    detection_error,
    detection_error_from_curve,
    fpr_at_tpr,
    fpr_at_tpr_from_curve,
    ood_metrics,
    ood_metrics_from_curve,
    tnr_at_tpr,
    tnr_at_tpr_from_curve,
)

if TYPE_CHECKING:
    from .classes import (
        AUROC,
        AUPRIn,
        AUPROut,
        DetectionAccuracy,
        DetectionError,
        FPRAtTPR,
        OODMetrics,
        TNRAtTPR,
    )

#: the torchmetrics classes, imported on first use: importing torchmetrics takes seconds
_CLASSES = ("AUROC", "AUPRIn", "AUPROut", "DetectionAccuracy", "DetectionError", "FPRAtTPR", "OODMetrics", "TNRAtTPR")


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        from . import classes

        return getattr(classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUROC",
    "OOD_METRIC_KEYS",
    "AUPRIn",
    "AUPROut",
    "DetectionAccuracy",
    "DetectionError",
    "DetectionErrorAt",
    "FPRAtTPR",
    "OODCurve",
    "OODMetrics",
    "PRMethod",
    "Positive",
    "TNRAtTPR",
    "aupr_in",
    "aupr_in_from_curve",
    "aupr_out",
    "aupr_out_from_curve",
    "auroc",
    "auroc_from_curve",
    "binary_curve",
    "detection_accuracy",
    "detection_accuracy_from_curve",
    "detection_error",
    "detection_error_from_curve",
    "expected_calibration_error",
    "fpr_at_tpr",
    "fpr_at_tpr_from_curve",
    "ood_metrics",
    "ood_metrics_from_curve",
    "tnr_at_tpr",
    "tnr_at_tpr_from_curve",
]
