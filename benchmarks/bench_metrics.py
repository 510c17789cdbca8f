"""Speed of the seven OOD metrics on 10^7 scores: timm-ood vs pytorch-ood vs scikit-learn.

One run times, on the same seeded float32 scores (an overlapping two-Gaussian
mixture; float32 rounding ties about 10% of the values):

* timm-ood ``ood_metrics`` (functional, all seven from one sort);
* timm-ood ``OODMetrics`` (torchmetrics collection: ``update`` + ``compute``);
* pytorch-ood ``OODMetrics`` (``update`` + ``compute``: AUROC, AUTC, AUPR-IN,
  AUPR-OUT, FPR95TPR);
* scikit-learn: ``roc_auc_score`` + ``roc_curve`` + two
  ``precision_recall_curve`` + two ``auc``, enough for the seven metrics.

Methods run round-robin after one untimed warm-up each; the table reports the
median and the minimum over ``--repeats``. pytorch-ood uses the OOD-positive
reading, so all comparisons use ``positive="ood"``; AUROC and AUPR-In/Out do
not depend on the reading.

Usage::

    python benchmarks/bench_metrics.py [--n 10000000] [--repeats 3] [--seed 0]

pytorch-ood, if missing: ``pip install pytorch-ood --no-deps``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import sklearn
import torch
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from timm_ood.metrics import OODMetrics, ood_metrics

TPR = 0.95
AGREEMENT_TOLERANCE = 1e-9
OURS_FUNCTIONAL = "timm-ood `ood_metrics` (functional)"
OURS_CLASS = "timm-ood `OODMetrics` (update + compute)"
PYTORCH_OOD = "pytorch-ood `OODMetrics` (update + compute)"
SKLEARN = "scikit-learn curves"
# Our keys and pytorch-ood's for the metrics both compute.
PYTORCH_OOD_KEYS = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-IN",
    "aupr_out": "AUPR-OUT",
    "fpr_at_tpr": "FPR95TPR",
}


def make_scores(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scores of an overlapping mixture: ID ~ N(0, 1), OOD ~ N(1.5, 1), 40% OOD."""
    generator = torch.Generator().manual_seed(seed)
    is_ood = torch.rand(n, generator=generator) < 0.4
    scores = torch.randn(n, generator=generator).add_(1.5 * is_ood)
    return scores, is_ood


def timm_ood_functional(scores: torch.Tensor, is_ood: torch.Tensor) -> dict[str, float]:
    results = ood_metrics(scores, is_ood, tpr=TPR, positive="ood")
    return {key: float(value) for key, value in results.items()}


def timm_ood_class(scores: torch.Tensor, is_ood: torch.Tensor) -> dict[str, float]:
    metrics = OODMetrics(tpr=TPR, positive="ood")
    metrics.update(scores, is_ood)
    return {key: float(value) for key, value in metrics.compute().items()}


