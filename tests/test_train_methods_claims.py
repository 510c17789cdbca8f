"""``benchmarks/train_methods.py``'s verdicts: paired over seeds, judged on the sets unlike the auxiliary outliers."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
import torch

from ._benchmarks import benchmark_module

SETS = ["digits", "natural-crop", "natural-resize", "glyphs", "gaussian"]


def bench() -> ModuleType:
    return benchmark_module("train_methods")


def record(fpr: dict[str, dict[str, float]], *, accuracy: float = 0.9, ece: float = 0.05,
           uses_ood_data: str = "none") -> dict:
    metrics = {d: {**{s: {"fpr_at_tpr": v, "auroc": 1 - v} for s, v in per_set.items()},
                   "average": {"fpr_at_tpr": sum(per_set.values()) / len(per_set),
                               "auroc": 1 - sum(per_set.values()) / len(per_set)}}
               for d, per_set in fpr.items()}
    return {"title": "t", "paper": "p", "settings": {}, "head": "linear", "uses_ood_data": uses_ood_data,
            "train_seconds": 1.0, "eval_seconds": 1.0, "accuracy": accuracy, "calibration_error": ece,
            "detectors": list(fpr), "ood_sets": SETS, "sizes": {"id": 10, **dict.fromkeys(SETS, 10)},
            "metrics": metrics}


def flat(value: float, like_aux: float | None = None) -> dict[str, float]:
    return {s: (like_aux if like_aux is not None and s in ("natural-crop", "natural-resize") else value) for s in SETS}


def verdict(rows: list[list[str]], text: str) -> list[str]:
    return next(row for row in rows if row[0].startswith(text))


def test_a_method_trained_on_auxiliary_outliers_is_judged_on_the_sets_unlike_them():
    """Confidence loss: far better on crop/resize (like the auxiliary photos), worse on the others: not held."""
    runs = {str(seed): {
        "ce": record({"msp": flat(0.50 + seed / 100)}, ece=0.10 + seed / 100),
        "confidence": record({"msp": flat(0.60 + seed / 100, like_aux=0.05)}, ece=0.02 + seed / 100,
                             uses_ood_data="auxiliary photos"),
    } for seed in range(3)}
    rows = bench().check_claims(runs)
    unseen = verdict(rows, "Confidence loss with seen OOD data")
    assert unseen[2] == "**not held**" and unseen[3] == "sets unlike the auxiliary outliers"
    calibration = verdict(rows, "Confidence loss is better calibrated")
    assert calibration[2] == "**held**" and calibration[3] == "ID test set"
    assert verdict(rows, "VIBY beats VIB")[2] == "not run"


def test_a_difference_inside_the_seed_spread_is_inconclusive_and_isomax_must_keep_its_accuracy():
    runs = {str(seed): {
        "ce": record({"msp": flat([0.50, 0.60, 0.55][seed])}, accuracy=0.90),
        "isomax": record({"entropic": flat([0.52, 0.58, 0.56][seed])}, accuracy=0.80),
    } for seed in range(3)}
    assert verdict(bench().check_claims(runs), "IsoMax + entropic score beats SoftMax")[2] == "**inconclusive**"
    runs = {str(seed): {
        "ce": record({"msp": flat(0.50 + seed / 100)}, accuracy=0.90),
        "isomax": record({"entropic": flat(0.20 + seed / 100)}, accuracy=0.85),
    } for seed in range(3)}
    row = verdict(bench().check_claims(runs), "IsoMax + entropic score beats SoftMax")
    assert row[2] == "**not held**" and "accuracy loss +5.00 points" in row[4]


def test_the_report_gives_mean_and_sd_over_seeds_and_states_the_rule():
    runs = {str(seed): {"ce": record({"msp": flat(0.5 + seed / 10)})} for seed in range(3)}
    state = {"recipe": {"outlier_images": 10}, "runs": runs, "commands": ["python benchmarks/train_methods.py"],
             "machine": "test"}
    report = bench().render(state)
    assert "Seeds: 0, 1, 2" in report and "**Verdict rule.**" in report and "Unseen means unseen" in report
    assert "60.0 ± 10.0" in report  # the average FPR of the three seeds: 50, 60, 70


def test_variants_are_reported_apart_and_judged_against_their_base():
    """GReg+ against GReg with as many (random) outliers: the paper's own comparison, a variant row of its own."""
    runs = {str(seed): {
        "greg": record({"energy": flat(0.30 + seed / 100)}, uses_ood_data="auxiliary photos"),
        "greg-plus": record({"energy": flat(0.20 + seed / 100)}, uses_ood_data="auxiliary photos"),
        "greg-2x": {**record({"energy": flat(0.10 + seed / 50)}, uses_ood_data="auxiliary photos"),
                    "title": "GReg, 2 random outliers per ID image", "variant_of": "greg"},
    } for seed in range(3)}
    rows = bench().check_claims(runs)
    assert verdict(rows, "GReg+ sampling helps")[2] == "**held**"
    equal = verdict(rows, "GReg+'s clustered picks beat as many random outliers")
    assert equal[2] == "**not held**" and "lower mean FPR on 0 of 3 judged sets" in equal[4]
    state = {"recipe": {"outlier_images": 10}, "runs": runs, "commands": ["c"], "machine": "test"}
    report = bench().render(state)
    variants = report.index("## Each paper's own recipe, and sweeps")
    assert report.index("GReg, 2 random outliers per ID image") > variants > report.index("## Summary")


