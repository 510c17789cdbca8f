"""torchmetrics classes for OOD detection over the exact functional core.

Every metric keeps the raw ``scores`` and ``is_ood`` labels in two list states
(``dist_reduce_fx="cat"``, the same names in every class, so torchmetrics
compute groups share them) and, at ``compute()``, builds one
:class:`~timm_ood.metrics.functional.OODCurve` from a single sort. Definitions
and readings: ``docs/metrics.md`` and :mod:`timm_ood.metrics.functional`.

Scores never go through torchmetrics' ``Binary*`` metrics: those apply a
sigmoid to predictions outside [0, 1], decided per batch, which corrupts raw
OOD scores.

Under ``torch.distributed``, ``compute()`` gathers the states of all processes
(torchmetrics' sync); every process should add scores of the same dtype.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, cast

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from .functional import (
    OOD_METRIC_KEYS,
    DetectionErrorAt,
    OODCurve,
    Positive,
    PRMethod,
    _check_params,
    _curve_from_validated,
    _validate_inputs,
    aupr_in_from_curve,
    aupr_out_from_curve,
    auroc_from_curve,
    detection_accuracy_from_curve,
    detection_error_from_curve,
    fpr_at_tpr_from_curve,
    tnr_at_tpr_from_curve,
)

__all__ = [
    "AUROC",
    "AUPRIn",
    "AUPROut",
    "DetectionAccuracy",
    "DetectionError",
    "FPRAtTPR",
    "OODMetrics",
    "TNRAtTPR",
]


def _batch_curve(scores: Tensor, is_ood: Tensor, metric_name: str) -> OODCurve | None:
    """The curve of one batch, or ``None`` when the batch lacks ID or OOD samples."""
    scores, is_ood = _validate_inputs(scores, is_ood, metric_name)
    num_ood = int(is_ood.count_nonzero())
    if num_ood in (0, is_ood.numel()):
        return None
    return _curve_from_validated(scores, is_ood, metric_name)


def _nan(device: torch.device) -> Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64, device=device)


class _OODScoreMetric(Metric):
    """Base class: buffers scores and labels; one curve per ``compute()``.

    Subclasses implement :meth:`compute_from_curve`. Keyword arguments go to
    :class:`torchmetrics.Metric` (``compute_on_cpu``, ``sync_on_compute``,
    ``process_group``, ``dist_sync_fn``, ...).
    """

    is_differentiable: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    scores: list[Tensor] | Tensor
    is_ood: list[Tensor] | Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        """Add a batch.

        Args:
            scores: OOD scores of any shape, higher = more OOD. Floating
                scores are kept in their dtype, others are cast to float64.
            is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.

        Raises:
            ValueError: If the shapes differ, a score is NaN (the message
                names the metric) or ``is_ood`` is not binary.
        """
        scores, is_ood = _validate_inputs(scores, is_ood, type(self).__name__)
        stored_dtype = scores.dtype if scores.is_floating_point() else torch.float64
        # list states between updates (torchmetrics concatenates them only inside a sync)
        cast(list[Tensor], self.scores).append(scores.to(stored_dtype, copy=True))
        cast(list[Tensor], self.is_ood).append(is_ood.clone())

    def forward(self, scores: Tensor, is_ood: Tensor) -> Tensor:
        """Add a batch (as :meth:`update`) and return the metric of this batch alone.

        Unlike torchmetrics' default ``forward``, the accumulated state is not
        copied for every batch; the batch value is this process's own.

        Args:
            scores: OOD scores of any shape, higher = more OOD.
            is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.

        Returns:
            A 0-dim float64 tensor: the metric of the batch, or NaN when the
            batch lacks ID or OOD samples (common when ID and OOD data come in
            separate batches).

        Raises:
            ValueError: As :meth:`update`.
        """
        self.update(scores, is_ood)
        curve = _batch_curve(scores, is_ood, type(self).__name__)
        value = _nan(scores.device) if curve is None else self.compute_from_curve(curve)
        # torchmetrics sets _forward_cache = None unannotated in Metric.__init__, so mypy types it None
        self._forward_cache = value  # type: ignore[assignment]
        return value

    def compute(self) -> Tensor:
        """The metric over every sample added since the last reset (all processes when distributed).

        Returns:
            A 0-dim float64 tensor.

        Raises:
            ValueError: If no samples were added, or there is no ID or no OOD sample.
        """
        return self.compute_from_curve(self._curve_of_state())

    @abstractmethod
    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        """The metric from a prebuilt curve (used by :class:`OODMetrics` to sort once).

        Args:
            curve: The tie-grouped curve of the scores.

        Returns:
            A 0-dim float64 tensor.
        """

    def _curve_of_state(self, metric_name: str | None = None) -> OODCurve:
        """The curve of the current state: local, or gathered inside a sync context.

        ``metric_name`` names the metric in errors (default: this class; ``OODMetrics`` passes its own).
        """
        metric_name = metric_name or type(self).__name__
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError(f"{metric_name}: no samples; call update() before compute()")
        # The state holds validated, flattened batches.
        scores, is_ood = dim_zero_cat(self.scores), dim_zero_cat(self.is_ood)
        return _curve_from_validated(scores, is_ood, metric_name)


class AUROC(_OODScoreMetric):
    """Area under the ROC curve: P(OOD score > ID score), ties counted 1/2.

    The same number in both readings (docs/metrics.md "AUROC"; ODIN Sec. 4.3; Lee
    et al. App. B). Equals ``sklearn.metrics.roc_auc_score(is_ood, scores)``.

    Example:
        >>> metric = AUROC()
        >>> metric.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    higher_is_better: bool = True

    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        return auroc_from_curve(curve)


