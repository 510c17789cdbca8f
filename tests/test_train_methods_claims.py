"""``benchmarks/train_methods.py``'s verdicts: paired over seeds, judged on the sets unlike the auxiliary outliers."""

from __future__ import annotations

from types import ModuleType

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
