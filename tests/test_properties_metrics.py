"""Property-based tests (hypothesis) of timm_ood.metrics: what hand-picked examples cannot reach.

Every metric is a function of the tie-grouped counts of ID and OOD samples per distinct score
(``methods/metrics.md``), so:

* permuting the samples (scores and labels together) changes nothing, exactly;
* a strictly increasing map of the scores changes nothing, exactly (ties stay ties);
* the OpenOOD reading (``positive="ood"``) of ``(scores, is_ood)`` *is* the seeds' reading
  (``positive="id"``) of ``(-scores, 1 - is_ood)``: OOD becomes the class accepted by the low
  threshold, so TPR and FPR swap roles, AUPR-In and AUPR-Out swap, and AUROC is unchanged;
* the numbers are scikit-learn's on data with many ties, in both readings;
* the torchmetrics classes fed random chunks give exactly the functional result.

Generated data always holds at least one ID and one OOD sample.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from timm_ood.metrics import (
    OOD_METRIC_KEYS,
    aupr_in,
    aupr_out,
    auroc,
    detection_accuracy,
    detection_error,
    fpr_at_tpr,
    ood_metrics,
    tnr_at_tpr,
)

#: Sizes keep the whole file well under 30 s on one core.
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Agreement with scikit-learn: float64 rounding only (areas and rates are sums of a few hundred terms).
SKLEARN_ATOL = 1e-12

READINGS = ("id", "ood")
METHODS = ("trapezoid", "ap")
DETECTION_ERROR_AT = ("tpr", "min")
TPRS = st.one_of(st.sampled_from([0.95, 0.9, 0.5, 0.8, 1.0, 0.99]),
                 st.floats(min_value=1e-3, max_value=1.0, exclude_min=False))
PARAMS = st.fixed_dictionaries({
    "tpr": TPRS,
    "positive": st.sampled_from(READINGS),
    "method": st.sampled_from(METHODS),
    "detection_error_at": st.sampled_from(DETECTION_ERROR_AT),
})


# ---------------------------------------------------------------------------
# Strategies


def _tied_values(max_distinct: int = 6) -> st.SearchStrategy[float]:
    """A few integer values (optionally halved): massive ties within and across the classes."""
    return st.integers(-max_distinct // 2, max_distinct // 2).map(float)


def _any_float(width: int) -> st.SearchStrategy[float]:
    """Any non-NaN float of the width, +/-inf and -0.0 included."""
    return st.floats(allow_nan=False, allow_infinity=True, width=width)


@st.composite
def ood_data(draw, *, finite: bool = False, ties_only: bool = False, max_size: int = 80,
             dtypes=(torch.float64, torch.float32)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, is_ood)`` with at least one ID and one OOD sample, in a random order.

    Half the time the scores come from a handful of integers (many ties); otherwise from any
    float of the dtype's width (inf and -0.0 included unless ``finite``), mixed with a few tied
    values so that ties still occur.
    """
    dtype = draw(st.sampled_from(dtypes))
    width = 32 if dtype == torch.float32 else 64
    num_id = draw(st.integers(1, max_size // 2))
    num_ood = draw(st.integers(1, max_size // 2))
    if ties_only or draw(st.booleans()):
        values = _tied_values(draw(st.integers(1, 8)))
    else:
        floats = (st.floats(allow_nan=False, allow_infinity=False, width=width)
                  if finite else _any_float(width))
        values = st.one_of(floats, _tied_values(), st.sampled_from([0.0, -0.0]))
    scores = draw(st.lists(values, min_size=num_id + num_ood, max_size=num_id + num_ood))
    labels = [False] * num_id + [True] * num_ood
    order = draw(st.permutations(range(num_id + num_ood)))
    scores_t = torch.tensor([scores[i] for i in order], dtype=dtype)
    is_ood = torch.tensor([labels[i] for i in order])
    return scores_t, is_ood


def _all_metrics(scores: torch.Tensor, is_ood: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """``ood_metrics`` plus each single-metric function, so every entry point is exercised."""
    tpr, positive, method, at = params["tpr"], params["positive"], params["method"], params["detection_error_at"]
    values = {f"ood_metrics.{k}": v for k, v in ood_metrics(scores, is_ood, tpr, positive, method, at).items()}
    values.update({
        "auroc": auroc(scores, is_ood),
        "fpr_at_tpr": fpr_at_tpr(scores, is_ood, tpr, positive),
        "tnr_at_tpr": tnr_at_tpr(scores, is_ood, tpr, positive),
        "detection_error": detection_error(scores, is_ood, at, tpr, positive),
        "detection_accuracy": detection_accuracy(scores, is_ood),
        "aupr_in": aupr_in(scores, is_ood, method),
        "aupr_out": aupr_out(scores, is_ood, method),
    })
    return values


def _assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Bit-identical metric values (tolerance 0): the metrics depend on tie-grouped counts only."""
    assert actual.keys() == expected.keys()
    for key in expected:
        a, e = actual[key], expected[key]
        assert a.dtype == torch.float64 and a.ndim == 0, key
        assert torch.equal(a, e), f"{key}: {float(a)!r} != {float(e)!r}"


# ---------------------------------------------------------------------------
# Invariances


@FAST
@given(data=ood_data(), params=PARAMS, seed=st.integers(0, 2**32 - 1))
def test_every_metric_is_invariant_to_permuting_the_samples(data, params, seed) -> None:
    scores, is_ood = data
    order = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    _assert_identical(_all_metrics(scores[order], is_ood[order], params), _all_metrics(scores, is_ood, params))


@FAST
@given(data=ood_data(), params=PARAMS, flip=st.data())
def test_negative_zero_ties_with_zero(data, params, flip) -> None:
    """``-0.0 == 0.0``: flipping the sign of any zero score changes nothing."""
    scores, is_ood = data
    signs = torch.tensor(flip.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores))))
    flipped = torch.where((scores == 0) & signs, -scores, scores)
    _assert_identical(_all_metrics(flipped, is_ood, params), _all_metrics(scores, is_ood, params))


#: Strictly increasing in float64 on integers in [-4, 4] (the tied data): asserted per example below.
MONOTONE_MAPS = {
    "affine": lambda x, a, b: a * x + b,
    "exp": lambda x, a, b: np.exp(a * x / 4),
    "cubic": lambda x, a, b: (x - b) ** 3 + a * x,
    "log-shift": lambda x, a, b: np.log(x + 5.0) * a - 1e6,
    "arctan": lambda x, a, b: np.arctan(x / 3) * a,
}


@FAST
@given(data=ood_data(ties_only=True), params=PARAMS, name=st.sampled_from(sorted(MONOTONE_MAPS)),
       a=st.floats(0.01, 100.0), b=st.floats(-1000.0, 1000.0))
def test_every_metric_is_exactly_invariant_to_closed_form_increasing_maps(data, params, name, a, b) -> None:
    scores, is_ood = data
    values = scores.double().numpy()
    mapped = MONOTONE_MAPS[name](values, a, b)
    distinct = np.unique(values)
    assert np.all(np.diff(MONOTONE_MAPS[name](distinct, a, b)) > 0), "the map must be strictly increasing here"
    _assert_identical(_all_metrics(torch.from_numpy(mapped), is_ood, params), _all_metrics(scores, is_ood, params))


@FAST
@given(data=ood_data(), params=PARAMS, target=st.data())
def test_every_metric_is_exactly_invariant_to_a_random_monotone_map(data, params, target) -> None:
    """Map the k-th smallest distinct score to the k-th smallest of k random distinct floats.

    The targets are any float32 or float64 values, +/-inf included, so the map also changes the
    dtype, the sign and the magnitude; tied scores stay tied.
    """
    scores, is_ood = data
    distinct = torch.unique(scores.double())  # -0.0 and 0.0 are one value
    width = target.draw(st.sampled_from([32, 64]))
    targets = target.draw(st.lists(_any_float(width), min_size=len(distinct), max_size=len(distinct),
                                   unique_by=lambda v: v + 0.0))  # -0.0 and 0.0 are one value
    new_values = torch.tensor(sorted(targets), dtype=torch.float32 if width == 32 else torch.float64)
    mapped = new_values[torch.searchsorted(distinct, scores.double())]
    assert torch.all(new_values[1:] > new_values[:-1])
    _assert_identical(_all_metrics(mapped, is_ood, params), _all_metrics(scores, is_ood, params))


@FAST
@given(data=ood_data(dtypes=(torch.float32,)), params=PARAMS)
def test_widening_float32_scores_to_float64_changes_nothing(data, params) -> None:
    scores, is_ood = data
    _assert_identical(_all_metrics(scores.double(), is_ood, params), _all_metrics(scores, is_ood, params))


# ---------------------------------------------------------------------------
# The two readings


@FAST
@given(data=ood_data(), params=PARAMS)
def test_the_ood_reading_is_the_id_reading_with_classes_and_score_order_swapped(data, params) -> None:
    """metrics.md: ``positive="ood"`` flags ``score >= t`` as OOD and reads FPR@TPR where ``tpr`` of the
    OOD samples are flagged; ``positive="id"`` accepts ``score <= t`` as ID. Negating the scores and
    swapping the labels turns one into the other, so the threshold metrics agree exactly (their
    rates are ratios of exact counts), AUPR-In and AUPR-Out swap, and AUROC and detection accuracy
    stay what they were.
    """
    scores, is_ood = data
    tpr, method, at = params["tpr"], params["method"], params["detection_error_at"]
    ood_reading = ood_metrics(scores, is_ood, tpr, "ood", method, at)
    swapped = ood_metrics(-scores, ~is_ood, tpr, "id", method, at)
    for key in ("fpr_at_tpr", "tnr_at_tpr", "detection_error", "detection_accuracy"):
        assert torch.equal(ood_reading[key], swapped[key]), key
    # The same for the seeds' reading, swapped the other way.
    id_reading = ood_metrics(scores, is_ood, tpr, "id", method, at)
    swapped_back = ood_metrics(-scores, ~is_ood, tpr, "ood", method, at)
    for key in ("fpr_at_tpr", "tnr_at_tpr", "detection_error", "detection_accuracy"):
        assert torch.equal(id_reading[key], swapped_back[key]), key
    # AUPR-In ranks ID by -score; AUPR-Out ranks OOD by score: the swap exchanges them. They are
    # summed in opposite orders over the groups, so they agree to rounding.
    assert float(ood_reading["aupr_in"]) == pytest.approx(float(swapped["aupr_out"]), abs=SKLEARN_ATOL, rel=0)
    assert float(ood_reading["aupr_out"]) == pytest.approx(float(swapped["aupr_in"]), abs=SKLEARN_ATOL, rel=0)
    # AUROC = P(OOD > ID) + P(tie)/2 is symmetric under the swap, and "the same in either reading".
    assert float(ood_reading["auroc"]) == pytest.approx(float(swapped["auroc"]), abs=SKLEARN_ATOL, rel=0)
    for key in ("auroc", "detection_accuracy", "aupr_in", "aupr_out"):
        assert torch.equal(ood_reading[key], id_reading[key]), f"{key} must not depend on the reading"
    if at == "min":
        assert torch.equal(ood_reading["detection_error"], id_reading["detection_error"])


@FAST
@given(data=ood_data(), params=PARAMS)
def test_metric_identities_within_one_reading(data, params) -> None:
    scores, is_ood = data
    tpr, positive, method, at = params["tpr"], params["positive"], params["method"], params["detection_error_at"]
    values = ood_metrics(scores, is_ood, tpr, positive, method, at)
    assert torch.equal(values["tnr_at_tpr"], 1.0 - values["fpr_at_tpr"])
    if at == "min":  # 1 - (0.5 + 0.5 J) vs 0.5 - 0.5 J: equal up to one rounding
        assert float(values["detection_error"]) == pytest.approx(1 - float(values["detection_accuracy"]),
                                                                 abs=1e-15, rel=0)
    # Reversing the order of the scores (labels kept) mirrors the AUROC.
    assert float(auroc(-scores, is_ood)) == pytest.approx(1 - float(values["auroc"]), abs=SKLEARN_ATOL, rel=0)
    for key, value in values.items():
        assert 0.0 <= float(value) <= 1.0, key
    assert float(values["detection_accuracy"]) >= 0.5
    # The detection error at the TPR threshold is one of the thresholds the minimum runs over.
    minimum = detection_error(scores, is_ood, "min")
    assert float(minimum) <= float(detection_error(scores, is_ood, "tpr", tpr, positive)) + 1e-15


# ---------------------------------------------------------------------------
# Agreement with scikit-learn on heavily tied data


def _sklearn_metrics(scores: np.ndarray, is_ood: np.ndarray, params: dict) -> dict[str, float]:
    """The seven metrics from scikit-learn's curves, read as metrics.md defines them."""
    tpr, positive, method, at = params["tpr"], params["positive"], params["method"], params["detection_error_at"]
    is_id = 1 - is_ood
    # ID positive accepts score <= t: rank by -score. OOD positive flags score >= t: rank by score.
    fpr_id, tpr_id, _ = roc_curve(is_id, -scores, drop_intermediate=False)
    if positive == "id":
        fpr_curve, tpr_curve = fpr_id, tpr_id
    else:
        fpr_curve, tpr_curve, _ = roc_curve(is_ood, scores, drop_intermediate=False)
    first = int(np.argmax(tpr_curve >= tpr))  # the first threshold whose TPR reaches tpr
    assert tpr_curve[first] >= tpr
    if method == "trapezoid":
        precision_in, recall_in, _ = precision_recall_curve(is_id, -scores)
        precision_out, recall_out, _ = precision_recall_curve(is_ood, scores)
        area_in, area_out = auc(recall_in, precision_in), auc(recall_out, precision_out)
    else:
        area_in, area_out = average_precision_score(is_id, -scores), average_precision_score(is_ood, scores)
    detection_errors = 0.5 * (1 - tpr_id) + 0.5 * fpr_id
    return {
        "auroc": roc_auc_score(is_ood, scores),
        "fpr_at_tpr": fpr_curve[first],
        "tnr_at_tpr": 1 - fpr_curve[first],
        "detection_error": (0.5 * (1 - tpr_curve[first]) + 0.5 * fpr_curve[first] if at == "tpr"
                            else detection_errors.min()),
        "detection_accuracy": np.max(0.5 * (tpr_id + 1 - fpr_id)),
        "aupr_in": area_in,
        "aupr_out": area_out,
    }


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ood_data(finite=True, max_size=200), params=PARAMS)
def test_every_metric_matches_sklearn_on_tied_data_in_both_readings(data, params) -> None:
    """Finite scores only: scikit-learn refuses infinite ones. Half the examples draw every score
    from a few integers, so most thresholds group several samples of both classes.

    FPR/TNR@TPR are ratios of the same exact counts as scikit-learn's ``fps / fps[-1]``: they agree
    bit for bit. The areas and the detection accuracy sum in another order: within 1e-12.
    """
    scores, is_ood = data
    ours = ood_metrics(scores, is_ood, params["tpr"], params["positive"], params["method"],
                       params["detection_error_at"])
    expected = _sklearn_metrics(scores.numpy(), is_ood.long().numpy(), params)
    assert list(ours) == list(OOD_METRIC_KEYS) == list(expected)
    for key in ("fpr_at_tpr", "tnr_at_tpr"):
        assert float(ours[key]) == expected[key], key
    for key in OOD_METRIC_KEYS:
        assert float(ours[key]) == pytest.approx(expected[key], abs=SKLEARN_ATOL, rel=0), key


# ---------------------------------------------------------------------------
# torchmetrics classes over random chunks


@st.composite
def chunk_bounds(draw, n: int) -> list[int]:
    """Cut points 0 = c_0 <= c_1 <= ... <= c_k = n: random chunks, empty ones included."""
    cuts = draw(st.lists(st.integers(0, n), max_size=6))
    return [0, *sorted(cuts), n]


def _chunks(tensor: torch.Tensor, bounds: list[int]) -> list[torch.Tensor]:
    return [tensor[start:stop] for start, stop in pairwise(bounds)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ood_data(), params=PARAMS, split=st.data(), reshape=st.booleans())
def test_ood_metrics_class_over_random_chunks_equals_the_functional_form(data, params, split, reshape) -> None:
    from timm_ood.metrics import OODMetrics

    scores, is_ood = data
    bounds = split.draw(chunk_bounds(len(scores)))
    metric = OODMetrics(params["tpr"], params["positive"], params["method"], params["detection_error_at"])
    for chunk_scores, chunk_is_ood in zip(_chunks(scores, bounds), _chunks(is_ood, bounds), strict=True):
        if reshape and len(chunk_scores) % 2 == 0:  # any shape is flattened
            chunk_scores, chunk_is_ood = chunk_scores.reshape(2, -1), chunk_is_ood.reshape(2, -1).long()
        metric.update(chunk_scores, chunk_is_ood)
    expected = ood_metrics(scores, is_ood, params["tpr"], params["positive"], params["method"],
                           params["detection_error_at"])
    _assert_identical(metric.compute(), expected)


SINGLE_METRICS = {
    "AUROC": (lambda p: (), lambda s, y, p: auroc(s, y)),
    "FPRAtTPR": (lambda p: (p["tpr"], p["positive"]), lambda s, y, p: fpr_at_tpr(s, y, p["tpr"], p["positive"])),
    "TNRAtTPR": (lambda p: (p["tpr"], p["positive"]), lambda s, y, p: tnr_at_tpr(s, y, p["tpr"], p["positive"])),
    "DetectionError": (lambda p: (p["detection_error_at"], p["tpr"], p["positive"]),
                       lambda s, y, p: detection_error(s, y, p["detection_error_at"], p["tpr"], p["positive"])),
    "DetectionAccuracy": (lambda p: (), lambda s, y, p: detection_accuracy(s, y)),
    "AUPRIn": (lambda p: (p["method"],), lambda s, y, p: aupr_in(s, y, p["method"])),
    "AUPROut": (lambda p: (p["method"],), lambda s, y, p: aupr_out(s, y, p["method"])),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ood_data(), params=PARAMS, split=st.data(), name=st.sampled_from(sorted(SINGLE_METRICS)))
def test_each_metric_class_over_random_chunks_equals_its_function(data, params, split, name) -> None:
    import timm_ood.metrics

    scores, is_ood = data
    bounds = split.draw(chunk_bounds(len(scores)))
    arguments, function = SINGLE_METRICS[name]
    metric = getattr(timm_ood.metrics, name)(*arguments(params))
    batch_values = []
    for chunk_scores, chunk_is_ood in zip(_chunks(scores, bounds), _chunks(is_ood, bounds), strict=True):
        batch_values.append((metric(chunk_scores, chunk_is_ood), chunk_scores, chunk_is_ood))
    _assert_identical({name: metric.compute()}, {name: function(scores, is_ood, params)})
    # forward() returns the metric of its batch alone, NaN when the batch lacks a class.
    for value, chunk_scores, chunk_is_ood in batch_values:
        if 0 < int(chunk_is_ood.sum()) < len(chunk_is_ood):
            assert torch.equal(value, function(chunk_scores, chunk_is_ood, params))
        else:
            assert math.isnan(float(value))