class _AtTPRMetric(_OODScoreMetric):
    """Base of the metrics read at the threshold where the TPR reaches ``tpr``."""

    def __init__(self, tpr: float = 0.95, positive: Positive = "id", **kwargs: Any) -> None:
        _check_params(type(self).__name__, tpr=tpr, positive=positive)
        super().__init__(**kwargs)
        self.tpr = tpr
        self.positive = positive


class FPRAtTPR(_AtTPRMetric):
    """False positive rate at the first threshold whose TPR reaches ``tpr``.

    ``positive="id"`` (the seeds' FPR@95TPR, ODIN Sec. 4.3): the fraction of
    OOD samples accepted as ID at the smallest score value accepting at least
    ``tpr`` of the ID samples. ``positive="ood"`` (OpenOOD / pytorch-ood): the
    fraction of ID samples flagged as OOD at the first threshold, going down
    from +inf, that flags at least ``tpr`` of the OOD samples.

    Args:
        tpr: The true positive rate to reach, in (0, 1].
        positive: ``"id"`` or ``"ood"``, the positive class.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If ``tpr`` is outside (0, 1] or ``positive`` is unknown.
    """

    higher_is_better: bool = False

    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        return fpr_at_tpr_from_curve(curve, self.tpr, self.positive)


class TNRAtTPR(_AtTPRMetric):
    """True negative rate at the TPR threshold: ``1 - FPRAtTPR`` (Lee et al. App. B).

    Args:
        tpr: The true positive rate to reach, in (0, 1].
        positive: ``"id"`` or ``"ood"``, the positive class (see :class:`FPRAtTPR`).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If ``tpr`` is outside (0, 1] or ``positive`` is unknown.
    """

    higher_is_better: bool = True

    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        return tnr_at_tpr_from_curve(curve, self.tpr, self.positive)


