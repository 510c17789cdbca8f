"""Exact OOD detection metrics: the functional core shared by the metric classes.

Every metric is derived from one :class:`OODCurve`, built from a single sort of
the scores with tied scores grouped, so that all samples with one score value
share one decision. The definitions are those of ``docs/metrics.md``:

* ``scores`` are floats, higher = more out-of-distribution; ``is_ood`` is 1 (or
  ``True``) for OOD and 0 for in-distribution (ID) samples. Inputs of any shape
  are flattened; NaN scores raise ``ValueError`` naming the metric, +/-inf are
  valid scores.
* ``positive="id"`` (default, the seeds' reading: ODIN Sec. 4.3, Lee et al.
  App. B): ID is the positive class and a threshold ``t`` accepts a sample as
  ID when ``score <= t``. ``positive="ood"`` (the OpenOOD / pytorch-ood
  reading): OOD is the positive class and a sample is flagged as OOD when
  ``score >= t``. Only FPR@TPR, TNR@TPR and the detection error at a TPR depend
  on the reading; numbers from the two readings are not comparable.

Counts are exact (float64 holds integers up to 2**53); rates and areas are
float64 and match scikit-learn's curves to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

__all__ = [
    "OOD_METRIC_KEYS",
    "DetectionErrorAt",
    "OODCurve",
    "PRMethod",
    "Positive",
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
    "fpr_at_tpr",
    "fpr_at_tpr_from_curve",
    "ood_metrics",
    "ood_metrics_from_curve",
    "tnr_at_tpr",
    "tnr_at_tpr_from_curve",
]

Positive = Literal["id", "ood"]
PRMethod = Literal["trapezoid", "ap"]
DetectionErrorAt = Literal["tpr", "min"]

#: Keys of :func:`ood_metrics` and of ``OODMetrics.compute()``, in this order.
OOD_METRIC_KEYS: tuple[str, ...] = (
    "auroc",
    "fpr_at_tpr",
    "tnr_at_tpr",
    "detection_error",
    "detection_accuracy",
    "aupr_in",
    "aupr_out",
)

# Scores are sorted as integer keys with the order of their float values: the
# float32 bit patterns for scores of at most 32 bits, float64 otherwise.
_KEY_DTYPE = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class OODCurve:
    """Tie-grouped counts of ID and OOD samples over the distinct scores.

    Index ``j`` runs over the distinct score values in ascending order; all
    count tensors are float64 holding exact integers.

    Attributes:
        thresholds: The distinct scores, ascending, shape ``(m,)``.
        id_counts: ID samples whose score equals ``thresholds[j]``.
        ood_counts: OOD samples whose score equals ``thresholds[j]``.
        cum_id: ID samples with score ``<= thresholds[j]`` (the seeds' TPR
            numerator).
        cum_ood: OOD samples with score ``<= thresholds[j]`` (the seeds' FPR
            numerator).
        num_id: Total number of ID samples (at least 1).
        num_ood: Total number of OOD samples (at least 1).
    """

    thresholds: Tensor
    id_counts: Tensor
    ood_counts: Tensor
    cum_id: Tensor
    cum_ood: Tensor
    num_id: int
    num_ood: int


# ---------------------------------------------------------------------------
# Validation


def _check_params(
    metric_name: str,
    *,
    tpr: float | None = None,
    positive: str | None = None,
    method: str | None = None,
    at: str | None = None,
) -> None:
    """Check the metric parameters that are given; messages list the valid values."""
    if tpr is not None and not 0.0 < tpr <= 1.0:
        raise ValueError(f"{metric_name}: tpr must be in (0, 1], got {tpr!r}")
    for name, value, choices in (
        ("positive", positive, Positive),
        ("method", method, PRMethod),
        ("at", at, DetectionErrorAt),
    ):
        if value is not None and value not in get_args(choices):
            valid = ", ".join(map(repr, get_args(choices)))
            raise ValueError(f"{metric_name}: {name} must be one of {valid}, got {value!r}")


def _as_tensor(value: object, name: str, metric_name: str) -> Tensor:
    """``value`` as a tensor: tensors as they are, numpy arrays and lists of numbers converted."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{metric_name}: {name} must be a tensor (or an array / list of numbers), got "
            f"{type(value).__name__} ({error}); convert it with torch.as_tensor"
        ) from None


