"""The training loop every method shares: optimisers, schedules, outliers, augmentation, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_ood import training

from .._models import batches, create, digits_split, noise_images


def train_batches(n: int = 600, batch_size: int = 50) -> list:
    images, labels = digits_split()["train"]
    return batches(images[:n], labels[:n], batch_size)


def test_fit_learns_and_reports_per_epoch() -> None:
    model = create("test_resnet")
    history = training.fit(model, train_batches(1400, 64), epochs=3, optimizer="adamw", lr=3e-3, progress=False,
                           eval_data=batches(*digits_split()["test"]))
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    assert history.epochs[2].loss < history.epochs[0].loss
    assert history.final_accuracy > 0.8
    assert not model.training


def test_same_seed_same_weights() -> None:
    weights = []
    for attempt in range(2):
        torch.manual_seed(0)
        model = create("test_resnet")
        torch.manual_seed(123 + attempt)  # the loop reseeds: what happened before must not matter
        training.fit(model, train_batches(200), epochs=1, augment=True, seed=7, progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_outliers_are_interleaved_one_batch_per_step() -> None:
    seen = []

    class RecordingLoss(nn.Module):
        def forward(self, logits_in, targets, logits_out):
            seen.append((len(logits_in), len(logits_out)))
            uniform = -logits_out.log_softmax(1).mean(1).mean()
            return F.cross_entropy(logits_in, targets) + 0.5 * uniform

    outliers = [(noise_images(30, seed=i), torch.full((30,), -1)) for i in range(3)]  # fewer than steps: cycled
    training.fit(create("test_resnet"), train_batches(400), loss=RecordingLoss(), outliers=outliers, epochs=1,
                 progress=False)
    assert seen == [(50, 30)] * 8


def test_cosine_and_step_schedules() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    cosine = training.make_schedule(optimizer, "cosine", total_steps=100, warmup_steps=10)
    rates = []
    for _ in range(100):
        rates.append(cosine.get_last_lr()[0])
        optimizer.step()
        cosine.step()
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[55] == pytest.approx(0.5, abs=0.02) and rates[-1] < 0.01
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    step = training.make_schedule(optimizer, "step", total_steps=100)
    multipliers = [step.lr_lambdas[0](s) for s in (0, 49, 50, 74, 75, 99)]
    assert multipliers == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="cosine"):
        training.make_schedule(optimizer, "linear", 10)
    with pytest.raises(ValueError, match="sgd"):
        training.make_optimizer([parameter], "lbfgs", 0.1, 0.0)


def test_augmentation_shifts_and_flips_deterministically() -> None:
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    first = training.random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    second = training.random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert first.shape == images.shape and torch.equal(first, second)
    unshifted = training.random_crop_flip(images, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert torch.equal(unshifted, images)
    # every output row of an image is a (possibly mirrored) window of a replicate-padded input row
    padded = F.pad(images, (2,) * 4, mode="replicate")
    for b in range(2):
        windows = {tuple(padded[b, 0, r, c:c + 6].tolist()) for r in range(10) for c in range(5)}
        for row in first[b, 0]:
            assert tuple(row.tolist()) in windows or tuple(row.flip(0).tolist()) in windows


def test_a_diverging_loss_is_an_error() -> None:
    class Exploding(nn.Module):
        def forward(self, logits, targets):
            return (logits * float("inf")).sum()

    with pytest.raises(FloatingPointError, match="learning rate"):
        training.fit(create("test_resnet"), train_batches(100), loss=Exploding(), progress=False)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = create("test_vit")
    training.fit(model, train_batches(100), epochs=1, optimizer="adamw", lr=1e-3, progress=False)
    path = tmp_path / "vit.safetensors"
    training.save_checkpoint(model, path, create_kwargs={"num_classes": 10, "in_chans": 1, "img_size": 32},
                             metadata={"note": "test"})
    info = training.read_checkpoint_metadata(path)
    assert info["architecture"] == "test_vit" and info["metadata"] == {"note": "test"}
    assert info["data_config"]["input_size"] == [1, 32, 32]
    loaded = training.load_checkpoint(path)
    x = digits_split()["test"][0][:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.pretrained_cfg["std"] == model.pretrained_cfg["std"]
    with pytest.raises(ValueError, match="holds a 'test_vit' model"):
        training.load_checkpoint(path, "resnet18")