class DetectionError(_OODScoreMetric):
    """Detection error Pe = 0.5 (1 - TPR) + 0.5 FPR with equal class priors.

    ``at="tpr"`` (ODIN Sec. 4.3): at the threshold of :class:`FPRAtTPR`.
    ``at="min"`` (ODIN's released code): the minimum over all thresholds,
    ``1 - DetectionAccuracy``, independent of ``positive``.

    Args:
        at: ``"tpr"`` or ``"min"``.
        tpr: The true positive rate of the threshold, in (0, 1] (``at="tpr"``).
        positive: ``"id"`` or ``"ood"`` (``at="tpr"``).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If a parameter is invalid.
    """

    higher_is_better: bool = False

    def __init__(
        self,
        at: DetectionErrorAt = "tpr",
        tpr: float = 0.95,
        positive: Positive = "id",
        **kwargs: Any,
    ) -> None:
        _check_params(type(self).__name__, at=at, tpr=tpr, positive=positive)
        super().__init__(**kwargs)
        self.at = at
        self.tpr = tpr
        self.positive = positive

    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        return detection_error_from_curve(curve, self.at, self.tpr, self.positive)


class DetectionAccuracy(_OODScoreMetric):
    """Detection accuracy: max over thresholds of 0.5 (TPR + 1 - FPR).

    Lee et al. App. B and IsoMax (docs/metrics.md); the same in both readings.
    """

    higher_is_better: bool = True

    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        return detection_accuracy_from_curve(curve)


class _PRAreaMetric(_OODScoreMetric):
    """Base of the areas under precision-recall curves."""

    higher_is_better: bool = True

    def __init__(self, method: PRMethod = "trapezoid", **kwargs: Any) -> None:
        _check_params(type(self).__name__, method=method)
        super().__init__(**kwargs)
        self.method = method


class AUPRIn(_PRAreaMetric):
    """Area under the precision-recall curve with ID positive (ranked by -score).

    ``method="trapezoid"`` is scikit-learn's ``auc(recall, precision)`` over
    ``precision_recall_curve`` (what OpenOOD and pytorch-ood report);
    ``method="ap"`` is ``average_precision_score`` (docs/metrics.md "AUPR-In";
    ODIN Sec. 4.3; Lee et al. App. B).

    Args:
        method: ``"trapezoid"`` or ``"ap"``.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If ``method`` is unknown.
    """

    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        return aupr_in_from_curve(curve, self.method)


class AUPROut(_PRAreaMetric):
    """Area under the precision-recall curve with OOD positive (ranked by score).

    Args:
        method: ``"trapezoid"`` or ``"ap"`` (see :class:`AUPRIn`).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If ``method`` is unknown.
    """

    def compute_from_curve(self, curve: OODCurve) -> Tensor:
        return aupr_out_from_curve(curve, self.method)


