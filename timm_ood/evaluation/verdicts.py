"""Verdicts on a paper's claim "method A beats method B", from paired runs over seeds.

The rule (written at the top of every report that uses it): the runs of A and
B are paired by seed (same seed, same data, same recipe but the method), and
the per-seed differences ``d_i`` (oriented so that ``d_i > 0`` means A is
better) are tested with a two-sided paired t-interval at level ``1 - alpha``:

- **held**: the interval ``mean(d) ± t_{1-alpha/2, n-1} · sd(d) / sqrt(n)``
  lies above 0;
- **not held**: it lies below 0 (B is better by the same rule);
- **inconclusive**: it contains 0, or there are fewer than two paired seeds.

With three seeds ``t_{0.975, 2} = 4.30``: a difference is called only when
its mean exceeds 2.5 times the standard deviation of the differences. That is
deliberately strict; a difference smaller than the run-to-run spread is never
a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["VERDICT_RULE", "Verdict", "paired_verdict"]

#: one paragraph for the top of a report
VERDICT_RULE = (
    "A claim 'A beats B' is **held** when the paired 95% t-interval of the per-seed differences (A minus B, "
    "oriented so that positive favours A; runs paired by training seed) lies entirely on A's side of 0, "
    "**not held** when it lies entirely on B's side, and **inconclusive** otherwise (or with fewer than two "
    "paired seeds). With 3 seeds the mean difference must exceed 2.5 standard deviations of the differences."
)

Outcome = Literal["held", "not held", "inconclusive"]


@dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison and why.

    Attributes:
        outcome: ``"held"``, ``"not held"`` or ``"inconclusive"``.
        mean_difference: mean of the per-seed differences (positive favours A).
        half_width: half-width of the t-interval (inf with fewer than two seeds).
        seeds: the paired seeds.
    """

    outcome: Outcome
    mean_difference: float
    half_width: float
    seeds: tuple[int, ...]

    @property
    def reason(self) -> str:
        """One line: the interval and what it says."""
        return self.explain()

    def explain(self, scale: float = 1.0, unit: str = "") -> str:
        """The interval and what it says, its values times ``scale`` (100 and ``" points"`` for percentages)."""
        if len(self.seeds) < 2:
            return f"only {len(self.seeds)} paired seed(s): no spread to judge against"
        low, high = (scale * (self.mean_difference + sign * self.half_width) for sign in (-1, 1))
        where = {"held": "above 0", "not held": "below 0", "inconclusive": "contains 0"}[self.outcome]
        return (f"difference {scale * self.mean_difference:+.3g}{unit}, 95% interval [{low:+.3g}, {high:+.3g}] "
                f"over {len(self.seeds)} seeds: {where}")


def _t_quantile(probability: float, degrees_of_freedom: int) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, degrees_of_freedom))


def paired_verdict(
    a: Mapping[int, float], b: Mapping[int, float], *, higher_is_better: bool, alpha: float = 0.05
) -> Verdict:
    """Whether "A beats B" holds on a metric, from runs paired by seed (see the module docstring).

    Args:
        a: A's metric by seed.
        b: B's metric by seed; only seeds present in both are paired.
        higher_is_better: True for AUROC or accuracy, False for FPR@95TPR or ECE.
        alpha: one minus the interval's level.

    Raises:
        ValueError: ``alpha`` outside (0, 1), or a NaN metric.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    seeds = tuple(sorted(set(a) & set(b)))
    sign = 1.0 if higher_is_better else -1.0
    differences = [sign * (a[s] - b[s]) for s in seeds]
    if any(math.isnan(d) for d in differences):
        raise ValueError("a metric is NaN; a verdict needs finite values for every paired seed")
    n = len(differences)
    mean = sum(differences) / n if n else float("nan")
    if n < 2:
        return Verdict("inconclusive", mean, math.inf, seeds)
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half_width = _t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    if mean - half_width > 0:
        outcome: Outcome = "held"
    elif mean + half_width < 0:
        outcome = "not held"
    else:
        outcome = "inconclusive"
    return Verdict(outcome, mean, half_width, seeds)