def test_gradient_norms_and_bottleneck_terms_make_tables_and_a_figure(tmp_path):
    norms = [{"id": [1.0, 2.0, 3.0], "auxiliary": [1.0, 0.5, 0.25]}, {"id": [1.2, 2.2, 3.2], "auxiliary": [1, 0.6, 0.3]}]
    per_set = {name: {"kl": kl, "kl_mean_term": kl - 1, "kl_variance_term": 1.0, "pre_logits_norm": 2.0,
                      "posterior_mean_norm": 1.0} for name, kl in (("id", 10.0), ("digits", 4.0))}
    runs = {str(seed): {
        "greg": {**record({"energy": flat(0.3)}), "measurements": {"gradient_norms": norms[seed]}},
        "viby": {**record({"viby-2": flat(0.5)}), "measurements": {"bottleneck": {"per_set": per_set,
                                                                                  "prior_separation": 3.0}}},
    } for seed in range(2)}
    report = bench().render({"recipe": {"outlier_images": 10}, "runs": runs, "commands": ["c"], "machine": "m"},
                            figures=tmp_path)
    lines = report.splitlines()
    assert "| t | ID | 1.10 ± 0.14 | 2.10 ± 0.14 | 3.10 ± 0.14 |" in lines
    assert "| t | digits | 4.00 ± 0.00 | 3.00 ± 0.00 | 1.00 ± 0.00 | 2.00 ± 0.00 | 2 of 2 |" in lines
    assert (tmp_path / "training_methods_gradient_norms.png").stat().st_size > 10_000
    for line in lines:  # every table row has as many cells as its header: no stray '|' in a cell
        if line.startswith("| ---"):
            header = lines[lines.index(line) - 1]
            assert line.count("|") == header.count("|"), header


def test_runs_saved_by_separate_processes_are_merged_not_overwritten(tmp_path):
    module = bench()
    out = tmp_path / "report.md"
    base = module.FAST_RECIPE
    for seed in (0, 1):  # each call reads the record from disk, as a second process would
        module.save_run(out, base, seed, "ce", record({"msp": flat(0.5 + seed / 10)}), f"run seed {seed}")
    state = json.loads(out.with_suffix(".json").read_text())
    assert sorted(state["runs"]) == ["0", "1"] and state["commands"] == ["run seed 0", "run seed 1"]
    assert "Seeds: 0, 1." in out.read_text()


def test_the_gradient_norm_probe_measures_at_the_start_and_every_quarter_epoch_without_changing_the_run():
    """GReg Fig. 3's probe: the wrapped objective trains exactly as it would alone; the norms are the library's."""
    from timm_ood import training

    from ._models import batches, create, digits_split, noise_images

    images, labels = digits_split()["train"]
    train, outliers = batches(images[:64], labels[:64], 8), [noise_images(8, seed=s) for s in range(8)]
    probes = {"id": images[:16], "auxiliary": noise_images(16, seed=9)}
    trained = {}
    for probed in (False, True):
        torch.manual_seed(0)
        model = create("test_resnet")
        loss = training.as_objective(training.EnergyLoss(m_in=-12.0, m_out=-4.0), with_outliers=True)
        if probed:
            loss = bench().GradientNormProbe(loss, probes, per_epoch=4)
        training.fit(model, train, loss=loss, outliers=outliers, epochs=1, lr=0.01, seed=0, progress=False)
        trained[probed] = model
    for before, after in zip(trained[False].state_dict().values(), trained[True].state_dict().values(), strict=True):
        assert torch.equal(before, after)
    assert loss.norms["epochs"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert float(loss.norms["id"][-1]) == pytest.approx(
        float(training.energy_input_gradient_norms(trained[True], probes["id"]).mean()), rel=1e-5)
    assert len(loss.norms["auxiliary"]) == 5