def _validate_inputs(scores: Tensor, is_ood: Tensor, metric_name: str) -> tuple[Tensor, Tensor]:
    """Check one batch and return it flattened: scores as given, ``is_ood`` as bool.

    The one validation of the functional metrics and the metric classes.

    Raises:
        TypeError: If an input is not a tensor, array or list of numbers.
        ValueError: If the shapes differ, the scores are not real numbers or
            contain NaN, or ``is_ood`` holds values other than 0 and 1.
    """
    scores = _as_tensor(scores, "scores", metric_name)
    is_ood = _as_tensor(is_ood, "is_ood", metric_name)
    if scores.shape != is_ood.shape:
        raise ValueError(
            f"{metric_name}: scores and is_ood must have the same shape (one label per score), "
            f"got {tuple(scores.shape)} and {tuple(is_ood.shape)}"
        )
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(
            f"{metric_name}: scores must be real numbers (higher = more OOD), got dtype {scores.dtype}; "
            "pass the detector's real-valued scores, not decisions or complex values"
        )
    if is_ood.is_complex():
        raise ValueError(f"{metric_name}: is_ood must hold 0 (ID) and 1 (OOD), got dtype {is_ood.dtype}")
    scores = scores.detach().reshape(-1)
    is_ood = is_ood.detach().reshape(-1).to(scores.device)
    if scores.is_floating_point():
        num_nan = int(torch.isnan(scores).count_nonzero())
        if num_nan:
            raise ValueError(
                f"{metric_name}: scores contain NaN ({num_nan} of {scores.numel()}); "
                "NaN is not a valid OOD score (+/-inf are)"
            )
    if is_ood.dtype != torch.bool:
        binary = torch.logical_or(is_ood == 0, is_ood == 1)
        if not bool(binary.all()):
            found = torch.unique(is_ood[~binary]).tolist()
            shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in found[:5])
            hint = (
                " Dataset labels mark OOD images with -1: use is_ood = (labels == -1)."
                if bool((is_ood == -1).any()) else " Map the labels to 0 (ID) / 1 (OOD) first."
            )
            raise ValueError(
                f"{metric_name}: is_ood must hold only 0 (ID) and 1 (OOD), but it also holds {shown}"
                f"{', ...' if len(found) > 5 else ''}.{hint}"
            )
        is_ood = is_ood.to(torch.bool)
    return scores, is_ood


def _check_both_classes(num_id: int, num_ood: int, metric_name: str) -> None:
    if num_id == 0 or num_ood == 0:
        missing = "ID (is_ood == 0)" if num_id == 0 else "OOD (is_ood == 1)"
        raise ValueError(
            f"{metric_name}: no {missing} samples among {num_id + num_ood}; "
            "OOD metrics need at least one ID and one OOD sample"
        )


# ---------------------------------------------------------------------------
# The curve: one sort, ties grouped


def _toggle_negative_magnitudes_(bits: Tensor) -> Tensor:
    """Turn IEEE-754 bit patterns (viewed as int32/int64) into keys that sort like the floats.

    Works in place by flipping the magnitude bits of negative numbers. The map
    is its own inverse, so it also turns sorted keys back into bit patterns.
    """
    sign_shift = 8 * bits.element_size() - 1
    magnitude_bits = torch.iinfo(bits.dtype).max
    return bits.bitwise_xor_(bits.bitwise_right_shift(sign_shift).bitwise_and_(magnitude_bits))


def _sort_keys(scores: Tensor) -> Tensor:
    """Integer keys that sort like the scores, with ``-0.0 == 0.0``.

    Integers sort about twice as fast as floats on the CPU, and int32 faster
    than int64. Floats of at most 32 bits are exact in float32; other dtypes
    go through float64.
    """
    is_narrow_float = scores.is_floating_point() and scores.element_size() <= 4
    float_dtype = torch.float32 if is_narrow_float else torch.float64
    as_float = scores.to(float_dtype, copy=True).add_(0.0)  # -0.0 + 0.0 == +0.0
    return _toggle_negative_magnitudes_(as_float.view(_KEY_DTYPE[float_dtype]))


def _scores_from_keys(keys: Tensor) -> Tensor:
    """Float64 scores of sort keys (consumes ``keys``)."""
    float_dtype = torch.float32 if keys.dtype == torch.int32 else torch.float64
    return _toggle_negative_magnitudes_(keys).view(float_dtype).to(torch.float64)


