"""torch.distributed end to end: two gloo ranks give one process's numbers, through the Python API and torchrun.

Every split is sharded by rank (uneven, and empty on a rank for a one-image
set), fit statistics are all-reduced, the KNN bank stays sharded, scores are
gathered for the metrics and only rank 0 writes reports and stores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from datasets import DatasetInfo

from timm_ood.data import make_loader
from timm_ood.data.images import images_to_dataset
from timm_ood.evaluation import evaluate_loaders
from timm_ood.store import FeatureStore

from ._distributed import GLOO_AVAILABLE, gloo_process_group, run_two_ranks

pytestmark = pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with gloo is not available")

OVERLAY = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "crop_pct": 1.0}
# multi-mahalanobis on the last stage only: this untrained model's earlier stages have singular
# covariances, whose pseudo-inverse turns the float rounding of a sum taken in another order into other
# weights (measured: precisions apart by 2e15); the all-reduced sums themselves agree to rounding
DETECTORS = ["msp", "energy", "mahalanobis", ("knn", {"k": 5}), ("nnguide", {"k": 3}), "vim", "gram",
             ("multi-mahalanobis", {"layers": [-1]}), "she", "react"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", in_chans=1, num_classes=10, pretrained_cfg_overlay=OVERLAY).eval()


def _dataset(count: int, seed: int, label: int | None = None):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10 if label is None else np.full(count, label)
    return images_to_dataset(pixels, labels, info=DatasetInfo(dataset_name=f"set-{seed}"))


def _listed(count: int, seed: int, batch_size: int = 7) -> list:
    """A plain list of batches (no fingerprint): split by striding over batches."""
    images = torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    labels = torch.full((count,), -1)
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, count, batch_size)]


def _evaluate(cache_dir: str | None) -> dict:
    model = _model()
    loader = lambda dataset: make_loader(dataset, model, batch_size=16)  # noqa: E731
    results = evaluate_loaders(
        model, DETECTORS, id_data=loader(_dataset(37, 1)),
        ood_data={"noise": loader(_dataset(45, 2, label=-1)), "one": loader(_dataset(1, 3, label=-1)),
                  "listed": _listed(33, 4)},
        fit_data=loader(_dataset(151, 0)),
        held_out_id_data=_listed(20, 5), held_out_ood_data=_listed(20, 6),
        progress=False, cache_dir=cache_dir,
    )
    return {"metrics": results.metrics, "accuracy": results.accuracy, "sizes": results.settings["sizes"],
            "scores": {d: {s: v.tolist() for s, v in sets.items()} for d, sets in results.scored.scores.items()}}


def _api_worker(rank: int, init_file: str, results_dir: str) -> None:
    with gloo_process_group(rank, init_file):
        first = _evaluate(str(Path(results_dir) / "store"))
        again = _evaluate(str(Path(results_dir) / "store"))  # served by the store the first run wrote
        (Path(results_dir) / f"rank{rank}.json").write_text(json.dumps({"first": first, "again": again}))


def _assert_same(distributed: dict, single: dict) -> None:
    assert distributed["sizes"] == single["sizes"]
    assert distributed["accuracy"] == pytest.approx(single["accuracy"], abs=1e-12)
    for detector, per_set in single["metrics"].items():
        for set_name, metrics in per_set.items():
            for metric, value in metrics.items():
                assert distributed["metrics"][detector][set_name][metric] == pytest.approx(value, rel=1e-12, abs=1e-12), \
                    f"{detector} {set_name} {metric}"


def test_evaluate_under_a_process_group_equals_one_process(tmp_path) -> None:
    run_two_ranks(_api_worker, tmp_path)
    single = _evaluate(None)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        _assert_same(result["first"], single)
        _assert_same(result["again"], single)
    assert ranks[0]["first"]["metrics"] == ranks[1]["first"]["metrics"]  # every rank holds the same results
    # the store holds every row of each fingerprinted set once (rank 0 renamed what both ranks wrote)
    rows = sorted(entry.rows for entry in FeatureStore(tmp_path / "store").entries())
    assert rows == [1, 37, 45, 151]


@pytest.mark.slow
def test_torchrun_eval_equals_one_process(tmp_path, data_fashion_mnist) -> None:
    from timm_ood.training import save_checkpoint

    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(_model(), checkpoint)
    arguments = ["eval", "--checkpoint", str(checkpoint), "--detectors", "msp,energy,mahalanobis,knn,vim",
                 "--max-images", "61", "--max-fit-images", "203", "--batch-size", "32", "--quiet", "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "timm_ood.cli", *arguments, "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert single.returncode == 0, single.stderr
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "timm_ood.cli",
         *arguments, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "store")],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("| **average** |") == single.stdout.count("| **average** |") > 0  # rank 0 reports
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("single", "two"))
    _assert_same({**two, "sizes": two["settings"]["sizes"]}, {**one, "sizes": one["settings"]["sizes"]})
    assert FeatureStore(tmp_path / "store").entries()
