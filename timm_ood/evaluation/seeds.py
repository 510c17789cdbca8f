"""Results over several training seeds: mean and spread instead of one draw.

A trained model's result is one draw from its recipe: another seed, another
thread count or another CPU gives another model and other OOD numbers.
:class:`SeededResults` holds one :class:`EvaluationResults` per seed and
reports every metric as ``mean ± sd`` over the seeds (the sample standard
deviation, ``ddof=1``), next to the range a further run may land in.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .results import AVERAGE, METRIC_TITLES, TABLE_METRICS, EvaluationResults, markdown_table

__all__ = ["MeanSD", "SeededResults", "mean_sd"]


@dataclass(frozen=True)
class MeanSD:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value) of ``n`` values."""

    mean: float
    sd: float
    n: int

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"mean ± sd"`` in percent by default (only the mean for a single run)."""
        if self.n == 1:
            return f"{scale * self.mean:.{digits}f}"
        return f"{scale * self.mean:.{digits}f} ± {scale * self.sd:.{digits}f}"

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def mean_sd(values: Sequence[float]) -> MeanSD:
    """Mean and sample standard deviation of ``values`` (at least one)."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return MeanSD(mean, sd, n)


@dataclass
class SeededResults:
    """One :class:`EvaluationResults` per training seed, summarised as mean ± sd.

    Attributes:
        runs: results by seed; every run has the same detectors and OOD sets.
    """

    runs: Mapping[int, EvaluationResults]

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("SeededResults needs the results of at least one seed")
        first = next(iter(self.runs.values()))
        for seed, run in self.runs.items():
            if run.detectors != first.detectors or run.ood_sets != first.ood_sets:
                raise ValueError(
                    f"seed {seed} was evaluated with detectors {run.detectors} on {run.ood_sets}, the first "
                    f"seed with {first.detectors} on {first.ood_sets}: evaluate every seed the same way"
                )

    @property
    def seeds(self) -> list[int]:
        return list(self.runs)

    @property
    def _first(self) -> EvaluationResults:
        return next(iter(self.runs.values()))

    @property
    def detectors(self) -> list[str]:
        return self._first.detectors

    @property
    def ood_sets(self) -> list[str]:
        return self._first.ood_sets

    @property
    def _sets(self) -> list[str]:
        return [*self.ood_sets, *([AVERAGE] if len(self.ood_sets) > 1 else [])]

    def accuracy(self) -> MeanSD | None:
        """ID test accuracy over the seeds (None without logits)."""
        values = [r.accuracy for r in self.runs.values()]
        return None if any(v is None for v in values) else mean_sd([float(v) for v in values])  # type: ignore[arg-type]

    def metric(self, detector: str, ood_set: str, metric: str) -> MeanSD:
        """One metric of one detector on one OOD set (or ``"average"``), over the seeds."""
        return mean_sd([r.metrics[detector][ood_set][metric] for r in self.runs.values()])

    def summary(self, metric: str = "fpr_at_tpr") -> dict[str, MeanSD]:
        """Per detector: ``metric`` averaged over the OOD sets, then mean ± sd over the seeds."""
        key = AVERAGE if len(self.ood_sets) > 1 else self.ood_sets[0]
        return {d: self.metric(d, key, metric) for d in self.detectors}

    def table(self, metrics: Sequence[str] = TABLE_METRICS, *, digits: int = 1) -> str:
        """Per detector x OOD set, ``mean ± sd`` in percent, as a markdown table."""
        first = self._first
        header = ["detector", "OOD set", *(first._title(m) for m in metrics)]
        rows = []
        for detector in self.detectors:
            for ood_set in self._sets:
                name = f"**{ood_set}**" if ood_set == AVERAGE else ood_set
                rows.append([detector, name, *(self.metric(detector, ood_set, m).format(digits=digits)
                                               for m in metrics)])
        return markdown_table(header, rows)

    def per_seed_table(self, metric: str = "fpr_at_tpr") -> str:
        """Accuracy and each detector's average ``metric``, one row per seed: the draws behind the means."""
        key = AVERAGE if len(self.ood_sets) > 1 else self.ood_sets[0]
        header = ["seed", "ID accuracy", *(f"{d}" for d in self.detectors)]
        rows = []
        for seed, run in self.runs.items():
            accuracy = "" if run.accuracy is None else f"{100 * run.accuracy:.2f}"
            rows.append([seed, accuracy, *(f"{100 * run.metrics[d][key][metric]:.1f}" for d in self.detectors)])
        return markdown_table(header, rows)

    def to_dict(self) -> dict[str, Any]:
        """Means and spreads, and every run, JSON-ready."""
        accuracy = self.accuracy()
        metrics = {d: {s: {m: self.metric(d, s, m).to_dict() for m in self._first.metrics[d][s]}
                       for s in self._sets} for d in self.detectors}
        return {
            "benchmark": self._first.benchmark,
            "model": self._first.model,
            "seeds": self.seeds,
            "detectors": self.detectors,
            "ood_sets": self.ood_sets,
            "accuracy": None if accuracy is None else accuracy.to_dict(),
            "metrics": metrics,
            "runs": {str(seed): run.to_dict() for seed, run in self.runs.items()},
        }

    def markdown(self, command: str | None = None) -> str:
        """A report: the command, the spread rule, mean ± sd tables and the per-seed draws."""
        first = self._first
        lines = [f"# {first.model} on {first.benchmark}, over seeds {', '.join(map(str, self.seeds))}", ""]
        if command:
            lines += ["Made by:", "", "```", command, "```", ""]
        reading = "in-distribution positive (the seeds')" if first.settings.get("positive", "id") == "id" \
            else "OOD positive (OpenOOD / pytorch-ood)"
        lines += [
            f"Metric reading: {reading}; values in %, as mean ± sd over {len(self.runs)} training seeds "
            "(sample standard deviation). Each seed trains the model anew and evaluates it the same way.",
            "",
        ]
        accuracy = self.accuracy()
        if accuracy is not None:
            lines += [f"ID accuracy: {accuracy.format(digits=2)}%", ""]
        if len(self.runs) > 1:
            lines += [expected_range_line(self), ""]
        lines += [self.table(), "", "## Each seed", "", f"Average {METRIC_TITLES['fpr_at_tpr'].format(tpr='95')} "
                  "per detector over the OOD sets, and ID accuracy, in %:", "", self.per_seed_table(), "",
                  "Full per-seed reports, with plots: " + ", ".join(f"[seed {s}](seed-{s}/results.md)"
                                                                    for s in self.seeds), ""]
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike, *, plots: bool = True, command: str | None = None) -> dict[str, Path]:
        """Write the summary (``results.md``, ``.json``, ``.csv``) and each seed's report in ``seed-<n>/``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for seed, run in self.runs.items():
            run.save(out / f"seed-{seed}", plots=plots, command=command)
        paths = {"markdown": out / "results.md", "json": out / "results.json", "csv": out / "results.csv"}
        paths["markdown"].write_text(self.markdown(command=command))
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        with paths["csv"].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["detector", "ood_set", "metric", "mean", "sd", "n"])
            for detector in self.detectors:
                for ood_set in self._sets:
                    for metric in self._first.metrics[detector][ood_set]:
                        value = self.metric(detector, ood_set, metric)
                        writer.writerow([detector, ood_set, metric, value.mean, value.sd, value.n])
        return paths

    def reference_summary(self) -> dict[str, Any]:
        """What a later single run is compared against: accuracy and each detector's average FPR, mean ± sd."""
        accuracy = self.accuracy()
        return {
            "model": self._first.model,
            "benchmark": self._first.benchmark,
            "seeds": self.seeds,
            "accuracy": None if accuracy is None else accuracy.to_dict(),
            "fpr_at_tpr": {d: v.to_dict() for d, v in self.summary("fpr_at_tpr").items()},
            "auroc": {d: v.to_dict() for d, v in self.summary("auroc").items()},
        }


