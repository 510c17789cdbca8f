"""Results over several training seeds: mean ± sd, the per-seed draws, and a single run against a record."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from timm_ood import reference
from timm_ood.cli import main
from timm_ood.evaluation import EvaluationResults
from timm_ood.evaluation.seeds import (
    SeededResults,
    compare_with_reference,
    expected_range_line,
    mean_sd,
)


def _run(accuracy: float, fpr: dict[str, list[float]], sets: tuple[str, ...] = ("a", "b")) -> EvaluationResults:
    """Results of detectors on two OOD sets; ``fpr[d]`` gives the FPR per set, other metrics follow it."""
    metrics = {}
    for detector, values in fpr.items():
        per_set = {s: {"fpr_at_tpr": v, "auroc": 1 - v / 2, "detection_error": v / 2, "aupr_in": 1 - v / 3,
                       "aupr_out": 1 - v / 4} for s, v in zip(sets, values, strict=True)}
        per_set["average"] = {k: sum(per_set[s][k] for s in sets) / len(sets) for k in per_set[sets[0]]}
        metrics[detector] = per_set
    return EvaluationResults(benchmark="bench", model="net", detectors=list(fpr), ood_sets=list(sets),
                             metrics=metrics, accuracy=accuracy, fit_seconds={}, score_seconds={},
                             forward_seconds=0.0, settings={"tpr": 0.95})


def test_mean_sd_is_the_sample_standard_deviation() -> None:
    values = [0.25, 0.5, 0.125, 0.875]
    summary = mean_sd(values)
    assert summary.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert summary.sd == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    assert summary.n == 4
    assert summary.format() == f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"
    assert mean_sd([0.3]).sd == 0 and mean_sd([0.3]).format() == "30.0"
    with pytest.raises(ValueError, match="at least one"):
        mean_sd([])


def test_seeded_results_report_mean_and_spread_of_every_cell(tmp_path) -> None:
    runs = {0: _run(0.90, {"msp": [0.8, 0.6], "energy": [0.3, 0.5]}),
            1: _run(0.92, {"msp": [0.7, 0.5], "energy": [0.2, 0.4]}),
            2: _run(0.91, {"msp": [0.9, 0.7], "energy": [0.4, 0.6]})}
    seeded = SeededResults(runs)
    assert seeded.accuracy().mean == pytest.approx(0.91) and seeded.accuracy().sd == pytest.approx(0.01)
    assert seeded.metric("msp", "a", "fpr_at_tpr").sd == pytest.approx(0.1)
    assert seeded.summary()["energy"].mean == pytest.approx(0.4)
    table = seeded.table()
    assert "| msp | a | 80.0 ± 10.0 |" in table and "| energy | **average** | 40.0 ± 10.0 |" in table
    paths = seeded.save(tmp_path / "report", plots=False, command="timm-ood demo --seeds 0,1,2")
    text = paths["markdown"].read_text()
    assert "over 3 training seeds" in text and "ID accuracy: 91.00 ± 1.00%" in text
    assert "| 1 | 92.00 | 60.0 | 30.0 |" in text  # the per-seed draw behind the means
    assert "expect ID accuracy within about ±2.00 points" in text
    for seed in runs:
        assert (tmp_path / "report" / f"seed-{seed}" / "results.md").exists()
    saved = json.loads(paths["json"].read_text())
    assert saved["accuracy"]["n"] == 3 and saved["metrics"]["msp"]["average"]["fpr_at_tpr"]["mean"] == pytest.approx(0.7)
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "detector,ood_set,metric,mean,sd,n" and len(rows) == 1 + 2 * 3 * 5


def test_seeded_results_refuse_runs_evaluated_differently() -> None:
    with pytest.raises(ValueError, match="evaluate every seed the same way"):
        SeededResults({0: _run(0.9, {"msp": [0.5, 0.5]}), 1: _run(0.9, {"energy": [0.5, 0.5]})})
    with pytest.raises(ValueError, match="at least one seed"):
        SeededResults({})


def test_a_single_run_is_placed_against_the_recorded_spread() -> None:
    record = SeededResults({0: _run(0.90, {"msp": [0.8, 0.6]}), 1: _run(0.92, {"msp": [0.6, 0.4]})}).reference_summary()
    run = _run(0.93, {"msp": [0.9, 0.7]})
    text = compare_with_reference(run, record)
    assert "| ID accuracy | 93.00 | 91.00 ± 1.41 | +1.4 |" in text
    assert "| msp: average FPR@95TPR | 80.0 | 60.0 ± 14.1 | +1.4 |" in text
    assert expected_range_line(record) in text


def test_recorded_results_apply_only_to_the_same_recipe_family(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reference, "RECORDED_RESULTS", tmp_path / "reference_results.json")
    recipe = reference.FAST_RECIPE
    assert reference.recorded_results(recipe) is None  # nothing recorded yet
    reference.record_results(recipe, {"seeds": [0, 1], "fpr_at_tpr": {}})
    assert reference.recorded_results(dataclasses.replace(recipe, seed=7))["seeds"] == [0, 1]  # any seed
    assert reference.recorded_results(dataclasses.replace(recipe, epochs=2)) is None  # another recipe
    reference.record_results(reference.RECIPE, {"seeds": [0, 1, 2], "fpr_at_tpr": {}})
    reference.record_results(recipe, {"seeds": [3, 4], "fpr_at_tpr": {}})  # replaces its own family's record
    assert reference.recorded_results(recipe)["seeds"] == [3, 4]
    assert reference.recorded_results(reference.RECIPE)["seeds"] == [0, 1, 2]
    monkeypatch.setattr(reference, "TRAINING_VERSION", reference.TRAINING_VERSION + 1)
    assert reference.recorded_results(recipe) is None  # recorded by an older training code


def test_the_packaged_record_matches_the_reference_recipe() -> None:
    record = reference.recorded_results(reference.RECIPE)
    assert record is not None, "record the reference with: timm-ood demo --seeds 0,1,2 --record-reference"
    assert len(record["seeds"]) >= 3
    assert record["accuracy"]["mean"] >= 0.90 and record["accuracy"]["n"] == len(record["seeds"])


@pytest.mark.slow
def test_demo_over_seeds_reports_mean_and_spread(tmp_path, capsys, data_fashion_mnist, monkeypatch) -> None:
    monkeypatch.setattr(reference, "RECORDED_RESULTS", tmp_path / "reference_results.json")
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--seeds", "0,1", "--record-reference", "--out", str(out), "--quiet"]) == 0
    text = (out / "results.md").read_text()
    assert "over seeds 0, 1" in text and " ± " in text and "timm-ood demo --fast --seeds 0,1" in text
    assert (out / "seed-1" / "plots" / "odin_roc.png").exists()
    assert reference.recorded_results(reference.FAST_RECIPE)["seeds"] == [0, 1]
    single = tmp_path / "single"
    assert main(["demo", "--fast", "--out", str(single), "--quiet"]) == 0  # seed 0: cached, compared with the record
    assert "against the recorded reference (seeds 0, 1)" in (single / "results.md").read_text()
    assert main(["demo", "--fast", "--seeds", "0", "--record-reference", "--out", str(single)]) == 2
    assert "needs at least two --seeds" in capsys.readouterr().err
