"""The verdict rule for a paper's claim over seeds: a paired t-interval of the per-seed differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from timm_ood.evaluation.verdicts import VERDICT_RULE, paired_verdict


def test_a_clear_difference_holds_and_its_mirror_does_not():
    a = {0: 0.30, 1: 0.32, 2: 0.31}  # FPR of A: lower is better
    b = {0: 0.50, 1: 0.55, 2: 0.52}
    assert paired_verdict(a, b, higher_is_better=False).outcome == "held"
    assert paired_verdict(b, a, higher_is_better=False).outcome == "not held"
    assert paired_verdict(a, b, higher_is_better=True).outcome == "not held"


def test_a_difference_within_the_spread_is_inconclusive():
    """ODIN 72.004 vs VIBY 72.013 on one seed was once counted as held: paired over seeds it is noise."""
    a = {0: 0.72004, 1: 0.65, 2: 0.79}
    b = {0: 0.72013, 1: 0.70, 2: 0.74}
    verdict = paired_verdict(a, b, higher_is_better=False)
    assert verdict.outcome == "inconclusive" and "contains 0" in verdict.reason


def test_one_seed_is_never_a_verdict():
    verdict = paired_verdict({0: 0.1}, {0: 0.9}, higher_is_better=False)
    assert verdict.outcome == "inconclusive" and math.isinf(verdict.half_width)
    assert "no spread" in verdict.reason


def test_only_seeds_run_by_both_are_paired():
    verdict = paired_verdict({0: 0.9, 1: 0.91, 2: 0.92, 3: 0.1}, {0: 0.5, 1: 0.52, 2: 0.5},
                             higher_is_better=True)
    assert verdict.seeds == (0, 1, 2) and verdict.outcome == "held"


def test_the_interval_is_scipys_paired_t_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 0.02, 5), rng.normal(0.78, 0.02, 5)
    verdict = paired_verdict(dict(enumerate(a)), dict(enumerate(b)), higher_is_better=True)
    d = a - b
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert verdict.mean_difference == pytest.approx(d.mean())
    assert verdict.mean_difference - verdict.half_width == pytest.approx(low)
    assert verdict.mean_difference + verdict.half_width == pytest.approx(high)
    assert (verdict.outcome == "held") == (low > 0) and (verdict.outcome == "not held") == (high < 0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        paired_verdict({0: 1.0}, {0: 0.0}, higher_is_better=True, alpha=0)
    with pytest.raises(ValueError, match="NaN"):
        paired_verdict({0: float("nan"), 1: 0.2}, {0: 0.1, 1: 0.1}, higher_is_better=True)
    assert "held" in VERDICT_RULE and "inconclusive" in VERDICT_RULE
