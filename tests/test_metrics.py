"""Tests of timm_ood.metrics against scikit-learn, by hand, and under torch.distributed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

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
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC

from timm_ood.metrics import (
    AUROC,
    OOD_METRIC_KEYS,
    AUPRIn,
    AUPROut,
    DetectionAccuracy,
    DetectionError,
    FPRAtTPR,
    OODMetrics,
    TNRAtTPR,
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

from ._distributed import GLOO_AVAILABLE, gloo_process_group, run_two_ranks

READINGS = ("id", "ood")
METHODS = ("trapezoid", "ap")
ATOL = 1e-12


# ---------------------------------------------------------------------------
# Reference and data


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


# ---------------------------------------------------------------------------
# Metric classes


def make_metric(key: str, tpr: float, positive: str, method: str, at: str) -> Metric:
    return {
        "auroc": AUROC(),
        "fpr_at_tpr": FPRAtTPR(tpr, positive),
        "tnr_at_tpr": TNRAtTPR(tpr, positive),
        "detection_error": DetectionError(at, tpr, positive),
        "detection_accuracy": DetectionAccuracy(),
        "aupr_in": AUPRIn(method),
        "aupr_out": AUPROut(method),
    }[key]


def batches_in_different_ranges() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A stream of batches: ID-only, OOD-only and mixed, each in its own score range."""
    scores, is_ood = overlapping_tied(n=1200, seed=7)
    offsets = [0.0, 50.0, -100.0, 3.0]
    pieces = [
        (scores[:300][~is_ood[:300]], is_ood[:300][~is_ood[:300]]),  # ID only
        (scores[300:600][is_ood[300:600]], is_ood[300:600][is_ood[300:600]]),  # OOD only
        (scores[600:900], is_ood[600:900]),
        (scores[900:], is_ood[900:].int()),
    ]
    return [
        (batch + offset, labels) for (batch, labels), offset in zip(pieces, offsets, strict=True)
    ]


@pytest.mark.parametrize("positive", READINGS)
@pytest.mark.parametrize(("method", "at"), [("trapezoid", "tpr"), ("ap", "min")])
def test_classes_over_a_stream_of_updates_match_sklearn(
    positive: str, method: str, at: str
) -> None:
    batches = batches_in_different_ranges()
    union = (torch.cat([s for s, _ in batches]), torch.cat([y for _, y in batches]))
    expected = reference(*union, tpr=0.9, positive=positive, method=method, detection_error_at=at)
    for key in OOD_METRIC_KEYS:
        metric = make_metric(key, 0.9, positive, method, at)
        for scores, is_ood in batches:
            metric.update(scores, is_ood)
        assert_metrics_equal({key: metric.compute()}, {key: expected[key]})
    collection = OODMetrics(0.9, positive, method, detection_error_at=at)
    for scores, is_ood in batches:
        collection.update(scores, is_ood)
    assert_metrics_equal(collection.compute(), expected)


def test_ood_metrics_class_equals_the_individual_metrics() -> None:
    batches = batches_in_different_ranges()
    collection = OODMetrics(tpr=0.8, positive="ood", prefix="val/", postfix="_x")
    individual = {key: make_metric(key, 0.8, "ood", "trapezoid", "tpr") for key in OOD_METRIC_KEYS}
    for scores, is_ood in batches:
        collection.update(scores, is_ood)
        for metric in individual.values():
            metric.update(scores, is_ood)
    result = collection.compute()
    assert list(result) == [f"val/{key}_x" for key in OOD_METRIC_KEYS]
    assert result == {f"val/{key}_x": metric.compute() for key, metric in individual.items()}
    assert len(collection.compute_groups) == 1  # one shared state


def test_torchmetrics_binary_auroc_is_wrong_on_shifted_raw_scores() -> None:
    # Why the classes never route scores through torchmetrics' Binary* metrics:
    # it applies a sigmoid to values outside [0, 1], which saturates at +50.
    generator = torch.Generator().manual_seed(8)
    is_ood = torch.rand(2000, generator=generator) < 0.5
    scores = torch.rand(2000, generator=generator) + 0.5 * is_ood + 50.0
    expected = roc_auc_score(is_ood.numpy(), scores.double().numpy())
    assert expected > 0.8
    theirs = BinaryAUROC()
    ours = AUROC()
    for metric in (theirs, ours):
        metric.update(scores, is_ood.long())
    assert abs(float(theirs.compute()) - expected) > 0.25
    assert float(ours.compute()) == pytest.approx(expected, abs=ATOL)


