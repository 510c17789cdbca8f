"""The metric classes (``timm_ood.metrics.classes``, torchmetrics ``Metric``s): streams, state, torch.distributed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score
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
    aupr_out,
    auroc,
    fpr_at_tpr,
    ood_metrics,
)

from .._distributed import GLOO_AVAILABLE, gloo_process_group, run_two_ranks
from ._reference import ATOL, READINGS, assert_metrics_equal, overlapping_tied, reference

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
