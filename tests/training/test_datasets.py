"""Datasets wherever training takes data: ``outliers=``, ``EnergyClusterSampler``, ``train_data``, ``eval_data``.

A Hugging Face dataset is read with the model's own data config; the same
images given as a loader or a list of batches train to the same weights.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import datasets
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from timm_ood import data, training

from .._models import IMAGE_SIZE, batches, create, digits_split


def _pixels(count: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, side, side), dtype=np.uint8)


def _image_dataset(count: int, side: int = IMAGE_SIZE, seed: int = 0, label: int | None = -1) -> datasets.Dataset:
    """Grey ``side`` x ``side`` images; with a ``label`` column of ``label``, or none."""
    columns = {"image": list(_pixels(count, side, seed))}
    features = {"image": datasets.Image()}
    if label is not None:
        columns["label"], features["label"] = [label] * count, datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class _RecordingLoss(nn.Module):
    """Outlier exposure's loss, recording each step's outlier batch."""

    def __init__(self) -> None:
        super().__init__()
        self.outliers: list[torch.Tensor] = []

    def forward(self, logits_in, targets, logits_out):
        self.outliers.append(logits_out.detach().clone())
        return F.cross_entropy(logits_in, targets) - 0.5 * logits_out.log_softmax(1).mean()


def _fit_with(outliers) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = create("test_resnet")
    images, labels = digits_split()["train"]
    loss = _RecordingLoss()
    training.fit(model, batches(images[:200], labels[:200], 50), loss=loss, outliers=outliers, epochs=1,
                 batch_size=50, seed=0, progress=False)
    return _weights(model), loss.outliers


def test_a_dataset_as_outliers_trains_as_its_loader_and_its_batches() -> None:
    outliers = _image_dataset(200)  # 4 steps of 50: one pass, so the list of the loader's batches is the same
    model = create("test_resnet")

    def loader():  # as fit reads the dataset: shuffled with its seed + 1 (each pass reshuffles: a fresh one each)
        return data.make_loader(outliers, model, batch_size=50, shuffle=True, seed=1)

    from_dataset, seen = _fit_with(outliers)
    assert [len(logits) for logits in seen] == [50] * 4
    for same in (loader(), list(loader()), outliers.remove_columns("label")):  # outliers need no label column
        torch.testing.assert_close(_fit_with(same)[0], from_dataset, rtol=0, atol=0)
    # and the dataset really is shuffled: in its own order the model trains differently
    assert not torch.equal(_fit_with(data.make_loader(outliers, model, batch_size=50))[0], from_dataset)


def test_outlier_labels_are_ignored_and_a_stream_is_read_in_order() -> None:
    outliers = _image_dataset(200)
    named = outliers.remove_columns("label").add_column("label", ["noise"] * 200)  # not class indices: not read
    torch.testing.assert_close(_fit_with(named)[0], _fit_with(outliers)[0], rtol=0, atol=0)
    in_order = list(data.make_loader(outliers, create("test_resnet"), batch_size=50))
    torch.testing.assert_close(_fit_with(outliers.to_iterable_dataset())[0], _fit_with(in_order)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no 'image' column"):
        _fit_with(outliers.rename_column("image", "img"))


def test_a_dataset_as_outliers_is_read_at_the_models_size() -> None:
    overlay = data.model_overlay("fashion-mnist")  # 28 px, Fashion-MNIST's statistics
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1, pretrained_cfg_overlay=overlay)
    outliers = _image_dataset(8, side=28)
    source = training.CyclingOutliers(outliers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # images of the model's size: nothing to say
        batch = source.next_batch(model, id_batch_size=4)
    assert batch.shape == (4, 1, 28, 28)
    expected = next(iter(data.make_loader(outliers, model, batch_size=4, shuffle=True, seed=0)))[0]
    torch.testing.assert_close(batch, expected, rtol=0, atol=0)
    pixels = (batch * overlay["std"][0] + overlay["mean"][0]) * 255  # normalised with the overlay's statistics
    torch.testing.assert_close(pixels, pixels.round().clamp(0, 255), rtol=0, atol=1e-3)


def test_images_much_smaller_than_the_model_input_are_upscaled_with_a_warning() -> None:
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)  # no overlay: timm's 160 px
    loader = data.make_loader(_image_dataset(6, side=28), model, batch_size=3, name="small")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shapes = [images.shape for images, _ in loader]
    said = [str(w.message) for w in caught if "upscaled" in str(w.message)]
    assert len(said) == 1 and shapes == [(3, 1, 160, 160)] * 2
    assert "images of 28x28 pixels" in said[0] and "160x160 inputs" in said[0]
    assert "pretrained_cfg_overlay=timm_ood.data.model_overlay('fashion-mnist')" in said[0]
    # a little smaller (more than half the size): resized without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(data.make_loader(_image_dataset(2, side=96), model, batch_size=2))


def test_energy_cluster_sampler_takes_a_dataset_a_loader_or_batches() -> None:
    torch.manual_seed(0)
    model = create("test_resnet").eval()
    candidates = _image_dataset(48)

    def loader():  # as the sampler reads the dataset: in batches of the ID batch size, shuffled with its seed
        return data.make_loader(candidates, model, batch_size=4, shuffle=True, seed=5)

    picked = {}
    for kind, given in (("dataset", candidates), ("loader", loader()), ("batches", list(loader()))):
        sampler = training.EnergyClusterSampler(given, pool_ratio=3.0, seed=5)
        picked[kind] = [sampler.next_batch(model, id_batch_size=4) for _ in range(4)]  # 48 candidates: one pass
    assert [p.shape for p in picked["dataset"]] == [(8, 1, IMAGE_SIZE, IMAGE_SIZE)] * 4
    for kind in ("loader", "batches"):
        for got, expected in zip(picked[kind], picked["dataset"], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_greg_plus_trains_on_a_dataset_of_candidates() -> None:
    torch.manual_seed(0)
    model = create("test_resnet")
    images, labels = digits_split()["train"]
    sampler = training.EnergyClusterSampler(_image_dataset(60), pool_ratio=3.0, seed=0)
    history = training.fit(model, batches(images[:40], labels[:40], 10), loss=training.EnergyLoss(),
                           outliers=sampler, epochs=1, progress=False)
    assert sampler.timings.steps == 4 and np.isfinite(history.epochs[0].loss)


def test_datasets_as_train_and_eval_data() -> None:
    images, labels = digits_split()["train"]
    pixels = ((images[:64, 0] * 0.4 + 0.3).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    digits = datasets.Dataset.from_dict({"image": list(pixels), "label": labels[:64].tolist()},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
    torch.manual_seed(0)
    model = create("test_resnet")
    history = training.fit(model, digits, epochs=1, batch_size=16, eval_data=digits, progress=False)
    assert history.final_accuracy == training.accuracy(model, data.make_loader(digits, model))
    with pytest.raises(TypeError, match="streamed IterableDataset"):
        training.fit(model, digits.to_iterable_dataset(), epochs=1, progress=False)
    run = training.fit_joint_confidence(model, digits, epochs=1, batch_size=32, latent_dim=8, gan_width=4,
                                        progress=False, eval_data=digits)
    assert run.generator.input_size == (1, IMAGE_SIZE, IMAGE_SIZE) and run.history.final_accuracy is not None


def test_import_timm_ood_gives_its_subpackages_on_first_use(data_cache_dir) -> None:
    code = (
        "import sys, timm_ood\n"
        "assert 'timm_ood.data' not in sys.modules and 'timm_ood.training' not in sys.modules\n"
        "assert {'data', 'training'} <= set(dir(timm_ood)) and {'data', 'training'} <= set(timm_ood.__all__)\n"
        "ds = timm_ood.data.load_source('uniform', size=8)\n"
        "assert len(ds) == 8 and {'image', 'label'} <= set(ds.features)\n"
        "assert timm_ood.training.fit.__module__ == 'timm_ood.training.loop'\n"
        "import timm_ood.data as d\n"
        "assert d is timm_ood.data\n"
        "try:\n"
        "    timm_ood.no_such_thing\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_thing' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)  # env: the cache
    assert result.returncode == 0, result.stderr