def _group_ends_and_cum_ood(keys: Tensor, is_ood: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort once; return each tie group's last sorted index, key and OOD count up to it."""
    sorted_keys, order = torch.sort(keys)
    is_group_end = torch.ones_like(sorted_keys, dtype=torch.bool)
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=is_group_end[:-1])
    group_ends = is_group_end.nonzero().squeeze(1)
    sorted_is_ood = is_ood.index_select(0, order)  # faster than is_ood[order] on the CPU
    cum_ood = torch.cumsum(sorted_is_ood, dim=0, dtype=torch.float64).index_select(0, group_ends)
    return group_ends, sorted_keys.index_select(0, group_ends), cum_ood


def _counts_per_group(cumulative: Tensor) -> Tensor:
    counts = torch.empty_like(cumulative)
    counts[0] = cumulative[0]
    torch.sub(cumulative[1:], cumulative[:-1], out=counts[1:])
    return counts


def _curve_from_validated(scores: Tensor, is_ood: Tensor, metric_name: str) -> OODCurve:
    """Build the curve from flat scores and bool labels (see :func:`_validate_inputs`)."""
    num_ood = int(is_ood.count_nonzero())
    num_id = is_ood.numel() - num_ood
    _check_both_classes(num_id, num_ood, metric_name)

    group_ends, group_keys, cum_ood = _group_ends_and_cum_ood(_sort_keys(scores), is_ood)
    # Samples up to a group's end, minus the OOD ones.
    cum_id = group_ends.to(torch.float64).add_(1.0).sub_(cum_ood)
    return OODCurve(
        thresholds=_scores_from_keys(group_keys),
        id_counts=_counts_per_group(cum_id),
        ood_counts=_counts_per_group(cum_ood),
        cum_id=cum_id,
        cum_ood=cum_ood,
        num_id=num_id,
        num_ood=num_ood,
    )


def binary_curve(scores: Tensor, is_ood: Tensor) -> OODCurve:
    """Sort the scores once and count ID and OOD samples per distinct score.

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.

    Returns:
        The :class:`OODCurve` every ``*_from_curve`` function reads.

    Raises:
        ValueError: If the shapes differ, a score is NaN, ``is_ood`` is not
            binary, or there is no ID or no OOD sample.
    """
    return _curve_from_validated(*_validate_inputs(scores, is_ood, "binary_curve"), "binary_curve")


def _curve(scores: Tensor, is_ood: Tensor, metric_name: str) -> OODCurve:
    return _curve_from_validated(*_validate_inputs(scores, is_ood, metric_name), metric_name)


# ---------------------------------------------------------------------------
# Metrics from the curve


class _OperatingPoint(NamedTuple):
    """True and false positive rates at the threshold t* of FPR@TPR."""

    tpr: Tensor
    fpr: Tensor


def _min_count_reaching(rate: float, total: int) -> int:
    """Smallest count ``k`` with ``k / total >= rate`` in float64 (the TPR test).

    ``k / total`` is monotone in ``k``, and ``ceil(rate * total)`` is within two
    of the answer for any ``total < 2**50``, so a few candidates suffice.
    """
    guess = math.ceil(rate * total)
    return next(k for k in range(max(guess - 2, 1), total + 1) if k / total >= rate)


def _operating_point(curve: OODCurve, tpr: float, positive: Positive) -> _OperatingPoint:
    """Rates at t*, the first threshold (in the reading's direction) with TPR >= ``tpr``."""
    if positive == "id":
        # t* = the smallest score value accepting at least `needed` ID samples.
        needed = _min_count_reaching(tpr, curve.num_id)
        j = torch.searchsorted(curve.cum_id, float(needed))
        return _OperatingPoint(curve.cum_id[j] / curve.num_id, curve.cum_ood[j] / curve.num_ood)
    # t* = the largest score value flagging (score >= t*) at least `needed` OOD
    # samples, i.e. leaving at most num_ood - needed OOD samples strictly below.
    needed = _min_count_reaching(tpr, curve.num_ood)
    j = torch.searchsorted(curve.cum_ood, float(curve.num_ood - needed), right=True)
    ood_flagged = curve.num_ood - (curve.cum_ood[j] - curve.ood_counts[j])
    id_flagged = curve.num_id - (curve.cum_id[j] - curve.id_counts[j])
    return _OperatingPoint(ood_flagged / curve.num_ood, id_flagged / curve.num_id)


def _max_youden_index(curve: OODCurve) -> Tensor:
    """Youden's J: the max over thresholds of TPR - FPR (ID positive), extremes included.

    Computed on exact counts as ``max(cum_id * num_ood - cum_ood * num_id)``
    before one division. Both extremes (accept none, accept all) give 0, and
    accepting all is the last threshold, so the maximum includes them.
    """
    scaled = torch.mul(curve.cum_id, curve.num_ood).sub_(curve.cum_ood, alpha=curve.num_id)
    return scaled.max() / (curve.num_id * curve.num_ood)


