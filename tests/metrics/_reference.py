"""scikit-learn references for timm_ood.metrics, and overlapping, heavily tied scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

READINGS = ("id", "ood")


METHODS = ("trapezoid", "ap")


ATOL = 1e-12


def sklearn_roc(
    scores: np.ndarray, is_ood: np.ndarray, positive: str
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of every threshold; ID positive ranks by -score (accept when score <= t)."""
    if positive == "id":
        fpr, tpr, _ = roc_curve(1 - is_ood, -scores, drop_intermediate=False)
    else:
        fpr, tpr, _ = roc_curve(is_ood, scores, drop_intermediate=False)
    return fpr, tpr


def sklearn_operating_point(
    scores: np.ndarray, is_ood: np.ndarray, tpr: float, positive: str
) -> tuple[float, float]:
    """(TPR, FPR) at the first threshold whose TPR reaches ``tpr``."""
    fpr_curve, tpr_curve = sklearn_roc(scores, is_ood, positive)
    at = np.searchsorted(tpr_curve, tpr, side="left")
    return tpr_curve[at], fpr_curve[at]


def sklearn_metrics(
    scores: np.ndarray,
    is_ood: np.ndarray,
    tpr: float = 0.95,
    positive: str = "id",
    method: str = "trapezoid",
    detection_error_at: str = "tpr",
) -> dict[str, float]:
    """The seven metrics from scikit-learn's curves (metrics.md definitions)."""
    is_id = 1 - is_ood
    tpr_at, fpr_at = sklearn_operating_point(scores, is_ood, tpr, positive)
    fpr_id, tpr_id = sklearn_roc(scores, is_ood, "id")
    if method == "trapezoid":
        precision_in, recall_in, _ = precision_recall_curve(is_id, -scores)
        precision_out, recall_out, _ = precision_recall_curve(is_ood, scores)
        area_in, area_out = auc(recall_in, precision_in), auc(recall_out, precision_out)
    else:
        area_in = average_precision_score(is_id, -scores)
        area_out = average_precision_score(is_ood, scores)
    return {
        "auroc": roc_auc_score(is_ood, scores),
        "fpr_at_tpr": fpr_at,
        "tnr_at_tpr": 1 - fpr_at,
        "detection_error": (
            0.5 * (1 - tpr_at) + 0.5 * fpr_at
            if detection_error_at == "tpr"
            else np.min(0.5 * (1 - tpr_id) + 0.5 * fpr_id)
        ),
        "detection_accuracy": np.max(0.5 * (tpr_id + 1 - fpr_id)),
        "aupr_in": area_in,
        "aupr_out": area_out,
    }


def assert_metrics_equal(ours: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert list(ours) == list(expected)
    for key, value in ours.items():
        assert value.dtype == torch.float64 and value.ndim == 0, key
        assert float(value) == pytest.approx(expected[key], abs=ATOL, rel=0), key


def overlapping_tied(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping ID/OOD scores rounded to one decimal: heavy ties across classes."""
    generator = torch.Generator().manual_seed(seed)
    is_ood = torch.rand(n, generator=generator) < 0.4
    scores = torch.randn(n, generator=generator, dtype=torch.float64) + 0.8 * is_ood
    return scores.round(decimals=1), is_ood


def reference(scores: torch.Tensor, is_ood: torch.Tensor, **params: object) -> dict[str, float]:
    return sklearn_metrics(scores.double().numpy(), is_ood.long().numpy(), **params)
