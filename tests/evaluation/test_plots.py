"""Report plots read back through matplotlib's object model: labels, clipping notes, legends, heat map cells."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import timm_ood.evaluation.results as results_module
from timm_ood.evaluation import EvaluationResults
from timm_ood.evaluation.plots import (
    CLIPPED_GID,
    ROC_AXIS_LABELS,
    SCORE_AXIS_LABEL,
    HeatmapPanel,
    histogram_range,
    plot_roc_curves,
    plot_score_histograms,
    plot_summary,
    roc_points,
)
from timm_ood.evaluation.results import metrics_per_set
from timm_ood.metrics import auroc, fpr_at_tpr
from timm_ood.scoring import ScoredSets


def _scores(seed: int, n: int, shift: float) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _results(positive: str = "id", groups: bool = True) -> EvaluationResults:
    sets = {"near": 0.8, "far": 3.0, "noise": 6.0}
    scores = {d: {"id": _scores(i, 300, 0.0), **{s: _scores(10 * i + k, 200, shift * (i + 1) / 2)
                                                  for k, (s, shift) in enumerate(sets.items())}}
              for i, d in enumerate(["msp", "energy"])}
    settings = {"tpr": 0.95, "positive": positive,
                **({"ood_groups": {"near": ["near"], "far": ["far", "noise"]}} if groups else {})}
    return EvaluationResults(
        benchmark="toy", model="net", detectors=list(scores), ood_sets=list(sets),
        metrics={d: metrics_per_set(s, "id", list(sets), tpr=0.95, positive=positive) for d, s in scores.items()},
        accuracy=None, fit_seconds={}, score_seconds={}, forward_seconds=0.0, settings=settings,
        scored=ScoredSets(scores=scores),
    )


def _clip_notes(figure) -> list[str]:
    return [t.get_text() for axis in figure.axes for t in axis.texts if t.get_gid() == CLIPPED_GID]


def test_histograms_have_labels_and_say_how_many_scores_are_clipped(tmp_path) -> None:
    id_scores = torch.linspace(0, 1, 1000, dtype=torch.float64)
    outliers = torch.cat([torch.linspace(0.2, 1.2, 500, dtype=torch.float64),
                          torch.tensor([50.0, 80.0, float("inf"), -40.0])])
    figure = plot_score_histograms(id_scores, {"tame": id_scores + 0.1, "wild": outliers}, "energy on net",
                                   tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert "energy on net" in figure.get_suptitle()
    tame, wild = figure.axes[:2]
    for axis in (tame, wild):
        assert axis.get_xlabel() == SCORE_AXIS_LABEL and axis.get_ylabel() == "density"
    assert not [t for t in tame.texts if t.get_gid() == CLIPPED_GID]  # nothing clipped: nothing said
    low, high = wild.get_xlim()
    pooled = torch.cat([id_scores, outliers]).numpy()
    expected_ood = int((~((outliers.numpy() >= low) & (outliers.numpy() <= high))).sum())
    expected_id = int((~((id_scores.numpy() >= low) & (id_scores.numpy() <= high))).sum())
    assert (low, high) == histogram_range(pooled) and (expected_id, expected_ood) == (0, 4)  # only the outliers
    [note] = [t.get_text() for t in wild.texts if t.get_gid() == CLIPPED_GID]
    assert note == f"clipped: {expected_id} ID, {expected_ood} OOD scores outside [{low:.4g}, {high:.4g}]"
    # the clipped scores are left out of the bins, not piled into the edge bins
    ood_density = next(p for p in wild.patches if p.get_label().startswith("wild"))
    values = ood_density.get_data().values
    edges = ood_density.get_data().edges
    shown = (outliers.numpy() >= low) & (outliers.numpy() <= high)
    assert (values * np.diff(edges)).sum() == pytest.approx(shown.sum() / len(outliers))
    assert values[-1] * np.diff(edges)[-1] < 0.05


def test_a_tight_distribution_is_shown_whole_without_a_note(tmp_path) -> None:
    scores = _scores(0, 2000, 0.0)
    assert histogram_range(scores.numpy()) == (scores.min().item(), scores.max().item())
    figure = plot_score_histograms(scores, {"same": torch.full((10,), 0.5, dtype=torch.float64)}, "t",
                                   tmp_path / "h.png")
    assert _clip_notes(figure) == []


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_roc_curves_are_labelled_in_the_reading_with_the_tpr_line_and_a_log_corner(tmp_path, positive) -> None:
    id_scores, ood_scores = _scores(0, 400, 0.0), {"near": _scores(1, 300, 1.0), "far": _scores(2, 250, 4.0)}
    figure = plot_roc_curves(id_scores, ood_scores, "energy on net", tmp_path / "roc.png", tpr=0.9,
                             positive=positive)
    assert (tmp_path / "roc.png").stat().st_size > 1000
    full, corner = figure.axes
    xlabel, ylabel = ROC_AXIS_LABELS[positive]
    assert xlabel.startswith("false positive rate") and ylabel.startswith("true positive rate")
    assert full.get_xlabel() == xlabel and full.get_ylabel() == ylabel
    assert corner.get_xscale() == "log" and corner.get_xlabel().startswith(xlabel) and corner.get_ylabel() == ylabel
    legend = [t.get_text() for t in full.get_legend().get_texts()]
    assert "TPR = 90%" in legend
    [tpr_line] = [line for line in full.get_lines() if line.get_label() == "TPR = 90%"]
    assert set(tpr_line.get_ydata()) == {0.9}
    for name, scores in ood_scores.items():
        is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(scores))])
        both = torch.cat([id_scores, scores])
        auc = 100 * float(auroc(both, is_ood))
        fpr = 100 * float(fpr_at_tpr(both, is_ood, tpr=0.9, positive=positive))
        assert f"{name}: AUROC {auc:.1f}, FPR@90TPR {fpr:.1f}" in legend


def test_roc_points_of_both_readings_reach_the_metrics_operating_point() -> None:
    id_scores, ood_scores = _scores(0, 97, 0.0).round(decimals=1), _scores(1, 61, 1.0).round(decimals=1)
    is_ood = torch.cat([torch.zeros(97), torch.ones(61)])
    for positive in ("id", "ood"):
        fpr, tpr = roc_points(id_scores, ood_scores, positive)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert bool((fpr.diff() >= 0).all() and (tpr.diff() >= 0).all())
        j = int(torch.searchsorted(tpr, torch.tensor([0.95], dtype=torch.float64))[0])
        expected = fpr_at_tpr(torch.cat([id_scores, ood_scores]), is_ood, tpr=0.95, positive=positive)
        assert float(fpr[j]) == pytest.approx(float(expected), abs=1e-12)


def test_summary_heat_map_has_one_cell_per_detector_and_column_with_its_number(tmp_path) -> None:
    rows, columns = ["a", "b", "c"], ["x", "y"]
    values = np.array([[1.0, 2.25], [np.nan, 40.0], [99.9, 0.04]])
    figure = plot_summary(rows, columns, [HeatmapPanel("FPR (%)", values, "FPR in % (lower is better)", False)],
                          "toy", tmp_path / "s.png")
    heat = figure.axes[0]
    assert heat.images[0].get_array().shape == (3, 2)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in heat.texts}
    assert cells == {(0, 0): "1.0", (0, 1): "2.2", (1, 0): "–", (1, 1): "40.0", (2, 0): "99.9", (2, 1): "0.0"}
    assert [t.get_text() for t in heat.get_yticklabels()] == rows
    assert [t.get_text() for t in heat.get_xticklabels()] == columns
    assert heat.get_xlabel() == "OOD set" and heat.get_ylabel() == "detector"
    assert figure.axes[1].get_ylabel() == "FPR in % (lower is better)"  # the colour bar
    with pytest.raises(ValueError, match=r"shape \(3, 2\), not \(2, 2\)"):
        plot_summary(rows[:2], columns, [HeatmapPanel("t", values, "l", True)], "toy", tmp_path / "bad.png")


def test_summary_figure_grows_for_thirty_detectors_and_ten_sets(tmp_path) -> None:
    rows, columns = [f"detector_{i}" for i in range(30)], [f"ood_set_{j}" for j in range(10)] + ["average"]
    values = np.random.default_rng(0).uniform(0, 100, (30, 11))
    figure = plot_summary(rows, columns, [HeatmapPanel("FPR", values, "l", False),
                                          HeatmapPanel("AUROC", values, "l", True)], "big", tmp_path / "s.png",
                          separators=[10])
    width, height = figure.get_size_inches()
    assert width >= 0.5 * 2 * 11 and height >= 0.25 * 30
    assert len(figure.axes[0].texts) == 30 * 11


def test_saved_report_has_the_summary_heat_map_and_links_it(tmp_path) -> None:
    results = _results("ood")  # the ID reading's report is drawn in test_evaluate
    paths = results.save(tmp_path / "report")
    for key in ("summary", "roc:msp", "histogram:energy"):
        assert paths[key].is_file() and paths[key].stat().st_size > 1000
    assert "![summary](plots/summary.png)" in paths["markdown"].read_text()
    columns, grid = results.summary_grid("fpr_at_tpr")
    assert columns == ["near", "far", "noise", "average", "near-OOD", "far-OOD"]
    assert grid.shape == (2, 6)
    assert float(grid[1, 0]) == results.metrics["energy"]["near"]["fpr_at_tpr"]
    far = results.group_summary()["msp"]["far"]["fpr_at_tpr"]
    assert float(grid[0, 5]) == pytest.approx(far)
    loaded = EvaluationResults.load(paths["json"])  # no raw scores: the heat map needs none
    assert loaded.summary_grid("fpr_at_tpr")[0] == columns
    torch.testing.assert_close(loaded.summary_grid("fpr_at_tpr")[1], grid)
    assert loaded.save_summary(tmp_path / "loaded.png").stat().st_size > 1000


def test_summary_plot_cells_are_the_reports_numbers(tmp_path, monkeypatch) -> None:
    results = _results(groups=False)
    figures = []

    def spy(*args, **kwargs):
        figures.append(plot_summary(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(results_module, "plot_summary", spy)
    assert results.save_summary(tmp_path / "summary.png").is_file()
    fpr_axis, auroc_axis = figures[0].axes[:2]
    assert fpr_axis.get_title() == "FPR@95TPR ↓ (%)" and auroc_axis.get_title() == "AUROC ↑ (%)"
    assert [t.get_text() for t in fpr_axis.get_xticklabels()] == ["near", "far", "noise", "average"]
    for axis, metric in ((fpr_axis, "fpr_at_tpr"), (auroc_axis, "auroc")):
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in axis.texts}
        expected = {(i, j): f"{100 * results.metrics[d][s][metric]:.1f}"
                    for i, d in enumerate(results.detectors) for j, s in enumerate(["near", "far", "noise", "average"])}
        assert cells == expected