def _pr_area(
    gains: Tensor,
    precision: Tensor,
    num_positive: int,
    method: PRMethod,
    recall_grows_with_index: bool,
) -> Tensor:
    """Area under a tie-grouped precision-recall curve, as scikit-learn computes it.

    Each distinct score adds ``gains[j]`` positives to the recall and reaches
    ``precision[j]``. The curve starts at scikit-learn's appended
    (recall 0, precision 1) point. ``method="ap"`` is the step sum of
    ``average_precision_score``; ``"trapezoid"`` is
    ``auc(recall, precision)``.
    """
    step_area = torch.dot(gains, precision)
    if method == "ap":
        return step_area / num_positive
    # Each trapezoid also uses the precision before its step: the neighbour
    # reached earlier, or 1 for the first step.
    if recall_grows_with_index:
        first, before = gains[0], torch.dot(gains[1:], precision[:-1])
    else:
        first, before = gains[-1], torch.dot(gains[:-1], precision[1:])
    return (step_area + before + first) / (2 * num_positive)


def auroc_from_curve(curve: OODCurve) -> Tensor:
    """AUROC from a curve: P(OOD score > ID score) + P(tie) / 2 (see :func:`auroc`)."""
    # Each OOD sample beats the ID samples strictly below its score and half
    # of those at its score.
    beaten = torch.dot(curve.ood_counts, curve.cum_id) - 0.5 * torch.dot(
        curve.ood_counts, curve.id_counts
    )
    return beaten / (curve.num_id * curve.num_ood)


def fpr_at_tpr_from_curve(curve: OODCurve, tpr: float = 0.95, positive: Positive = "id") -> Tensor:
    """FPR@TPR from a curve (see :func:`fpr_at_tpr`)."""
    _check_params("fpr_at_tpr", tpr=tpr, positive=positive)
    return _operating_point(curve, tpr, positive).fpr


def tnr_at_tpr_from_curve(curve: OODCurve, tpr: float = 0.95, positive: Positive = "id") -> Tensor:
    """TNR@TPR = 1 - FPR@TPR from a curve (see :func:`tnr_at_tpr`)."""
    _check_params("tnr_at_tpr", tpr=tpr, positive=positive)
    return 1.0 - _operating_point(curve, tpr, positive).fpr


def detection_error_from_curve(
    curve: OODCurve,
    at: DetectionErrorAt = "tpr",
    tpr: float = 0.95,
    positive: Positive = "id",
) -> Tensor:
    """Detection error from a curve (see :func:`detection_error`)."""
    _check_params("detection_error", at=at, tpr=tpr, positive=positive)
    if at == "min":
        return 0.5 - 0.5 * _max_youden_index(curve)
    point = _operating_point(curve, tpr, positive)
    return 0.5 * (1.0 - point.tpr) + 0.5 * point.fpr


def detection_accuracy_from_curve(curve: OODCurve) -> Tensor:
    """Detection accuracy from a curve (see :func:`detection_accuracy`)."""
    return 0.5 + 0.5 * _max_youden_index(curve)


def aupr_in_from_curve(curve: OODCurve, method: PRMethod = "trapezoid") -> Tensor:
    """AUPR-In from a curve (see :func:`aupr_in`)."""
    _check_params("aupr_in", method=method)
    # Raising t (accept as ID when score <= t) adds the groups in ascending order.
    accepted = torch.add(curve.cum_id, curve.cum_ood)
    precision = torch.div(curve.cum_id, accepted, out=accepted)
    return _pr_area(curve.id_counts, precision, curve.num_id, method, recall_grows_with_index=True)


def aupr_out_from_curve(curve: OODCurve, method: PRMethod = "trapezoid") -> Tensor:
    """AUPR-Out from a curve (see :func:`aupr_out`)."""
    _check_params("aupr_out", method=method)
    # Lowering t (flag as OOD when score >= t) adds the groups from the top down.
    ood_flagged = torch.sub(curve.ood_counts, curve.cum_ood).add_(curve.num_ood)
    all_flagged = torch.sub(curve.id_counts, curve.cum_id).add_(curve.num_id).add_(ood_flagged)
    precision = torch.div(ood_flagged, all_flagged, out=all_flagged)
    return _pr_area(
        curve.ood_counts, precision, curve.num_ood, method, recall_grows_with_index=False
    )