def test_forward_returns_batch_values_and_accumulates() -> None:
    batches = batches_in_different_ranges()
    metric = AUPROut()
    collection = OODMetrics()
    for scores, is_ood in batches:
        batch_value = metric(scores, is_ood)
        batch_values = collection(scores, is_ood)
        if is_ood.any() and not is_ood.all():
            assert float(batch_value) == float(aupr_out(scores, is_ood))
            assert batch_values == ood_metrics(scores, is_ood)
        else:  # a batch with one class only has no metric value
            assert math.isnan(batch_value) and all(map(math.isnan, batch_values.values()))
    union = (torch.cat([s for s, _ in batches]), torch.cat([y for _, y in batches]))
    assert metric.compute() == aupr_out(*union)
    assert collection.compute() == ood_metrics(*union)


def test_nan_update_raises_naming_the_metric_and_keeps_the_state() -> None:
    scores, is_ood = overlapping_tied(n=100)
    for metric in (FPRAtTPR(), OODMetrics()):
        metric.update(scores, is_ood)
        name = type(metric).__name__
        with pytest.raises(ValueError, match=rf"^{name}: scores contain NaN"):
            metric.update(torch.tensor([0.1, math.nan]), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="same shape"):
            metric.update(scores, is_ood[:-1])
        with pytest.raises(ValueError, match="only 0"):
            metric.update(scores, is_ood.int() - 1)
        assert metric.compute() is not None


def test_missing_samples_or_class_raise_at_compute() -> None:
    metric = DetectionAccuracy()
    with (
        pytest.raises(ValueError, match="DetectionAccuracy: no samples"),
        pytest.warns(UserWarning),
    ):
        metric.compute()
    metric.update(torch.randn(5), torch.zeros(5))
    with pytest.raises(ValueError, match=r"DetectionAccuracy: no OOD \(is_ood == 1\) samples"):
        metric.compute()
    collection = OODMetrics()
    with pytest.raises(ValueError, match="no samples"):
        collection.compute()


def test_reset_clone_and_to() -> None:
    scores, is_ood = overlapping_tied(n=300, seed=9)
    collection = OODMetrics()
    collection.update(scores[:150], is_ood[:150])
    copy = collection.clone(prefix="copy_")
    collection.update(scores[150:], is_ood[150:])
    assert collection.compute() == ood_metrics(scores, is_ood)
    copied = {key.removeprefix("copy_"): value for key, value in copy.compute().items()}
    assert copied == ood_metrics(scores[:150], is_ood[:150])

    collection.reset()
    with pytest.raises(ValueError, match="no samples"):
        collection.compute()
    collection = collection.to(torch.device("cpu"))
    collection.update(scores, is_ood)
    assert collection.compute() == ood_metrics(scores, is_ood)

    metric = AUROC().to("cpu")
    metric.update(scores, is_ood)
    metric.reset()
    metric.update(scores[:150], is_ood[:150])
    assert metric.compute() == auroc(scores[:150], is_ood[:150])


def test_update_copies_the_caller_tensors() -> None:
    scores, is_ood = overlapping_tied(n=100)
    metric = AUROC()
    metric.update(scores, is_ood)
    expected = auroc(scores, is_ood)
    scores.zero_()
    is_ood.fill_(True)
    assert metric.compute() == expected


# ---------------------------------------------------------------------------
# torch.distributed: two gloo processes on the CPU


def shard_of_rank(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unequal shards in different score ranges; rank 1 sees no OOD sample."""
    scores, is_ood = overlapping_tied(n=900, seed=10)
    if rank == 0:
        return scores[:700] - 100.0, is_ood[:700]
    keep = ~is_ood[700:]
    return scores[700:][keep] + 50.0, is_ood[700:][keep]


def distributed_worker(rank: int, init_file: str, results_dir: str) -> None:
    with gloo_process_group(rank, init_file):
        scores, is_ood = shard_of_rank(rank)
        collection = OODMetrics(positive="ood", method="ap")
        single = FPRAtTPR(0.9)
        for batch in range(2):  # two updates per rank
            part = slice(batch * len(scores) // 2, (batch + 1) * len(scores) // 2)
            collection.update(scores[part], is_ood[part])
            single.update(scores[part], is_ood[part])
        results = {**collection.compute(), "single": single.compute()}
        # The local state is restored after the sync and keeps accumulating.
        assert sum(len(batch) for batch in single.scores) == len(scores)
        torch.save(results, Path(results_dir) / f"rank{rank}.pt")


@pytest.mark.skipif(not GLOO_AVAILABLE, reason="gloo backend unavailable")
def test_distributed_compute_equals_single_process_on_the_union(tmp_path: Path) -> None:
    run_two_ranks(distributed_worker, tmp_path)

    shards = [shard_of_rank(rank) for rank in range(2)]
    union = (torch.cat([s for s, _ in shards]), torch.cat([y for _, y in shards]))
    expected = {
        **ood_metrics(*union, positive="ood", method="ap"),
        "single": fpr_at_tpr(*union, tpr=0.9),
    }
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected
