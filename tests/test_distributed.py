"""``timm_ood.distributed`` under torch.distributed: the gathered statistics equal one process's on the union.

Two gloo ranks (``tests/_distributed.py``) fit detectors on the hand-made
feature model (``tests/detectors/_feature_model.py``), each on every other batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import timm_ood
from timm_ood.distributed import all_gather_rows as gather_rows
from timm_ood.distributed import all_gather_stacked as gather_stacked

from ._distributed import GLOO_AVAILABLE, gloo_process_group, run_two_ranks
from ._models import batches
from .detectors._feature_model import FeatureModel, fit, hand_made_data

DISTRIBUTED = ("knn", "gram", "openmax", "vim")


def distributed_worker(rank: int, init_file: str, results_dir: str) -> None:
    with gloo_process_group(rank, init_file):
        assert gather_stacked(torch.tensor([rank, 10 + rank])).tolist() == [[0, 10], [1, 11]]
        assert gather_rows(torch.full((rank + 1, 2), rank)).tolist() == [[0, 0], [1, 1], [1, 1]]
        maps, labels = hand_made_data()
        states = {}
        for name in DISTRIBUTED:  # the driver gives each rank every other batch: unequal shards
            ood = timm_ood.wrap(FeatureModel(), name).fit(batches(maps, labels, 6), progress=False)
            states[name] = ood.detector.fitted_state()
        torch.save(states, Path(results_dir) / f"rank{rank}.pt")


@pytest.mark.skipif(not GLOO_AVAILABLE, reason="gloo backend unavailable")
def test_distributed_fits_equal_one_process_on_the_union(tmp_path: Path) -> None:
    run_two_ranks(distributed_worker, tmp_path)
    for name in DISTRIBUTED:
        expected = fit(name, batch_size=6).detector.fitted_state()
        for rank in range(2):
            state = torch.load(tmp_path / f"rank{rank}.pt")[name]
            assert set(state) == set(expected), name
            if name == "knn":  # the bank gathered in rank order holds the rows in another order
                state["bank"], expected["bank"] = torch.unique(state["bank"], dim=0), torch.unique(expected["bank"], dim=0)
            if name == "vim":  # eigenvectors are defined up to sign: compare the projector
                state["residual_basis"] = state["residual_basis"] @ state["residual_basis"].T
                expected["residual_basis"] = expected["residual_basis"] @ expected["residual_basis"].T
            for key, tensor in expected.items():
                torch.testing.assert_close(state[key], tensor, rtol=1e-9, atol=1e-12, msg=f"{name}.{key}")