def ood_metrics_from_curve(
    curve: OODCurve,
    tpr: float = 0.95,
    positive: Positive = "id",
    method: PRMethod = "trapezoid",
    detection_error_at: DetectionErrorAt = "tpr",
) -> dict[str, Tensor]:
    """All seven metrics from one curve (see :func:`ood_metrics`)."""
    return {
        "auroc": auroc_from_curve(curve),
        "fpr_at_tpr": fpr_at_tpr_from_curve(curve, tpr, positive),
        "tnr_at_tpr": tnr_at_tpr_from_curve(curve, tpr, positive),
        "detection_error": detection_error_from_curve(curve, detection_error_at, tpr, positive),
        "detection_accuracy": detection_accuracy_from_curve(curve),
        "aupr_in": aupr_in_from_curve(curve, method),
        "aupr_out": aupr_out_from_curve(curve, method),
    }


# ---------------------------------------------------------------------------
# Metrics from scores


def auroc(scores: Tensor, is_ood: Tensor) -> Tensor:
    """Area under the ROC curve: P(OOD score > ID score), ties counted 1/2.

    Equal to the trapezoid area under the tie-grouped ROC curve and to
    ``sklearn.metrics.roc_auc_score(is_ood, scores)``; the same number in both
    readings (docs/metrics.md, "AUROC"; ODIN Sec. 4.3).

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.

    Returns:
        A 0-dim float64 tensor in [0, 1]; higher is better.

    Raises:
        ValueError: If the shapes differ, a score is NaN, ``is_ood`` is not
            binary, or there is no ID or no OOD sample.
    """
    return auroc_from_curve(_curve(scores, is_ood, "auroc"))


def fpr_at_tpr(
    scores: Tensor, is_ood: Tensor, tpr: float = 0.95, positive: Positive = "id"
) -> Tensor:
    """False positive rate at the first threshold whose TPR reaches ``tpr``.

    ``positive="id"`` (docs/metrics.md "FPR@95TPR"; ODIN Sec. 4.3): t* is the
    smallest score value with TPR(t*) >= ``tpr``, where TPR(t) is the fraction
    of ID samples with score <= t; returns the fraction of OOD samples with
    score <= t* (OOD accepted as ID). ``positive="ood"`` (OpenOOD /
    pytorch-ood): going down from +inf, t* is the first score value at which at
    least ``tpr`` of the OOD samples have score >= t*; returns the fraction of
    ID samples flagged as OOD there.

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.
        tpr: The true positive rate to reach, in (0, 1].
        positive: ``"id"`` or ``"ood"``, the positive class.

    Returns:
        A 0-dim float64 tensor in [0, 1]; lower is better.

    Raises:
        ValueError: On invalid inputs (see :func:`auroc`), ``tpr`` outside
            (0, 1] or an unknown ``positive``.
    """
    _check_params("fpr_at_tpr", tpr=tpr, positive=positive)
    return fpr_at_tpr_from_curve(_curve(scores, is_ood, "fpr_at_tpr"), tpr, positive)


def tnr_at_tpr(
    scores: Tensor, is_ood: Tensor, tpr: float = 0.95, positive: Positive = "id"
) -> Tensor:
    """True negative rate at the TPR threshold: ``1 - fpr_at_tpr`` (Lee et al. App. B).

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.
        tpr: The true positive rate to reach, in (0, 1].
        positive: ``"id"`` or ``"ood"``, the positive class (see :func:`fpr_at_tpr`).

    Returns:
        A 0-dim float64 tensor in [0, 1]; higher is better.

    Raises:
        ValueError: As :func:`fpr_at_tpr`.
    """
    _check_params("tnr_at_tpr", tpr=tpr, positive=positive)
    return tnr_at_tpr_from_curve(_curve(scores, is_ood, "tnr_at_tpr"), tpr, positive)


def detection_error(
    scores: Tensor,
    is_ood: Tensor,
    at: DetectionErrorAt = "tpr",
    tpr: float = 0.95,
    positive: Positive = "id",
) -> Tensor:
    """Detection error Pe = 0.5 (1 - TPR) + 0.5 FPR, with equal class priors.

    ``at="tpr"`` (ODIN Sec. 4.3, docs/metrics.md): at the threshold t* of
    :func:`fpr_at_tpr` for ``tpr`` and ``positive``, using the TPR actually
    reached there. ``at="min"`` (ODIN's released code): the minimum over all
    thresholds including both extremes; it equals ``1 - detection_accuracy``
    and does not depend on ``positive``.

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.
        at: ``"tpr"`` or ``"min"``.
        tpr: The true positive rate of t*, in (0, 1] (``at="tpr"`` only).
        positive: ``"id"`` or ``"ood"`` (``at="tpr"`` only).

    Returns:
        A 0-dim float64 tensor in [0, 0.5] for ``at="min"``; lower is better.

    Raises:
        ValueError: On invalid inputs (see :func:`auroc`) or parameters.
    """
    _check_params("detection_error", at=at, tpr=tpr, positive=positive)
    curve = _curve(scores, is_ood, "detection_error")
    return detection_error_from_curve(curve, at, tpr, positive)


