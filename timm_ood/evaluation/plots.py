"""ROC curves, score histograms and a summary heat map, where a person would rather look than read.

Figures are built on :class:`matplotlib.figure.Figure` with the ``Agg`` canvas
(never through ``pyplot``), so they work on a machine without a screen and
leave the caller's pyplot state alone; matplotlib is imported on the first
figure. Each ``plot_*`` function writes a PNG
and returns its figure, whose artists tests read back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch

from ..metrics import binary_curve

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the package
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "CLIPPED_GID",
    "ROC_AXIS_LABELS",
    "SCORE_AXIS_LABEL",
    "HeatmapPanel",
    "histogram_range",
    "plot_roc_curves",
    "plot_score_histograms",
    "plot_summary",
    "roc_points",
]

#: x label of the score histograms
SCORE_AXIS_LABEL = "OOD score (higher = more out-of-distribution)"
#: (x, y) labels of the ROC plot in each metric reading (see :mod:`timm_ood.metrics.functional`)
ROC_AXIS_LABELS: dict[str, tuple[str, str]] = {
    "id": ("false positive rate (OOD accepted as ID)", "true positive rate (ID accepted)"),
    "ood": ("false positive rate (ID flagged as OOD)", "true positive rate (OOD flagged)"),
}
#: ``gid`` of the text that says how many scores a histogram leaves out
CLIPPED_GID = "clipped"

#: histogram range: the scores within this fraction of the 0.5-99.5% quantile range beyond
#: those quantiles (so a Gaussian's tails are shown whole; far outliers and infinities are not)
_QUANTILES = (0.005, 0.995)
_TAIL = 0.5
_ID_COLOR, _OOD_COLOR = "tab:blue", "tab:red"


def _figure(width: float, height: float, **kwargs: Any) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _as_numpy(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    return np.asarray(scores, dtype=np.float64).ravel()


# ---------------------------------------------------------------------------
# ROC curves


def roc_points(
    id_scores: torch.Tensor, ood_scores: torch.Tensor, positive: Literal["id", "ood"] = "id",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ROC curve of one OOD set in a metric reading, from (0, 0) to (1, 1).

    Args:
        id_scores: in-distribution scores, higher = more OOD.
        ood_scores: OOD scores.
        positive: ``"id"`` (the seeds': ID accepted when ``score <= t``) or ``"ood"``
            (OpenOOD's: OOD flagged when ``score >= t``).

    Returns:
        ``(fpr, tpr)``, float64, one point per distinct score plus the origin, both
        non-decreasing; the first point with ``tpr >= x`` is the operating point of
        FPR@TPR at ``x`` in that reading.

    Raises:
        ValueError: an unknown reading, a NaN score or an empty set.
    """
    if positive not in ROC_AXIS_LABELS:
        raise ValueError(f"positive must be 'id' or 'ood', not {positive!r}")
    scores = torch.cat([id_scores.double().flatten(), ood_scores.double().flatten()])
    is_ood = torch.cat([torch.zeros(id_scores.numel()), torch.ones(ood_scores.numel())])
    curve = binary_curve(scores, is_ood)
    zero = torch.zeros(1, dtype=torch.float64)
    if positive == "id":
        return torch.cat([zero, curve.cum_ood / curve.num_ood]), torch.cat([zero, curve.cum_id / curve.num_id])
    # flagged = {score >= thresholds[j]}: everything but the samples strictly below, largest threshold first
    below_id, below_ood = torch.cat([zero, curve.cum_id]), torch.cat([zero, curve.cum_ood])
    return ((curve.num_id - below_id) / curve.num_id).flip(0), ((curve.num_ood - below_ood) / curve.num_ood).flip(0)


def _operating_point(fpr: torch.Tensor, tpr: torch.Tensor, target: float) -> tuple[float, float]:
    """``(fpr, tpr)`` at the first point whose TPR reaches ``target`` (the FPR@TPR threshold)."""
    j = int(torch.searchsorted(tpr, torch.tensor([target], dtype=tpr.dtype))[0])
    return float(fpr[j]), float(tpr[j])