def expected_range_line(results: SeededResults | Mapping[str, Any]) -> str:
    """One sentence telling a newcomer how far their own run may land from the recorded means."""
    summary = results.reference_summary() if isinstance(results, SeededResults) else results
    fprs = summary["fpr_at_tpr"]
    widest = max(fprs, key=lambda d: fprs[d]["sd"])
    accuracy = summary.get("accuracy")
    parts = []
    if accuracy:
        parts.append(f"ID accuracy within about ±{200 * accuracy['sd']:.2f} points")
    parts.append(f"each detector's average FPR@95TPR within about ±{200 * fprs[widest]['sd']:.1f} points "
                 f"(the widest, {widest})")
    return (f"Your own run is one more draw: expect {' and '.join(parts)} of these means (2 sd over "
            f"{len(summary['seeds'])} seeds; with so few seeds the spread itself is uncertain).")


def compare_with_reference(run: EvaluationResults, reference: Mapping[str, Any]) -> str:
    """Markdown: a single run's accuracy and average FPR@95TPR next to recorded mean ± sd over seeds."""
    fprs = reference["fpr_at_tpr"]
    key = AVERAGE if len(run.ood_sets) > 1 else run.ood_sets[0]
    rows = []
    accuracy = reference.get("accuracy")
    if accuracy and run.accuracy is not None:
        rows.append(["ID accuracy", f"{100 * run.accuracy:.2f}",
                     f"{100 * accuracy['mean']:.2f} ± {100 * accuracy['sd']:.2f}",
                     _z(run.accuracy, accuracy)])
    for detector in run.detectors:
        if detector in fprs:
            value = run.metrics[detector][key]["fpr_at_tpr"]
            rows.append([f"{detector}: average FPR@95TPR", f"{100 * value:.1f}",
                         f"{100 * fprs[detector]['mean']:.1f} ± {100 * fprs[detector]['sd']:.1f}",
                         _z(value, fprs[detector])])
    seeds = ", ".join(map(str, reference["seeds"]))
    return "\n".join([
        f"## This run against the recorded reference (seeds {seeds})", "",
        markdown_table(["", "this run", "recorded mean ± sd", "distance (sd)"], rows), "",
        expected_range_line(reference), "",
    ])


def _z(value: float, recorded: Mapping[str, float]) -> str:
    return "n/a" if recorded["sd"] == 0 else f"{(value - recorded['mean']) / recorded['sd']:+.1f}"
