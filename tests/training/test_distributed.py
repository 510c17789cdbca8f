"""training.fit under torch.distributed: two gloo ranks train one model, each on its part of every global batch.

Rank 1 runs in a spawned process (``tests/_distributed.py``); every run of a
rank is recorded (the images each forward saw, the losses, the final state) and
compared here with the other rank and with one process of twice the batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetInfo
from sklearn.datasets import load_digits
from timm.layers import GroupNorm1
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from timm_ood import training
from timm_ood.data.images import images_to_dataset

from .._distributed import GLOO_AVAILABLE, gloo_process_group, run_two_ranks
from .._models import batches, create, digits_split, noise_images

pytestmark = pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with gloo is not available")

ROWS, BATCH, EPOCHS = 200, 16, 2  # 6 global batches of 32 per epoch, 8 rows dropped
# AdamW at 1e-3 on these models turns the rounding of one step into ~1e-5 of the final weights; Nesterov SGD at
# 0.1 amplifies it to ~1e-2 (measured by perturbing the initial weights by 1e-7)
OPTIMIZER = {"optimizer": "adamw", "lr": 1e-3}


def _dataset():
    """The first ROWS sklearn digits as a Hugging Face Dataset (8x8 uint8 images, resized by the model transform)."""
    bunch = load_digits()
    pixels = np.minimum(bunch.images[:ROWS] * 16, 255).astype(np.uint8)
    return images_to_dataset(pixels, bunch.target[:ROWS], info=DatasetInfo(dataset_name="digits"))


def _model(norm: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # GroupNorm1 normalises each image on its own: the ranks' batches give one process's gradients
    return create("test_resnet", **({"norm_layer": GroupNorm1} if norm == "group" else {}))


def _fit(model: torch.nn.Module, train_data, **kwargs) -> dict:
    """Train on ``train_data``, recording the input of every training forward."""
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()) if module.training else None)
    history = training.fit(model, train_data, epochs=kwargs.pop("epochs", EPOCHS), progress=False, **OPTIMIZER,
                           **kwargs)
    return {"inputs": inputs, "losses": [e.loss for e in history.epochs], "accuracy": history.final_accuracy,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _evaluation() -> list:
    """Three batches of test digits (two on rank 0, one on rank 1)."""
    images, labels = digits_split()["test"]
    return batches(images[:60], labels[:60], 20)


def _sampled() -> DataLoader:
    """96 digits through a DistributedSampler: 3 shuffled batches of 16 per rank, reshuffled each epoch."""
    images, labels = digits_split()["train"]
    data = TensorDataset(images[:96], labels[:96])
    return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=True, seed=0))


def _listed() -> tuple[list, list]:
    """Five ID batches of 20 digits (strided: 3 on rank 0, 2 on rank 1) and three outlier batches of 10."""
    images, labels = digits_split()["train"]
    outliers = [(noise_images(10, seed=i), torch.full((10,), -1)) for i in range(3)]
    return batches(images[:100], labels[:100], 20), outliers


def _worker(rank: int, init_file: str, results_dir: str) -> None:
    with gloo_process_group(rank, init_file):
        results = {"batch": _fit(_model("batch"), _dataset(), batch_size=BATCH, eval_data=_evaluation()),
                   "group": _fit(_model("group"), _dataset(), batch_size=BATCH),
                   "sampled": _fit(_model("batch"), _sampled())}
        train, outliers = _listed()
        # each rank starts from other weights: fit starts every rank from rank 0's
        results["listed"] = _fit(_model("batch", seed=rank), train, outliers=outliers,
                                 loss=training.OutlierExposureLoss(), epochs=1)
        # the joint GAN: fit's loop with G and D trained by the objective, their gradients averaged too
        model = _model("batch", seed=rank)
        run = training.fit_joint_confidence(model, _dataset(), epochs=1, batch_size=BATCH, latent_dim=8,
                                            gan_width=4, generator_loss="non-saturating", progress=False)
        results["joint"] = {"history": [{**vars(e), "seconds": 0} for e in run.history.epochs],
                            "states": [{k: v.clone() for k, v in m.state_dict().items()}
                                       for m in (model, run.generator, run.discriminator)]}
        images, labels = digits_split()["train"]
        unseeded = DataLoader(TensorDataset(images[:64], labels[:64]), batch_size=16, shuffle=True)
        try:
            training.fit(_model("batch"), unseeded, progress=False)
        except ValueError as error:
            results["refused"] = str(error)
        torch.save(results, Path(results_dir) / f"rank{rank}.pt")


def _keys(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of two gloo ranks recorded."""
    path = tmp_path_factory.mktemp("two_ranks")
    run_two_ranks(_worker, path)
    return [torch.load(path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def single() -> dict:
    """One process, batches of 2 x BATCH, on the batch-independent model."""
    return _fit(_model("group"), _dataset(), batch_size=2 * BATCH)


@pytest.mark.parametrize("run", ["batch", "group", "listed", "sampled"])
def test_replicas_end_identical(ranks: list[dict], run: str) -> None:
    first, second = (r[run] for r in ranks)
    assert first["state"].keys() == second["state"].keys()
    for name, tensor in first["state"].items():  # BatchNorm's running statistics included
        assert torch.equal(tensor, second["state"][name]), name
    assert first["losses"] == second["losses"]  # the loss over both ranks' images


def test_joint_gan_replicas_end_identical(ranks: list[dict]) -> None:
    first, second = (r["joint"] for r in ranks)
    assert first["history"] == second["history"]  # the classifier's loss and the GAN's objectives, over both ranks
    for module, other in zip(first["states"], second["states"], strict=True):  # classifier, G, D
        for name, tensor in module.items():
            assert torch.equal(tensor, other[name]), name


@pytest.mark.parametrize("run", ["batch", "group"])
def test_each_rank_reads_its_part_of_every_global_batch(ranks: list[dict], single: dict, run: str) -> None:
    steps = ROWS // (2 * BATCH)
    inputs = [r[run]["inputs"] for r in ranks]
    assert [len(x) for rank in inputs for x in rank] == [BATCH] * 2 * EPOCHS * steps
    epochs = []
    for epoch in range(EPOCHS):
        part = slice(epoch * steps, (epoch + 1) * steps)
        seen = [set(_keys(torch.cat(rank[part]))) for rank in inputs]
        assert len(seen[0]) == len(seen[1]) == steps * BATCH and not seen[0] & seen[1]
        epochs.append(seen[0] | seen[1])
        # step by step, rank 0's then rank 1's batch is the batch of one process of twice the batch size
        for step in range(epoch * steps, (epoch + 1) * steps):
            assert _keys(torch.cat([inputs[0][step], inputs[1][step]])) == _keys(single["inputs"][step])
    assert epochs[0] != epochs[1]  # reshuffled each epoch (the last, incomplete global batch differs)


def test_without_batchnorm_two_ranks_equal_one_process_of_twice_the_batch(ranks: list[dict], single: dict) -> None:
    group = ranks[0]["group"]
    assert group["losses"] == pytest.approx(single["losses"], rel=1e-6)
    for name, tensor in single["state"].items():
        torch.testing.assert_close(group["state"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_eval_accuracy_is_over_the_whole_eval_data(ranks: list[dict]) -> None:
    model = _model("batch")
    model.load_state_dict(ranks[0]["batch"]["state"])
    expected = training.accuracy(model, _evaluation())
    assert ranks[0]["batch"]["accuracy"] == ranks[1]["batch"]["accuracy"] == expected


def test_a_distributed_sampler_is_kept_and_reshuffled_each_epoch(ranks: list[dict]) -> None:
    inputs = [r["sampled"]["inputs"] for r in ranks]
    assert [len(rank) for rank in inputs] == [3 * EPOCHS] * 2
    orders = []
    for epoch in range(EPOCHS):
        seen = [_keys(torch.cat(rank[3 * epoch:3 * (epoch + 1)])) for rank in inputs]
        assert len(set(seen[0]) | set(seen[1])) == 96
        orders.append(seen[0])
    assert orders[0] != orders[1]


def test_batches_and_outliers_are_strided_with_equal_steps(ranks: list[dict]) -> None:
    train, outliers = _listed()
    train, outliers = [images for images, _ in train], [images for images, _ in outliers]
    # rank 0 holds ID batches 0, 2, 4 and rank 1 batches 1, 3: both take 2 steps (batch 4 is dropped);
    # outlier batches 0, 2 on rank 0 and 1 on rank 1, cycled
    expected = [[(train[0], outliers[0]), (train[2], outliers[2])], [(train[1], outliers[1]), (train[3], outliers[1])]]
    for rank, steps in zip(ranks, expected, strict=True):
        assert len(rank["listed"]["inputs"]) == len(steps)
        for seen, (images, aux) in zip(rank["listed"]["inputs"], steps, strict=True):
            assert torch.equal(seen, torch.cat([images, aux]))


def test_a_dataloader_shuffled_without_a_generator_is_refused(ranks: list[dict]) -> None:
    for rank in ranks:
        assert "shuffled without a generator" in rank["refused"] and "manual_seed" in rank["refused"]
