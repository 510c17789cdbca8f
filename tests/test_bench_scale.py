"""``benchmarks/bench_scale.py`` runs end to end at a tiny size (D = 64, K = 10), every kind of job included."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from ._benchmarks import benchmark_module


def bench() -> ModuleType:
    return benchmark_module("bench_scale")


def test_chunks_are_the_same_in_every_process_and_the_tap_reads_a_real_linear_head() -> None:
    data = bench().Synthetic(bench().QUICK)
    first, labels = data.chunk("fit", 3, 100)
    again, same_labels = bench().Synthetic(bench().QUICK).chunk("fit", 3, 100)
    assert torch.equal(first, again) and torch.equal(labels, same_labels)
    assert not torch.equal(first, data.chunk("ood", 3, 100)[0])
    assert bool((first >= 0).all())  # ReLU'd like pooled CNN features
    weight, bias = data.tap.linear_classifier("test")
    assert weight.shape == (10, 64) and bias.shape == (10,)
    outputs = data.outputs(first, frozenset({bench().Need.LOGITS}))
    assert torch.allclose(outputs.logits, first @ weight.T + bias)
    with pytest.raises(RuntimeError, match="pre_logits"):  # only what the detector declares, as the tap
        _ = outputs.pre_logits


def test_the_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_ood")
    out = tmp_path / "scale.md"
    text = bench().main(["--quick", "--in-process", "--detectors", "mahalanobis,vim,react,ash-p,knn",
                         "--out", str(out)])
    assert out.read_text() == text
    assert text.startswith("# ImageNet-scale") and "Command: `python benchmarks/bench_scale.py --quick --in-process --detectors mahalanobis,vim,react,ash-p,knn`" in text
    for heading in ("## Streaming fits", "Floor operations", "## Detectors without a fit",
                    "## Exact nearest-neighbour search", "## Side by side with pytorch-ood"):
        assert heading in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    first = {row[0].strip("| ") for row in rows}
    assert {"mahalanobis", "vim", "react", "ash-p", "knn"} <= first
    assert any(row[1] == "Mahalanobis" for row in rows)  # pytorch-ood's side
    streaming = {row[0].strip("| "): row for row in rows if len(row) > 3 and row[3].startswith(("to64", "histogram"))}
    assert set(streaming) == {"mahalanobis", "vim", "react"}
    for row in streaming.values():  # fit, finish and floor seconds and the three ratios are numbers
        for cell in (row[1], row[2], *row[4:8]):
            float(cell.strip("*"))
    assert "error" not in text.lower() and "exit status" not in text


def test_every_registered_detector_is_measured_or_says_why_not() -> None:
    import timm_ood

    data = bench().Synthetic(bench().QUICK)
    plan = bench().plan_detectors(None, data.tap, with_plugins=False)
    measured = plan.fits + plan.score_only + plan.logit_sanity + plan.banks + plan.plugins
    assert set(measured) | set(plan.excluded) >= set(timm_ood.list_detectors())
    assert not set(measured) & set(plan.excluded)
    assert {"mahalanobis", "rmd", "gmm", "vim", "react", "she", "openmax"} <= set(plan.fits)
    assert set(plan.banks) == {"knn", "nnguide"}
    assert "gmm (covariance='full')" in plan.excluded  # 33.5 GB at ImageNet's size
    assert "needs images" in plan.excluded["odin"] and "feature maps" in plan.excluded["gram"]


def test_a_job_runs_in_its_own_process_under_the_watchdog() -> None:
    module = bench()
    shapes = module.QUICK
    job = module.Job("timm", "mahalanobis", rows=512, queries=16)
    result = module.run_isolated(job, shapes, budget_mb=8192, timeout=60)
    assert "error" not in result, result
    assert set(result["floor_ops"]) == {"to64", "gram64", "class_sum64", "gram32"}
    assert result["peak_fit_mb"] > 0 and 0 <= result["auroc"] <= 1
    stopped = module.run_isolated(job, shapes, budget_mb=1, timeout=60)
    assert stopped["error"].startswith("out of memory")