def _roc_axes(axis: Axes, positive: str, tpr: float, *, log: bool, floor: float) -> None:
    xlabel, ylabel = ROC_AXIS_LABELS[positive]
    axis.axhline(tpr, color="0.35", linestyle="--", linewidth=0.9,
                 label=f"TPR = {100 * tpr:g}%" if not log else "_nolegend_")
    axis.set_ylabel(ylabel)
    axis.grid(True, which="major", color="0.9", linewidth=0.6)
    if log:
        axis.set_xscale("log")
        axis.set(xlim=(floor, 1.0), ylim=(max(0.0, tpr - 0.3), 1.005),
                 xlabel=f"{xlabel}, log scale", title="low-FPR corner (FPR 0 drawn at the left edge)")
    else:
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
        axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, title="full curve")
    axis.title.set_fontsize(9)


def plot_roc_curves(
    id_scores: torch.Tensor,
    ood_scores: Mapping[str, torch.Tensor],
    title: str,
    path: str | os.PathLike,
    aurocs: Mapping[str, float] | None = None,
    *,
    tpr: float = 0.95,
    positive: Literal["id", "ood"] = "id",
) -> Figure:
    """One ROC curve per OOD set, drawn twice: whole, and the low-FPR corner on a log FPR axis.

    The dashed line is the TPR of FPR@TPR; a dot marks each curve's operating
    point there. The legend gives each set's AUROC and FPR@TPR in percent.

    Args:
        id_scores: in-distribution scores, higher = more OOD.
        ood_scores: scores per OOD set.
        title: the figure's title (detector and model).
        path: the PNG to write.
        aurocs: AUROC per set, fractions; computed from the curves when omitted.
        tpr: the TPR of the operating point, in (0, 1].
        positive: the metric reading, ``"id"`` or ``"ood"`` (see :func:`roc_points`).

    Returns:
        The figure (already written).
    """
    curves = {name: roc_points(id_scores, scores, positive) for name, scores in ood_scores.items()}
    # the smallest non-zero FPR is 1 / (negatives); zero is drawn half a step below it
    negatives = max((len(id_scores) if positive == "ood" else len(s) for s in ood_scores.values()), default=1)
    floor = 0.5 / max(negatives, 1)
    figure = _figure(10.5, 4.9, layout="constrained")
    full, corner = figure.subplots(1, 2)
    _roc_axes(full, positive, tpr, log=False, floor=floor)
    _roc_axes(corner, positive, tpr, log=True, floor=floor)
    for name, (fpr, rate) in curves.items():
        auroc = float(torch.trapezoid(rate, fpr)) if aurocs is None else aurocs[name]
        point = _operating_point(fpr, rate, tpr)
        label = f"{name}: AUROC {100 * auroc:.1f}, FPR@{100 * tpr:g}TPR {100 * point[0]:.1f}"
        (line,) = full.plot(fpr.numpy(), rate.numpy(), linewidth=1.5, label=label)
        corner.plot(np.maximum(fpr.numpy(), floor), rate.numpy(), linewidth=1.5, color=line.get_color())
        for axis, x in ((full, point[0]), (corner, max(point[0], floor))):
            axis.plot([x], [point[1]], marker="o", markersize=4, color=line.get_color(), linestyle="none",
                      clip_on=False)
    full.legend(loc="lower right", fontsize=7, title="OOD set (values in %)", title_fontsize=7)
    figure.suptitle(f"{title}: ROC", fontsize=10)
    figure.savefig(path, dpi=110)
    return figure


# ---------------------------------------------------------------------------
# Score histograms


