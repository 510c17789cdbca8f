"""Evaluation results: the seeds' tables, as text, markdown, JSON, CSV and plots."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..distributed import is_main_process
from ..scoring import ScoredSets
from .plots import HeatmapPanel, plot_roc_curves, plot_score_histograms, plot_summary

__all__ = ["METRIC_TITLES", "TABLE_METRICS", "EvaluationResults", "markdown_table"]

#: column titles, with the direction that is better
METRIC_TITLES: dict[str, str] = {
    "fpr_at_tpr": "FPR@{tpr}TPR ↓",
    "tnr_at_tpr": "TNR@{tpr}TPR ↑",
    "detection_error": "Det. error ↓",
    "detection_accuracy": "Det. acc. ↑",
    "auroc": "AUROC ↑",
    "aupr_in": "AUPR-In ↑",
    "aupr_out": "AUPR-Out ↑",
}
#: the columns of ODIN's Table 2
TABLE_METRICS: tuple[str, ...] = ("fpr_at_tpr", "detection_error", "auroc", "aupr_in", "aupr_out")
AVERAGE = "average"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


@dataclass
class EvaluationResults:
    """Metrics of every detector on every OOD set, ID accuracy, and time spent.

    Attributes:
        benchmark: the benchmark's name.
        model: the model's architecture.
        detectors: detector labels, in order.
        ood_sets: OOD set names, in order.
        metrics: ``metrics[detector][ood_set or "average"][metric]``, fractions in [0, 1].
        accuracy: top-1 accuracy on the in-distribution test set (None without logits).
        fit_seconds / score_seconds: per detector.
        forward_seconds: the shared forward passes while scoring.
        settings: ``tpr``, ``positive``, set sizes, hyperparameters, ...
        scored: the raw scores (for plots; not saved in JSON).
        notes: extra markdown sections for the report, after the table (e.g. how this run
            compares with a reference recorded over several seeds).
        calibration_error: top-1 expected calibration error on the labelled ID test
            images (15 bins; :func:`timm_ood.metrics.expected_calibration_error`), None
            without logits or labels.
    """

    benchmark: str
    model: str
    detectors: list[str]
    ood_sets: list[str]
    metrics: dict[str, dict[str, dict[str, float]]]
    accuracy: float | None
    fit_seconds: dict[str, float]
    score_seconds: dict[str, float]
    forward_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    scored: ScoredSets | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    group_metrics: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict, repr=False)
    calibration_error: float | None = None

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds spent per detector: fitting plus scoring (its own passes included)."""
        return {d: self.fit_seconds.get(d, 0.0) + self.score_seconds.get(d, 0.0) for d in self.detectors}

    def _title(self, metric: str) -> str:
        tpr = self.settings.get("tpr", 0.95)
        return METRIC_TITLES[metric].format(tpr=f"{100 * tpr:g}")

    def table(self, metrics: Sequence[str] = TABLE_METRICS, *, average: bool = True, digits: int = 1) -> str:
        """Per detector x OOD set, metrics in percent, as a markdown table (the seeds' Table 2 layout)."""
        unknown = [m for m in metrics if m not in METRIC_TITLES]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRIC_TITLES)}")
        header = ["detector", "OOD set", *(self._title(m) for m in metrics)]
        rows = []
        sets = [*self.ood_sets, *([AVERAGE] if average and len(self.ood_sets) > 1 else [])]
        groups = self.group_summary() if average else {}
        for detector in self.detectors:
            for ood_set in sets:
                values = self.metrics[detector][ood_set]
                name = f"**{ood_set}**" if ood_set == AVERAGE else ood_set
                rows.append([detector, name, *(f"{100 * values[m]:.{digits}f}" for m in metrics)])
            for group, values in groups.get(detector, {}).items():
                rows.append([detector, f"**{group}-OOD**", *(f"{100 * values[m]:.{digits}f}" for m in metrics)])
        accuracy = "" if self.accuracy is None else f"ID accuracy: {100 * self.accuracy:.2f}%"
        if accuracy and self.calibration_error is not None:
            accuracy += f", ECE {100 * self.calibration_error:.2f}% (15 bins)"
        return (accuracy + "\n\n" if accuracy else "") + markdown_table(header, rows)

    @property
    def ood_groups(self) -> dict[str, list[str]]:
        """``settings["ood_groups"]`` (e.g. OpenOOD's near / far), restricted to the evaluated sets."""
        groups = {g: [s for s in members if s in self.ood_sets]
                  for g, members in (self.settings.get("ood_groups") or {}).items()}
        return {g: members for g, members in groups.items() if members}

    def id_scores(self, detector: str) -> torch.Tensor:
        """The in-distribution scores the metrics were computed on: the ID test set's, and in the
        full-spectrum setting those of the covariate-shifted ID sets after them."""
        if self.scored is None:
            raise ValueError("these results carry no scores (loaded from JSON?)")
        scores = self.scored.scores[detector]
        shifted = self.settings.get("covariate_shifted_sets") or []
        return torch.cat([scores[self.settings.get("id_set", "id")], *(scores[name] for name in shifted)])

    def group_summary(self, positive: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """Per detector and group, every metric averaged over the group's OOD sets.

        OpenOOD v1.5 (Zhang et al. 2023) reports near-OOD and far-OOD as the
        mean of the per-set metrics within each group; so does this.

        Args:
            positive: the metric reading, ``"id"`` (the seeds') or ``"ood"``
                (OpenOOD's); default the run's. The other reading is computed
                from the raw scores.

        Returns:
            ``{detector: {group: {metric: value}}}``; empty without ``ood_groups``.

        Raises:
            ValueError: an unknown reading, or the other reading of results that
                carry no scores and did not store it.
        """
        run_reading = self.settings.get("positive", "id")
        positive = positive or run_reading
        if positive not in ("id", "ood"):
            raise ValueError(f"positive must be 'id' or 'ood', not {positive!r}")
        groups = self.ood_groups
        if not groups:
            return {}
        if positive in self.group_metrics:
            return self.group_metrics[positive]
        if positive == run_reading:
            per_set = self.metrics
        elif self.scored is not None:
            id_set, tpr = self.settings.get("id_set", "id"), self.settings.get("tpr", 0.95)
            per_set = {d: metrics_per_set({**self.scored.scores[d], id_set: self.id_scores(d)}, id_set,
                                          self.ood_sets, tpr=tpr, positive=positive)
                       for d in self.detectors}
        else:
            raise ValueError(f"these results carry no scores to compute the {positive!r} reading from")
        summary = {
            d: {g: {k: sum(per_set[d][s][k] for s in members) / len(members) for k in per_set[d][members[0]]}
                for g, members in groups.items()}
            for d in self.detectors
        }
        self.group_metrics[positive] = summary
        return summary

    def group_table(self, metrics: Sequence[str] = ("fpr_at_tpr", "auroc", "aupr_in", "aupr_out"),
                    *, digits: int = 2) -> str:
        """Group averages (near-OOD, far-OOD) in both metric readings, as OpenOOD reports them."""
        header = ["detector", "group", "reading", *(self._title(m) for m in metrics)]
        readings = {"id": "ID positive", "ood": "OOD positive (OpenOOD)"}
        available = {}
        for positive in readings:
            try:
                available[positive] = self.group_summary(positive)
            except ValueError:
                continue
        rows = []
        for detector in self.detectors:
            for group, members in self.ood_groups.items():
                for positive, summary in available.items():
                    values = summary[detector][group]
                    rows.append([detector, f"{group} ({', '.join(members)})", readings[positive],
                                 *(f"{100 * values[m]:.{digits}f}" for m in metrics)])
        return markdown_table(header, rows)

    def timing_table(self) -> str:
        """Seconds per detector (fit + scoring) next to the shared forward passes."""
        rows = [[d, f"{self.fit_seconds.get(d, 0.0):.2f}", f"{self.score_seconds.get(d, 0.0):.2f}",
                 f"{self.seconds[d]:.2f}"] for d in self.detectors]
        rows.append(["(shared forward passes)", "", f"{self.forward_seconds:.2f}", f"{self.forward_seconds:.2f}"])
        return markdown_table(["detector", "fit s", "score s", "total s"], rows)

    def summary(self, metric: str = "fpr_at_tpr") -> dict[str, float]:
        """One number per detector: ``metric`` averaged over the OOD sets."""
        key = AVERAGE if len(self.ood_sets) > 1 else self.ood_sets[0]
        return {d: self.metrics[d][key][metric] for d in self.detectors}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the raw scores, JSON-ready."""
        return {
            "benchmark": self.benchmark,
            "model": self.model,
            "detectors": self.detectors,
            "ood_sets": self.ood_sets,
            "accuracy": self.accuracy,
            "calibration_error": self.calibration_error,
            "metrics": self.metrics,
            "fit_seconds": self.fit_seconds,
            "score_seconds": self.score_seconds,
            "forward_seconds": self.forward_seconds,
            "settings": self.settings,
            **({"groups": {p: self.group_summary(p) for p in ("id", "ood") if self._has_reading(p)}}
               if self.ood_groups else {}),
        }

    def _has_reading(self, positive: str) -> bool:
        return positive in self.group_metrics or positive == self.settings.get("positive", "id") \
            or self.scored is not None

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat row per detector x OOD set (and average): for CSV."""
        rows = []
        for detector in self.detectors:
            for ood_set, values in self.metrics[detector].items():
                rows.append({"detector": detector, "ood_set": ood_set, **values,
                             "seconds": self.seconds[detector]})
        return rows

    def save(self, directory: str | os.PathLike, *, plots: bool = True, command: str | None = None) -> dict[str, Path]:
        """Write ``results.md``, ``results.json``, ``results.csv`` and PNG plots into ``directory``.

        Args:
            directory: created if missing.
            plots: also draw ROC curves and score histograms per detector, and the
                summary heat map (``plots/summary.png``).
            command: the command line that produced the results, recorded in the markdown.

        Under torch.distributed only rank 0 writes (every rank holds the same
        results); the other ranks get ``{}``.

        Returns:
            The written paths by kind (``"markdown"``, ``"json"``, ``"csv"``,
            ``"summary"``, ``"roc:<detector>"``, ``"histogram:<detector>"``).
        """
        if not is_main_process():
            return {}
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {"markdown": out / "results.md", "json": out / "results.json",
                                  "csv": out / "results.csv"}
        paths["markdown"].write_text(self.markdown(command=command))
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        rows = self.to_rows()
        with paths["csv"].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if plots and self.scored is not None:
            paths.update(self.save_plots(out / "plots"))
        return paths

    def save_plots(self, directory: str | os.PathLike) -> dict[str, Path]:
        """The summary heat map (``summary.png``), and ROC curves and score histograms per detector.

        Args:
            directory: created if missing.

        Returns:
            The written paths by kind (``"summary"``, ``"roc:<detector>"``, ``"histogram:<detector>"``).

        Raises:
            ValueError: the results carry no raw scores (loaded from JSON).
        """
        if self.scored is None:
            raise ValueError("these results carry no scores to plot (loaded from JSON?)")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"summary": out / "summary.png"}
        self.save_summary(paths["summary"])
        tpr, positive = self.settings.get("tpr", 0.95), self.settings.get("positive", "id")
        for detector in self.detectors:
            scores = self.scored.scores[detector]
            ood = {name: scores[name] for name in self.ood_sets}
            aurocs = {name: self.metrics[detector][name]["auroc"] for name in self.ood_sets}
            stem = _file_safe(detector)
            title = f"{detector} on {self.model}"
            paths[f"roc:{detector}"] = out / f"{stem}_roc.png"
            plot_roc_curves(self.id_scores(detector), ood, title, paths[f"roc:{detector}"], aurocs,
                            tpr=tpr, positive=positive)
            paths[f"histogram:{detector}"] = out / f"{stem}_histogram.png"
            plot_score_histograms(self.id_scores(detector), ood, title, paths[f"histogram:{detector}"])
        return paths

    def summary_grid(self, metric: str) -> tuple[list[str], torch.Tensor]:
        """``metric`` of every detector (rows) on every OOD set, their average and the groups (columns).

        Args:
            metric: a key of :data:`METRIC_TITLES`.

        Returns:
            The column names (the OOD sets; ``"average"`` when there are several;
            ``"<group>-OOD"`` per group of ``settings["ood_groups"]``) and a float64
            ``(detectors, columns)`` tensor of fractions, NaN where a value is missing.
        """
        groups = self.group_summary()
        sets = [*self.ood_sets, *([AVERAGE] if len(self.ood_sets) > 1 else [])]
        nan = float("nan")
        values = [[self.metrics[d].get(s, {}).get(metric, nan) for s in sets]
                  + [groups.get(d, {}).get(g, {}).get(metric, nan) for g in self.ood_groups]
                  for d in self.detectors]
        return [*sets, *(f"{g}-OOD" for g in self.ood_groups)], torch.tensor(values, dtype=torch.float64)

    def save_summary(self, path: str | os.PathLike) -> Path:
        """Heat maps of FPR@TPR and AUROC, detectors x OOD sets (:meth:`summary_grid`), in %.

        Needs no raw scores, so results loaded from JSON can draw it too.

        Args:
            path: the PNG to write.

        Returns:
            ``path``.
        """
        panels = []
        for metric in ("fpr_at_tpr", "auroc"):
            columns, values = self.summary_grid(metric)
            title = self._title(metric)
            name, better = title[:-2], "higher" if title.endswith("↑") else "lower"
            panels.append(HeatmapPanel(f"{title} (%)", 100 * values, f"{name} in % ({better} is better)",
                                       better == "higher"))
        reading = "ID positive" if self.settings.get("positive", "id") == "id" else "OOD positive"
        plot_summary(self.detectors, columns, panels, f"{self.model} on {self.benchmark} ({reading})", path,
                     separators=[len(self.ood_sets)] if len(columns) > len(self.ood_sets) else [])
        return Path(path)

    def markdown(self, command: str | None = None) -> str:
        """A self-contained markdown report: settings, the table, timings and plot links."""
        lines = [f"# {self.model} on {self.benchmark}", ""]
        if command:
            lines += ["Made by:", "", "```", command, "```", ""]
        reading = "in-distribution positive (the seeds')" if self.settings.get("positive", "id") == "id" \
            else "OOD positive (OpenOOD / pytorch-ood)"
        lines += [f"Metric reading: {reading}; values in %.", ""]
        sizes = self.settings.get("sizes")
        if sizes:
            lines += ["Images: " + ", ".join(f"{k} {v}" for k, v in sizes.items()), ""]
        lines += [self.table(), ""]
        if self.ood_groups:
            lines += ["## Near- and far-OOD (OpenOOD v1.5: mean of the per-set metrics)", "",
                      self.group_table(), ""]
        shifted = self.settings.get("full_spectrum_accuracy")
        if shifted:
            lines += ["## Full-spectrum: accuracy on covariate-shifted ID sets", "",
                      markdown_table(["set", "accuracy %"], [[k, f"{100 * v:.2f}"] for k, v in shifted.items()]), ""]
        for note in self.notes:
            lines += [note.rstrip(), ""]
        lines += ["## Time", "", self.timing_table(), ""]
        if self.scored is not None:
            lines += ["## Plots", "", "![summary](plots/summary.png)", ""]
            for detector in self.detectors:
                stem = _file_safe(detector)
                lines += [f"- {detector}: [ROC](plots/{stem}_roc.png), [histograms](plots/{stem}_histogram.png)"]
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvaluationResults:
        """Results from a ``results.json`` written by :meth:`save` (without raw scores)."""
        data = json.loads(Path(path).read_text())
        return cls(
            benchmark=data["benchmark"], model=data["model"], detectors=data["detectors"],
            ood_sets=data["ood_sets"], metrics=data["metrics"], accuracy=data["accuracy"],
            fit_seconds=data["fit_seconds"], score_seconds=data["score_seconds"],
            forward_seconds=data["forward_seconds"], settings=data["settings"],
            group_metrics=data.get("groups", {}), calibration_error=data.get("calibration_error"),
        )


def metrics_per_set(
    scores: dict[str, torch.Tensor], id_set: str, ood_sets: Sequence[str], *, tpr: float, positive: str,
) -> dict[str, dict[str, float]]:
    """All seven metrics of one detector for each OOD set against the ID set, and their average."""
    from ..metrics import Positive, ood_metrics

    per_set = {}
    id_scores = scores[id_set]
    for name in ood_sets:
        ood_scores = scores[name]
        is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))])
        # a str the callers take from users: ood_metrics checks it first (a ValueError naming the readings)
        values = ood_metrics(torch.cat([id_scores, ood_scores]), is_ood, tpr=tpr, positive=cast(Positive, positive))
        per_set[name] = {k: float(v) for k, v in values.items()}
    if len(ood_sets) > 1:
        keys = per_set[ood_sets[0]].keys()
        per_set[AVERAGE] = {k: sum(per_set[s][k] for s in ood_sets) / len(ood_sets) for k in keys}
    return per_set