class OODMetrics(MetricCollection):
    """All seven OOD metrics over one shared state, sorted once per ``compute()``.

    A :class:`torchmetrics.MetricCollection` whose members share their
    ``scores`` / ``is_ood`` state (one compute group), so ``update`` stores
    each batch once. ``compute()`` syncs that state once across processes and
    derives every member from one curve instead of sorting seven times.

    Keys of ``compute()`` and ``forward()`` (with ``prefix`` / ``postfix``
    added): ``auroc``, ``fpr_at_tpr``, ``tnr_at_tpr``, ``detection_error``,
    ``detection_accuracy``, ``aupr_in``, ``aupr_out``.

    Args:
        tpr: TPR of FPR@TPR, TNR@TPR and the detection error, in (0, 1].
        positive: ``"id"`` (seeds) or ``"ood"`` (OpenOOD / pytorch-ood).
        method: ``"trapezoid"`` or ``"ap"`` for AUPR-In and AUPR-Out.
        detection_error_at: ``"tpr"`` or ``"min"`` (see :class:`DetectionError`).
        prefix: Prepended to every key.
        postfix: Appended to every key.
        **metric_kwargs: Passed to every member :class:`torchmetrics.Metric`
            (e.g. ``process_group``, ``compute_on_cpu``).

    Raises:
        ValueError: If a parameter is invalid.

    Example:
        >>> metrics = OODMetrics(prefix="val/")
        >>> metrics.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> round(float(metrics.compute()["val/auroc"]), 2)
        0.75
    """

    def __init__(
        self,
        tpr: float = 0.95,
        positive: Positive = "id",
        method: PRMethod = "trapezoid",
        detection_error_at: DetectionErrorAt = "tpr",
        prefix: str | None = None,
        postfix: str | None = None,
        **metric_kwargs: Any,
    ) -> None:
        _check_params(
            "OODMetrics", tpr=tpr, positive=positive, method=method, at=detection_error_at
        )
        members: dict[str, Metric | MetricCollection] = {
            "auroc": AUROC(**metric_kwargs),
            "fpr_at_tpr": FPRAtTPR(tpr, positive, **metric_kwargs),
            "tnr_at_tpr": TNRAtTPR(tpr, positive, **metric_kwargs),
            "detection_error": DetectionError(detection_error_at, tpr, positive, **metric_kwargs),
            "detection_accuracy": DetectionAccuracy(**metric_kwargs),
            "aupr_in": AUPRIn(method, **metric_kwargs),
            "aupr_out": AUPROut(method, **metric_kwargs),
        }
        super().__init__(members, prefix=prefix, postfix=postfix, compute_groups=[list(members)])

    # torchmetrics' MetricCollection reuses ModuleDict.update (add modules) to update its metrics
    def update(self, scores: Tensor, is_ood: Tensor) -> None:  # type: ignore[override]
        """Add a batch to the shared state.

        Args:
            scores: OOD scores of any shape, higher = more OOD.
            is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.

        Raises:
            ValueError: If the shapes differ, a score is NaN or ``is_ood`` is not binary.
        """
        super().update(*_validate_inputs(scores, is_ood, type(self).__name__))

    def compute(self) -> dict[str, Tensor]:
        """All seven metrics over every sample added (all processes when distributed).

        Returns:
            0-dim float64 tensors under the keys listed in the class docstring.

        Raises:
            ValueError: If no samples were added, or there is no ID or no OOD sample.
        """
        # Every member shares the state of the group's first member, which
        # receives the updates: sync it once and sort once.
        holder = self._members()[self.compute_groups[0][0]]
        with holder.sync_context(
            dist_sync_fn=holder.dist_sync_fn,
            process_group=holder.process_group,
            should_sync=holder.sync_on_compute,
        ):
            curve = holder._curve_of_state(type(self).__name__)
        return self._from_curve(curve)

    def forward(self, scores: Tensor, is_ood: Tensor) -> dict[str, Tensor]:
        """Add a batch (as ``update``) and return the metrics of this batch alone.

        Args:
            scores: OOD scores of any shape, higher = more OOD.
            is_ood: Same shape; 1 / ``True`` for OOD, 0 / ``False`` for ID.

        Returns:
            0-dim float64 tensors per key; NaN when the batch lacks ID or OOD samples.

        Raises:
            ValueError: If the shapes differ, a score is NaN or ``is_ood`` is not binary.
        """
        self.update(scores, is_ood)
        curve = _batch_curve(scores, is_ood, type(self).__name__)
        if curve is None:
            return {self._key(name): _nan(scores.device) for name in OOD_METRIC_KEYS}
        return self._from_curve(curve)

    def _members(self) -> dict[str, _OODScoreMetric]:
        return cast(dict[str, _OODScoreMetric], dict(self.items(keep_base=True, copy_state=False)))  # built in __init__

    def _key(self, name: str) -> str:
        return f"{self.prefix or ''}{name}{self.postfix or ''}"

    def _from_curve(self, curve: OODCurve) -> dict[str, Tensor]:
        members = self._members()
        return {
            self._key(name): members[name].compute_from_curve(curve) for name in OOD_METRIC_KEYS
        }