def histogram_range(scores: np.ndarray) -> tuple[float, float]:
    """The score range a histogram shows: that of the scores lying within half the 0.5-99.5%
    quantile range beyond those quantiles; outliers further out (and infinities) are left out.

    Args:
        scores: the pooled scores of the panel (ID and OOD), any finite or infinite values.

    Returns:
        ``(low, high)`` with ``low < high``; ``(0, 1)`` without a finite score.
    """
    finite = scores[np.isfinite(scores)]
    if not finite.size:
        return 0.0, 1.0
    q_low, q_high = np.quantile(finite, _QUANTILES)
    margin = _TAIL * (q_high - q_low)
    low = float(finite[finite >= q_low - margin].min())
    high = float(finite[finite <= q_high + margin].max())
    return (low - 0.5, high + 0.5) if high <= low else (low, high)


def _density(scores: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int]:
    """Density over ``edges`` normalised by all scores (so it integrates to the shown fraction),
    and the number of scores outside the edges (infinite ones included)."""
    shown = (scores >= edges[0]) & (scores <= edges[-1])
    counts, _ = np.histogram(scores[shown], bins=edges)
    return counts / (max(scores.size, 1) * np.diff(edges)), int(scores.size - shown.sum())


def plot_score_histograms(
    id_scores: torch.Tensor, ood_scores: Mapping[str, torch.Tensor], title: str, path: str | os.PathLike,
    bins: int = 60,
) -> Figure:
    """A histogram of in-distribution scores against each OOD set's, one panel per set.

    Densities are step outlines over a light fill, normalised by all of a set's
    scores. Scores outside the range of :func:`histogram_range` are left out of
    the bins (not piled into the edge bins), and a text box says how many ID and
    OOD scores were left out; no box when all are shown.

    Args:
        id_scores: in-distribution scores, higher = more OOD.
        ood_scores: scores per OOD set.
        title: the figure's title (detector and model).
        path: the PNG to write.
        bins: bins per panel.

    Returns:
        The figure (already written).
    """
    names = list(ood_scores)
    columns = max(1, min(4, len(names)))
    rows = max(1, -(-len(names) // columns))
    figure = _figure(3.8 * columns, 2.9 * rows + 0.4, layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    in_distribution = _as_numpy(id_scores)
    for axis, name in zip(axes, names, strict=False):
        ood = _as_numpy(ood_scores[name])
        low, high = histogram_range(np.concatenate([in_distribution, ood]))
        edges = np.linspace(low, high, bins + 1)
        left_out, tallest = [], 0.0
        for scores, label, color in ((in_distribution, "in-distribution", _ID_COLOR), (ood, name, _OOD_COLOR)):
            density, outside = _density(scores, edges)
            left_out.append(outside)
            tallest = max(tallest, float(density.max(initial=0.0)))
            axis.stairs(density, edges, fill=True, alpha=0.25, color=color, linewidth=0)
            axis.stairs(density, edges, color=color, linewidth=1.3, label=f"{label} (n={scores.size})")
        # headroom above the bars for the legend and, below it, the clipping note
        axis.set_ylim(0.0, 1.6 * tallest if tallest > 0 else 1.0)
        if any(left_out):
            text = axis.text(0.98, 0.8, f"clipped: {left_out[0]} ID, {left_out[1]} OOD scores outside "
                             f"[{low:.4g}, {high:.4g}]", transform=axis.transAxes, va="top", ha="right",
                             fontsize=6.5, bbox={"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "0.6"})
            text.set_gid(CLIPPED_GID)
        axis.set_xlim(low, high)
        axis.set_xlabel(SCORE_AXIS_LABEL, fontsize=7.5)
        axis.set_ylabel("density", fontsize=7.5)
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=6.5, loc="upper right")
    for axis in axes[len(names):]:
        axis.axis("off")
    figure.suptitle(f"{title}: score histograms", fontsize=10)
    figure.savefig(path, dpi=100)
    return figure


# ---------------------------------------------------------------------------
# Summary heat map


class HeatmapPanel(NamedTuple):
    """One metric of the summary heat map.

    Attributes:
        title: the panel's title (the metric).
        values: ``(detectors, columns)`` in the unit shown in the cells (percent); NaN = missing.
        label: the colour bar's label.
        higher_is_better: colours run from bad (dark) to good (bright) either way.
    """

    title: str
    values: np.ndarray | torch.Tensor
    label: str
    higher_is_better: bool


def _heatmap(axis: Axes, panel: HeatmapPanel, rows: Sequence[str], columns: Sequence[str],
             separators: Sequence[int], digits: int) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    values = _as_numpy(panel.values).reshape(len(rows), len(columns))
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    norm = Normalize(low - 1, high + 1) if high <= low else Normalize(low, high)
    cmap = colormaps["viridis" if panel.higher_is_better else "viridis_r"].with_extremes(bad="0.85")
    image = axis.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    rgb = cmap(norm(np.nan_to_num(values, nan=low)))[..., :3]
    dark = (rgb @ np.array([0.2126, 0.7152, 0.0722]) < 0.5) & np.isfinite(values)
    for (i, j), value in np.ndenumerate(values):
        axis.text(j, i, "–" if np.isnan(value) else f"{value:.{digits}f}", ha="center", va="center",
                  fontsize=7, color="white" if dark[i, j] else "black")
    axis.set_xticks(np.arange(len(columns)), labels=list(columns), rotation=40, ha="right",
                    rotation_mode="anchor", fontsize=8)
    axis.set_yticks(np.arange(len(rows)), labels=list(rows), fontsize=8)
    axis.set_xticks(np.arange(len(columns) + 1) - 0.5, minor=True)
    axis.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
    axis.grid(which="minor", color="white", linewidth=0.8)
    axis.tick_params(which="minor", length=0)
    for column in separators:
        axis.axvline(column - 0.5, color="white", linewidth=3)
    axis.set(xlabel="OOD set", ylabel="detector")
    axis.set_title(panel.title, fontsize=10)
    axis.figure.colorbar(image, ax=axis, label=panel.label, fraction=0.05, pad=0.02)


def plot_summary(
    rows: Sequence[str],
    columns: Sequence[str],
    panels: Sequence[HeatmapPanel],
    title: str,
    path: str | os.PathLike,
    *,
    separators: Sequence[int] = (),
    digits: int = 1,
) -> Figure:
    """Heat maps of detectors (rows) x OOD sets (columns), one panel per metric, numbers in the cells.

    The figure grows with the table, so 30 detectors x 13 columns stay readable.

    Args:
        rows: detector labels.
        columns: OOD sets, then summary columns (average, groups).
        panels: the metrics to draw side by side.
        title: the figure's title.
        path: the PNG to write.
        separators: column indices before which a thick divider is drawn
            (e.g. where the summary columns start).
        digits: decimals written in the cells.

    Returns:
        The figure (already written).

    Raises:
        ValueError: no rows, columns or panels, or a panel of the wrong shape.
    """
    if not rows or not columns or not panels:
        raise ValueError("a summary needs at least one detector, one column and one panel")
    for panel in panels:
        if tuple(np.shape(panel.values)) != (len(rows), len(columns)):
            raise ValueError(f"panel {panel.title!r} has shape {tuple(np.shape(panel.values))}, "
                             f"not ({len(rows)}, {len(columns)})")
    row_label = 0.075 * max(map(len, rows)) + 1.0
    column_label = 0.06 * max(map(len, columns)) + 1.4
    width = len(panels) * (row_label + 0.62 * len(columns) + 1.4)
    height = 0.3 * len(rows) + column_label + 0.6
    figure = _figure(max(width, 6.0), max(height, 3.0), layout="constrained")
    for axis, panel in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels, strict=True):
        _heatmap(axis, panel, rows, columns, separators, digits)
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=100)
    return figure
