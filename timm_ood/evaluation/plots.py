"""ROC curves and score histograms, where a person would rather look than read.

Drawn with matplotlib's non-interactive ``Agg`` backend straight to PNG files,
so they work on a machine without a screen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..metrics import binary_curve

__all__ = ["plot_roc_curves", "plot_score_histograms"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def roc_points(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fpr, tpr)`` of the seeds' reading (ID positive, accepted when score <= t), from (0, 0) to (1, 1)."""
    scores = torch.cat([id_scores, ood_scores])
    is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))])
    curve = binary_curve(scores, is_ood)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, curve.cum_ood / curve.num_ood]), torch.cat([zero, curve.cum_id / curve.num_id])


def plot_roc_curves(
    id_scores: torch.Tensor, ood_scores: Mapping[str, torch.Tensor], title: str, path: str | os.PathLike,
    aurocs: Mapping[str, float] | None = None,
) -> None:
    """One ROC curve per OOD set: in-distribution accepted (TPR) against OOD accepted (FPR)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, scores in ood_scores.items():
        fpr, tpr = roc_points(id_scores, scores)
        label = name if aurocs is None else f"{name} (AUROC {100 * aurocs[name]:.1f})"
        axis.plot(fpr.numpy(), tpr.numpy(), label=label, linewidth=1.5)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="FPR (OOD accepted)", ylabel="TPR (in-distribution accepted)",
             title=title)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_score_histograms(
    id_scores: torch.Tensor, ood_scores: Mapping[str, torch.Tensor], title: str, path: str | os.PathLike,
    bins: int = 60,
) -> None:
    """A histogram of in-distribution scores against each OOD set's, one panel per set."""
    plt = _pyplot()
    names = list(ood_scores)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        both = torch.cat([id_scores, ood_scores[name]]).double()
        finite = both[torch.isfinite(both)]
        low, high = (torch.quantile(finite, torch.tensor([0.005, 0.995], dtype=torch.float64)).tolist()
                     if len(finite) else (0.0, 1.0))
        if high <= low:
            low, high = low - 0.5, high + 0.5
        edges = torch.linspace(low, high, bins + 1).numpy()
        for scores, label, color in ((id_scores, "in-distribution", "tab:blue"), (ood_scores[name], name, "tab:red")):
            axis.hist(scores.double().clamp(low, high).numpy(), bins=edges, density=True, alpha=0.55,
                      label=label, color=color)
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.suptitle(f"{title}: OOD score (higher = more OOD)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