def pytorch_ood_class() -> Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None:
    """pytorch-ood's OODMetrics (OOD samples have negative labels), or None if missing."""
    try:
        from pytorch_ood.metrics import OODMetrics as PytorchOODMetrics
    except ImportError:
        try:  # older pytorch-ood releases
            from pytorch_ood.utils import OODMetrics as PytorchOODMetrics
        except ImportError:
            return None

    def run(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        metrics = PytorchOODMetrics()
        metrics.update(scores, labels)
        return dict(metrics.compute())

    return run


def sklearn_metrics(scores: np.ndarray, is_ood: np.ndarray) -> dict[str, float]:
    """The seven metrics (OOD positive) from scikit-learn's curves."""
    fpr, tpr, _ = roc_curve(is_ood, scores, drop_intermediate=False)
    at = np.searchsorted(tpr, TPR, side="left")
    precision_in, recall_in, _ = precision_recall_curve(1 - is_ood, -scores)
    precision_out, recall_out, _ = precision_recall_curve(is_ood, scores)
    return {
        "auroc": roc_auc_score(is_ood, scores),
        "fpr_at_tpr": fpr[at],
        "tnr_at_tpr": 1 - fpr[at],
        "detection_error": 0.5 * (1 - tpr[at]) + 0.5 * fpr[at],
        "detection_accuracy": np.max(0.5 * (tpr + 1 - fpr)),
        "aupr_in": auc(recall_in, precision_in),
        "aupr_out": auc(recall_out, precision_out),
    }


def time_round_robin(
    runs: dict[str, Callable[[], dict[str, float]]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds of each run per repeat (after one warm-up each), and each run's results."""
    results = {name: run() for name, run in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds, results


def max_difference(ours: dict[str, float], theirs: dict[str, float], keys: dict[str, str]) -> float:
    return max(abs(ours[our_key] - theirs[their_key]) for our_key, their_key in keys.items())


def print_header(args: argparse.Namespace, scores: torch.Tensor, is_ood: torch.Tensor) -> None:
    print(f"# OOD metrics speed: {args.n:,} scores\n")
    print(f"Command: `python {shlex.join(sys.argv)}`\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"scikit-learn {sklearn.__version__}; distinct scores: {scores.unique().numel():,}; "
        f"OOD fraction: {float(is_ood.double().mean()):.3f}; repeats: {args.repeats} "
        "(round-robin, after one warm-up each)\n"
    )


def print_timings(seconds: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"| method | median s | min s | {OURS_CLASS} / this |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in seconds.items():
        ratio = median[OURS_CLASS] / median[name]
        print(f"| {name} | {median[name]:.3f} | {min(values):.3f} | {ratio:.3f} |")
    print()
    if PYTORCH_OOD in median:
        for ours in (OURS_FUNCTIONAL, OURS_CLASS):
            ratio = median[ours] / median[PYTORCH_OOD]
            verdict = "meets" if ratio < 0.5 else "MISSES"
            print(f"- {ours} / pytorch-ood: **{ratio:.3f}** ({verdict} the < 0.5 target)")
    ratio = median[OURS_CLASS] / median[SKLEARN]
    print(f"- {OURS_CLASS} / scikit-learn: **{ratio:.3f}**\n")


def print_agreement(results: dict[str, dict[str, float]]) -> None:
    ours = results[OURS_FUNCTIONAL]
    same_keys = {key: key for key in ours}
    sklearn_gap = max_difference(ours, results[SKLEARN], same_keys)
    verdict = "equal" if sklearn_gap <= AGREEMENT_TOLERANCE else "DIFFERENT"
    print(
        f"- timm-ood vs scikit-learn, all seven (OOD positive): max |diff| = {sklearn_gap:.1e} "
        f"({verdict} to {AGREEMENT_TOLERANCE:g})"
    )
    class_gap = max_difference(results[OURS_CLASS], ours, same_keys)
    print(f"- timm-ood class vs functional: max |diff| = {class_gap:.1e}")
    if PYTORCH_OOD in results:
        gap = max_difference(ours, results[PYTORCH_OOD], PYTORCH_OOD_KEYS)
        names = ", ".join(PYTORCH_OOD_KEYS.values())
        print(f'- timm-ood (positive="ood") vs pytorch-ood on {names}: max |diff| = {gap:.1e}')
    print("\n| metric | timm-ood | scikit-learn |")
    print("| --- | ---: | ---: |")
    for key, value in ours.items():
        print(f"| {key} | {value:.12f} | {results[SKLEARN][key]:.12f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="number of scores")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scores")
    args = parser.parse_args()
    scores, is_ood = make_scores(args.n, args.seed)
    labels = torch.where(is_ood, -1, 0)  # pytorch-ood: negative labels are OOD
    scores_np, is_ood_np = scores.numpy(), is_ood.numpy().astype(np.int64)
    runs: dict[str, Callable[[], dict[str, float]]] = {
        OURS_FUNCTIONAL: lambda: timm_ood_functional(scores, is_ood),
        OURS_CLASS: lambda: timm_ood_class(scores, is_ood),
    }
    pytorch_ood = pytorch_ood_class()
    if pytorch_ood is not None:
        runs[PYTORCH_OOD] = lambda: pytorch_ood(scores, labels)
    runs[SKLEARN] = lambda: sklearn_metrics(scores_np, is_ood_np)

    seconds, results = time_round_robin(runs, args.repeats)
    print_header(args, scores, is_ood)
    print_timings(seconds)
    print_agreement(results)
    if pytorch_ood is None:
        print("\npytorch-ood is not installed: `pip install pytorch-ood --no-deps`.")


if __name__ == "__main__":
    main()
