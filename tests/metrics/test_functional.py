"""The functional metrics (``timm_ood.metrics.functional``) against scikit-learn and by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from timm_ood.metrics import (
    FPRAtTPR,
    OODMetrics,
    aupr_in,
    aupr_out,
    auroc,
    binary_curve,
    detection_accuracy,
    detection_error,
    fpr_at_tpr,
    ood_metrics,
    tnr_at_tpr,
)

from ._reference import (
    ATOL,
    METHODS,
    READINGS,
    assert_metrics_equal,
    overlapping_tied,
    reference,
    sklearn_operating_point,
)

# ---------------------------------------------------------------------------
# Functional API against scikit-learn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shift", [0.0, 50.0, -100.0])
@pytest.mark.parametrize("positive", READINGS)
@pytest.mark.parametrize("method", METHODS)
def test_ood_metrics_match_sklearn_on_tied_overlapping_scores(
    dtype: torch.dtype, shift: float, positive: str, method: str
) -> None:
    scores, is_ood = overlapping_tied()
    scores = (scores + shift).to(dtype)
    ours = ood_metrics(scores, is_ood, positive=positive, method=method)
    assert_metrics_equal(ours, reference(scores, is_ood, positive=positive, method=method))


@pytest.mark.parametrize("positive", READINGS)
@pytest.mark.parametrize("tpr", [0.95, 0.8, 0.5, 1.0, 1e-6])
def test_threshold_metrics_match_sklearn_for_any_tpr(positive: str, tpr: float) -> None:
    scores, is_ood = overlapping_tied(n=600, seed=3)
    expected = reference(scores, is_ood, tpr=tpr, positive=positive)
    assert float(fpr_at_tpr(scores, is_ood, tpr, positive)) == expected["fpr_at_tpr"]
    assert float(tnr_at_tpr(scores, is_ood, tpr, positive)) == expected["tnr_at_tpr"]
    error = detection_error(scores, is_ood, "tpr", tpr, positive)
    assert float(error) == pytest.approx(expected["detection_error"], abs=ATOL)


@pytest.mark.parametrize("num_id", [1, 7, 19, 20, 21, 40, 100, 1000])
def test_tpr_threshold_is_exact_at_class_size_boundaries(num_id: int) -> None:
    # tpr * num_id lands on or next to an integer: the first threshold must
    # reach TPR >= tpr exactly as scikit-learn's float64 TPR does.
    scores = torch.cat([torch.arange(num_id, dtype=torch.float64), torch.tensor([0.5, 3.5])])
    is_ood = torch.cat([torch.zeros(num_id), torch.ones(2)])
    for tpr in (0.95, 0.9, 0.7, 0.1, 1 / 3, 0.05 * 19):
        for positive in READINGS:
            _, expected = sklearn_operating_point(scores.numpy(), is_ood.numpy(), tpr, positive)
            assert float(fpr_at_tpr(scores, is_ood, tpr, positive)) == expected


def test_each_function_equals_its_entry_in_ood_metrics() -> None:
    scores, is_ood = overlapping_tied(seed=1)
    params = {"tpr": 0.9, "positive": "ood", "method": "ap", "detection_error_at": "min"}
    together = ood_metrics(scores, is_ood, **params)
    alone = {
        "auroc": auroc(scores, is_ood),
        "fpr_at_tpr": fpr_at_tpr(scores, is_ood, 0.9, "ood"),
        "tnr_at_tpr": tnr_at_tpr(scores, is_ood, 0.9, "ood"),
        "detection_error": detection_error(scores, is_ood, "min"),
        "detection_accuracy": detection_accuracy(scores, is_ood),
        "aupr_in": aupr_in(scores, is_ood, "ap"),
        "aupr_out": aupr_out(scores, is_ood, "ap"),
    }
    assert together == alone
    assert_metrics_equal(together, reference(scores, is_ood, **params))


def test_detection_error_min_is_one_minus_detection_accuracy() -> None:
    scores, is_ood = overlapping_tied(seed=2)
    error = detection_error(scores, is_ood, at="min")
    assert float(error) == pytest.approx(1 - float(detection_accuracy(scores, is_ood)), abs=1e-15)
    assert_metrics_equal(
        {"detection_error": error},
        {"detection_error": reference(scores, is_ood, detection_error_at="min")["detection_error"]},
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64])
def test_score_dtypes_give_the_float64_result(dtype: torch.dtype) -> None:
    scores, is_ood = overlapping_tied(n=500, seed=4)
    scores = (scores * 4).round()  # small integers: exact in every dtype
    expected = ood_metrics(scores, is_ood)
    assert ood_metrics(scores.to(dtype), is_ood.int()) == expected


def test_any_shape_is_flattened() -> None:
    scores, is_ood = overlapping_tied(n=600, seed=5)
    expected = ood_metrics(scores, is_ood)
    assert ood_metrics(scores.reshape(20, 30), is_ood.reshape(20, 30)) == expected


# ---------------------------------------------------------------------------
# Hand-checked values and edge cases


def test_fpr_at_95_tpr_by_hand_in_both_readings() -> None:
    # 20 ID samples scored 1..20; 20 OOD samples scored 10, 12, ..., 48 (ties at 10..20).
    scores = torch.cat([torch.arange(1.0, 21.0), torch.arange(10.0, 50.0, 2.0)])
    is_ood = torch.cat([torch.zeros(20), torch.ones(20)])
    # ID positive: t* = 19 accepts 19/20 ID; OOD accepted: 10, 12, 14, 16, 18 -> 5/20.
    assert float(fpr_at_tpr(scores, is_ood, positive="id")) == 0.25
    assert float(tnr_at_tpr(scores, is_ood, positive="id")) == 0.75
    assert float(detection_error(scores, is_ood, positive="id")) == pytest.approx(0.15)
    # OOD positive: from the top, t* = 12 flags 19/20 OOD; ID flagged: 12..20 -> 9/20.
    assert float(fpr_at_tpr(scores, is_ood, positive="ood")) == 0.45
    assert float(detection_error(scores, is_ood, positive="ood")) == pytest.approx(0.25)


def test_fpr_at_95_tpr_by_hand_with_a_tie_at_the_threshold() -> None:
    # ID scores 1..18 then 19, 19: TPR jumps from 0.9 to 1.0 at t* = 19.
    id_scores = torch.cat([torch.arange(1.0, 19.0), torch.tensor([19.0, 19.0])])
    scores = torch.cat([id_scores, torch.arange(10.0, 50.0, 2.0)])
    is_ood = torch.cat([torch.zeros(20), torch.ones(20)])
    assert float(fpr_at_tpr(scores, is_ood)) == 0.25
    assert float(detection_error(scores, is_ood)) == 0.125  # 0.5 * (1 - 1) + 0.5 * 0.25


def test_binary_curve_groups_ties_and_signed_zeros() -> None:
    scores = torch.tensor([0.0, -0.0, 2.0, -1.0, 2.0, float("inf")], dtype=torch.float16)
    curve = binary_curve(scores, torch.tensor([0, 1, 1, 0, 0, 1]))
    assert curve.thresholds.tolist() == [-1.0, 0.0, 2.0, math.inf]
    assert curve.id_counts.tolist() == [1, 1, 1, 0]
    assert curve.ood_counts.tolist() == [0, 1, 1, 1]
    assert curve.cum_id.tolist() == [1, 2, 3, 3]
    assert curve.cum_ood.tolist() == [0, 1, 2, 3]
    assert (curve.num_id, curve.num_ood) == (3, 3)
    assert curve.thresholds.dtype == curve.cum_id.dtype == torch.float64


@pytest.mark.parametrize("positive", READINGS)
@pytest.mark.parametrize("method", METHODS)
def test_perfectly_separated_scores(positive: str, method: str) -> None:
    scores = torch.cat([torch.linspace(-3, 0, 30), torch.linspace(1, 5, 10)])
    is_ood = torch.cat([torch.zeros(30), torch.ones(10)])
    ours = ood_metrics(scores, is_ood, positive=positive, method=method)
    assert_metrics_equal(ours, reference(scores, is_ood, positive=positive, method=method))
    perfect = {"auroc": 1, "fpr_at_tpr": 0, "tnr_at_tpr": 1, "detection_accuracy": 1}
    assert {key: float(ours[key]) for key in perfect} == perfect
    assert float(ours["aupr_in"]) == float(ours["aupr_out"]) == 1


@pytest.mark.parametrize("positive", READINGS)
@pytest.mark.parametrize("method", METHODS)
def test_fully_tied_scores(positive: str, method: str) -> None:
    scores = torch.full((40,), 0.3)
    is_ood = (torch.arange(40) % 4 == 0).int()  # 10 OOD, 30 ID
    ours = ood_metrics(scores, is_ood, positive=positive, method=method)
    assert_metrics_equal(ours, reference(scores, is_ood, positive=positive, method=method))
    # One decision for everyone: accept all (FPR 1) at any TPR > 0.
    assert [float(ours[key]) for key in ("auroc", "fpr_at_tpr", "detection_accuracy")] == [
        0.5,
        1.0,
        0.5,
    ]


def test_infinite_scores_are_valid() -> None:
    scores, is_ood = overlapping_tied(n=400, seed=6)
    scores[:20] = math.inf
    scores[20:35] = -math.inf
    # scikit-learn rejects infinities; any order-preserving finite stand-in
    # must give the same metrics.
    finite = scores.clone()
    finite[scores == math.inf] = 1e3
    finite[scores == -math.inf] = -1e3
    for positive in READINGS:
        ours = ood_metrics(scores, is_ood, positive=positive)
        assert ours == ood_metrics(finite, is_ood, positive=positive)
        assert_metrics_equal(ours, reference(finite, is_ood, positive=positive))


FUNCTIONS = [auroc, fpr_at_tpr, tnr_at_tpr, detection_error, detection_accuracy, aupr_in, aupr_out]


@pytest.mark.parametrize("function", [*FUNCTIONS, ood_metrics, binary_curve])
def test_nan_raises_naming_the_function(function: Callable[..., object]) -> None:
    scores, is_ood = overlapping_tied(n=50)
    scores[7] = math.nan
    with pytest.raises(ValueError, match=rf"^{function.__name__}: scores contain NaN"):
        function(scores, is_ood)


@pytest.mark.parametrize("function", [*FUNCTIONS, ood_metrics])
@pytest.mark.parametrize(("labels", "missing"), [(0, "OOD"), (1, "ID")])
def test_a_missing_class_raises(function: Callable[..., object], labels: int, missing: str) -> None:
    is_ood = torch.full((10,), labels)
    with pytest.raises(ValueError, match=rf"no {missing} \(is_ood == {1 - labels}\) samples"):
        function(torch.randn(10), is_ood)


def test_invalid_inputs_and_parameters_raise_clear_errors() -> None:
    scores, is_ood = overlapping_tied(n=50)
    with pytest.raises(ValueError, match="same shape"):
        auroc(scores, is_ood[:-1])
    with pytest.raises(ValueError, match="only 0 \\(ID\\) and 1 \\(OOD\\)"):
        auroc(scores, is_ood.int() * 2)
    with pytest.raises(ValueError, match="positive must be one of 'id', 'ood', got 'in'"):
        fpr_at_tpr(scores, is_ood, positive="in")
    with pytest.raises(ValueError, match="method must be one of 'trapezoid', 'ap'"):
        aupr_in(scores, is_ood, method="step")
    with pytest.raises(ValueError, match="at must be one of 'tpr', 'min'"):
        detection_error(scores, is_ood, at="max")
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\]"):
        ood_metrics(scores, is_ood, tpr=95)
    with pytest.raises(ValueError, match=r"FPRAtTPR: tpr must be in \(0, 1\]"):
        FPRAtTPR(tpr=0.0)
    with pytest.raises(ValueError, match="OODMetrics: method must be one of"):
        OODMetrics(method="auc")
