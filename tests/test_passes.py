"""The driver: the only loop over data; sharding by rank; empty batches a rank without data feeds a fit."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetInfo

import timm_ood
from timm_ood import passes
from timm_ood.data import make_loader
from timm_ood.data.images import images_to_dataset
from timm_ood.detectors import create_detector, list_detectors
from timm_ood.errors import IncompatibleModelError
from timm_ood.fitting import fit_detectors
from timm_ood.tap import Need, Tap

from ._models import batches, digits_split, trained

PACKAGE = Path(timm_ood.__file__).parent


def _calls(path: Path, name: str) -> list[int]:
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == name]


def test_the_driver_is_the_only_loop_over_data() -> None:
    """Only passes.py iterates batches for fitting, held-out steps, scoring, calibration and tuning.

    Training (timm_ood/training/: the loop and the joint GAN training) is the other reader of batches: it
    trains, with backward and an optimizer.
    """
    readers = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if _calls(path, "iter_batches")}
    assert readers - {"passes.py", "batches.py"} <= {"training/loop.py", "training/gan.py"}, readers
    for path in (PACKAGE / "detectors").glob("*.py"):
        source = path.read_text()
        assert "OODModel" not in source and "from ..model import" not in source, f"{path.name} reaches the wrapper"
        assert not _calls(path, "run_pass") and "from ..passes" not in source, f"{path.name} runs passes itself"


def test_a_pass_feeds_every_batch_once_with_cpu_labels() -> None:
    model = trained("test_resnet")
    images, labels = digits_split()["test"]
    seen = []
    stats = passes.run_pass(Tap(model), batches(images[:50], labels[:50], 16), {Need.LOGITS},
                            lambda outputs, batch_labels: seen.append((len(outputs), batch_labels.device.type)),
                            progress=False)
    assert seen == [(16, "cpu"), (16, "cpu"), (16, "cpu"), (2, "cpu")]
    assert (stats.batches, stats.images, stats.total_images, stats.from_store) == (4, 50, 50, False)
    assert stats.forward_seconds > 0


def test_shard_strides_batches_and_splits_rows_without_padding(monkeypatch) -> None:
    data = [(torch.zeros(1, 1, 2, 2), torch.tensor([i])) for i in range(7)]
    taken = {}
    for rank in range(3):
        monkeypatch.setattr(passes, "world", lambda rank=rank: (rank, 3))
        part = passes.shard(data)
        taken[rank] = [int(batch[1]) for batch in part]
        assert len(part) == len(taken[rank])
    assert taken == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}
    pixels = np.zeros((5, 8, 8), dtype=np.uint8)
    dataset = images_to_dataset(pixels, np.arange(5), info=DatasetInfo(dataset_name="five"))
    loader = make_loader(dataset, trained("test_resnet"), batch_size=2)
    blocks = [loader.for_rank(rank, 7) for rank in range(7)]  # more ranks than rows: two get none
    assert [block.rows for block in blocks] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 5), (5, 5)]
    assert [sum(len(b[1]) for b in block) for block in blocks] == [1, 1, 1, 1, 1, 0, 0]
    assert all(block.fingerprint == loader.fingerprint for block in blocks)


def _fit_detectors(tap: Tap) -> list[str]:
    names = []
    for name in list_detectors():
        detector = create_detector(name)
        try:
            detector.check_model(tap)
        except IncompatibleModelError:
            continue
        if detector.requirements.fit:
            names.append(name)
    return names


def test_every_fit_accepts_the_empty_batch_of_a_rank_without_data() -> None:
    """Under torch.distributed a rank with no fit data feeds one empty batch (0 rows, the same trailing shapes),
    so that its statistics take part in the all-reduce: the fit must be the one of the real batches."""
    model = trained("test_resnet")
    tap = Tap(model)
    images, labels = digits_split()["train"]
    data = batches(images[:300], labels[:300], 100)
    names = _fit_detectors(tap)
    assert len(names) > 15
    for name in names:
        plain, padded = create_detector(name), create_detector(name)
        fit_detectors(tap, [plain], data, progress=False)
        needs = padded.requirements.outputs_for_fit
        with torch.inference_mode():
            empty, empty_labels = passes._empty_from_model(tap, frozenset(needs), images.shape[1:])
        padded.reset_fit(tap)
        padded.update_fit(empty, empty_labels)  # first, as on a rank whose shard is empty
        for step in range(padded.requirements.fit_passes):
            for batch_images, batch_labels in data:
                with torch.inference_mode():
                    padded.update_fit(tap(batch_images, needs), batch_labels)
            if step + 1 < padded.requirements.fit_passes:
                padded.next_fit_pass()
        padded.finish_fit()
        padded.is_fitted = True
        with torch.inference_mode():
            outputs = tap(images[:40], plain.requirements.outputs | padded.requirements.outputs)
            torch.testing.assert_close(padded(outputs), plain(outputs), rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("architecture", ["test_resnet", "test_vit"])
def test_empty_outputs_keep_the_trailing_shapes(architecture) -> None:
    model = trained(architecture)
    tap = Tap(model)
    needs = frozenset({Need.LOGITS, Need.PRE_LOGITS, Need.FEATURES, Need.INTERMEDIATES})
    images = digits_split()["test"][0][:3]
    with torch.inference_mode():
        real = tap(images, needs)
        empty, labels = passes._empty_from_model(tap, needs, images.shape[1:])
    assert len(empty) == 0 and labels.shape == (0,)
    assert empty.pre_logits.shape[1:] == real.pre_logits.shape[1:]
    assert [m.shape[1:] for m in empty.intermediates] == [m.shape[1:] for m in real.intermediates]