def detection_accuracy(scores: Tensor, is_ood: Tensor) -> Tensor:
    """Detection accuracy: max over thresholds t of 0.5 (TPR(t) + 1 - FPR(t)).

    Lee et al. App. B and IsoMax (docs/metrics.md): the best accuracy of a threshold
    with equal class priors, ``(1 + J) / 2`` for the maximal Youden index J;
    the same in both readings.

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.

    Returns:
        A 0-dim float64 tensor in [0.5, 1]; higher is better.

    Raises:
        ValueError: As :func:`auroc`.
    """
    return detection_accuracy_from_curve(_curve(scores, is_ood, "detection_accuracy"))


def aupr_in(scores: Tensor, is_ood: Tensor, method: PRMethod = "trapezoid") -> Tensor:
    """Area under the precision-recall curve with ID positive, ranked by -score.

    ``method="trapezoid"`` (default; what OpenOOD and pytorch-ood report) is
    ``sklearn.metrics.auc(recall, precision)`` over
    ``precision_recall_curve(1 - is_ood, -scores)``, including its appended
    (recall 0, precision 1) point; ``method="ap"`` is
    ``average_precision_score(1 - is_ood, -scores)`` (docs/metrics.md "AUPR-In";
    ODIN Sec. 4.3; Lee et al. App. B).

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.
        method: ``"trapezoid"`` or ``"ap"``.

    Returns:
        A 0-dim float64 tensor in [0, 1]; higher is better.

    Raises:
        ValueError: On invalid inputs (see :func:`auroc`) or an unknown ``method``.
    """
    _check_params("aupr_in", method=method)
    return aupr_in_from_curve(_curve(scores, is_ood, "aupr_in"), method)


def aupr_out(scores: Tensor, is_ood: Tensor, method: PRMethod = "trapezoid") -> Tensor:
    """Area under the precision-recall curve with OOD positive, ranked by score.

    As :func:`aupr_in`, over ``precision_recall_curve(is_ood, scores)``
    (docs/metrics.md "AUPR-Out").

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.
        method: ``"trapezoid"`` or ``"ap"``.

    Returns:
        A 0-dim float64 tensor in [0, 1]; higher is better.

    Raises:
        ValueError: On invalid inputs (see :func:`auroc`) or an unknown ``method``.
    """
    _check_params("aupr_out", method=method)
    return aupr_out_from_curve(_curve(scores, is_ood, "aupr_out"), method)


def ood_metrics(
    scores: Tensor,
    is_ood: Tensor,
    tpr: float = 0.95,
    positive: Positive = "id",
    method: PRMethod = "trapezoid",
    detection_error_at: DetectionErrorAt = "tpr",
) -> dict[str, Tensor]:
    """All seven metrics from one sort of the scores.

    Args:
        scores: OOD scores of any shape, higher = more OOD.
        is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.
        tpr: TPR of FPR@TPR, TNR@TPR and the detection error, in (0, 1].
        positive: ``"id"`` (seeds) or ``"ood"`` (OpenOOD / pytorch-ood).
        method: ``"trapezoid"`` or ``"ap"`` for AUPR-In and AUPR-Out.
        detection_error_at: ``"tpr"`` or ``"min"`` (see :func:`detection_error`).

    Returns:
        0-dim float64 tensors keyed by :data:`OOD_METRIC_KEYS`: ``auroc``,
        ``fpr_at_tpr``, ``tnr_at_tpr``, ``detection_error``,
        ``detection_accuracy``, ``aupr_in``, ``aupr_out``.

    Raises:
        ValueError: On invalid inputs (see :func:`auroc`) or parameters.
    """
    _check_params("ood_metrics", tpr=tpr, positive=positive, method=method, at=detection_error_at)
    curve = _curve(scores, is_ood, "ood_metrics")
    return ood_metrics_from_curve(curve, tpr, positive, method, detection_error_at)
