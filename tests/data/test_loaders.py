"""make_loader: the model's own transform, channel conversion, streams in bounded memory, bad input."""

from __future__ import annotations

import tracemalloc

import datasets
import numpy as np
import pytest
import timm
import torch
from datasets import DatasetInfo
from timm.data import create_transform

from timm_ood import data
from timm_ood.data.images import encode_png, images_to_dataset
from timm_ood.model_info import data_config

pytestmark = pytest.mark.usefixtures("data_cache_dir")

FASHION_OVERLAY = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "crop_pct": 1.0}


@pytest.fixture(scope="module")
def grey_model() -> torch.nn.Module:
    """The reference model's shape: a grey 28x28 ResNet with Fashion-MNIST's data config."""
    return timm.create_model("test_resnet", in_chans=1, num_classes=10, pretrained_cfg_overlay=FASHION_OVERLAY).eval()


@pytest.fixture(scope="module")
def rgb_model() -> torch.nn.Module:
    """An RGB 32x32 ViT (timm's default ViT data config, 0.95 crop, resized to 32x32)."""
    overlay = {"input_size": (3, 32, 32)}
    return timm.create_model("test_vit", img_size=32, num_classes=10, pretrained_cfg_overlay=overlay).eval()


def make_dataset(images: np.ndarray, labels=None, name: str = "made-here") -> datasets.Dataset:
    labels = np.arange(len(images)) % 10 if labels is None else labels
    return images_to_dataset(images, labels, info=DatasetInfo(dataset_name=name))


def random_images(count: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def timm_reference(dataset: datasets.Dataset, model: torch.nn.Module, mode: str) -> torch.Tensor:
    transform = create_transform(**data_config(model))
    return torch.stack([transform(example["image"].convert(mode)) for example in dataset])


def test_grey_28x28_images_come_out_exactly_as_timms_transform_makes_them(grey_model):
    dataset = make_dataset(random_images(50, 28, 28))
    images, labels = next(iter(data.make_loader(dataset, grey_model, batch_size=64)))
    assert images.shape == (50, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == (np.arange(50) % 10).tolist()
    assert torch.equal(images, timm_reference(dataset, grey_model, "L"))
    pixels = np.stack([np.asarray(example["image"]) for example in dataset]).astype(np.float32)
    expected = (pixels / 255 - np.float32(0.286)) / np.float32(0.353)
    np.testing.assert_allclose(images[:, 0].numpy(), expected, rtol=0, atol=1e-6)
    assert grey_model(images).shape == (50, 10)


def test_grey_images_become_rgb_for_an_rgb_model(rgb_model):
    dataset = make_dataset(random_images(12, 28, 28))
    images, _ = next(iter(data.make_loader(dataset, rgb_model, batch_size=12)))
    assert images.shape == (12, 3, 32, 32)
    assert torch.equal(images, timm_reference(dataset, rgb_model, "RGB"))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    assert rgb_model(images).shape == (12, 10)


def test_rgb_images_become_grey_and_are_resized_for_a_grey_model(grey_model):
    dataset = make_dataset(random_images(10, 64, 48, 3))
    images, _ = next(iter(data.make_loader(dataset, grey_model, batch_size=10)))
    assert images.shape == (10, 1, 28, 28)
    assert torch.equal(images, timm_reference(dataset, grey_model, "L"))


@pytest.mark.parametrize("model_name", ["grey_model", "rgb_model"])
def test_arrays_and_encoded_images_give_the_same_tensors(model_name, request):
    model = request.getfixturevalue(model_name)
    arrays = random_images(6, 28, 28)
    encoded = next(iter(data.make_loader(make_dataset(arrays), model, batch_size=6)))[0]
    transform = data.ModelTransform(model)
    assert torch.equal(transform.images(list(arrays)), encoded)
    assert transform.images([arrays[0, 2:]]).shape == (1, *encoded.shape[1:])  # other sizes are resized


def test_model_transform_works_with_with_transform(grey_model):
    dataset = make_dataset(random_images(5, 28, 28)).with_transform(data.ModelTransform(grey_model))
    batch = dataset[:5]
    assert batch["images"].shape == (5, 1, 28, 28) and batch["labels"].tolist() == [0, 1, 2, 3, 4]


def test_shuffling_is_seeded_and_batches_cover_the_set(grey_model):
    dataset = make_dataset(random_images(100, 28, 28), labels=np.arange(100))

    def order(seed):
        loader = data.make_loader(dataset, grey_model, batch_size=32, shuffle=True, seed=seed)
        return torch.cat([labels for _, labels in loader]).tolist()

    assert order(1) == order(1) != order(2)
    assert sorted(order(1)) == list(range(100))
    loader = data.make_loader(dataset, grey_model, batch_size=32, drop_last=True)
    assert [len(labels) for _, labels in loader] == [32, 32, 32]


def test_worker_processes_give_the_same_batches(grey_model):
    dataset = make_dataset(random_images(40, 28, 28))
    serial = list(data.make_loader(dataset, grey_model, batch_size=16))
    parallel = list(data.make_loader(dataset, grey_model, batch_size=16, num_workers=2))
    for (a, y), (b, z) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)


def test_a_sharded_stream_is_split_across_workers(grey_model):
    stream = make_dataset(random_images(40, 28, 28), labels=np.arange(40)).to_iterable_dataset(num_shards=4)
    loader = data.make_loader(stream, grey_model, batch_size=8, num_workers=2)
    assert sorted(torch.cat([labels for _, labels in loader]).tolist()) == list(range(40))


def test_a_corrupt_image_is_reported_with_its_dataset_and_index(grey_model):
    good = encode_png(random_images(6, 28, 28))
    good[3] = b"\x89PNG\r\n\x1a\n this is not an image"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    broken = datasets.Dataset.from_dict(
        {"image": [{"bytes": png, "path": None} for png in good], "label": [0] * 6},
        features=features,
        info=DatasetInfo(dataset_name="broken-set", features=features),
    )
    with pytest.raises(data.CorruptImageError, match="image 3 of dataset 'broken-set' cannot be decoded"):
        list(data.make_loader(broken, grey_model, batch_size=4))
    with pytest.raises(data.CorruptImageError, match="image 2 of dataset 'reordered'"):  # index in the dataset given
        list(data.make_loader(broken.select([5, 4, 3]), grey_model, batch_size=2, name="reordered"))
    with pytest.raises(data.CorruptImageError, match="image 3 of dataset 'stream'"):
        list(data.make_loader(broken.to_iterable_dataset(), grey_model, batch_size=2, name="stream"))


def _examples(count: int, progress: list[int], side: int = 28):
    for index in range(count):
        progress[0] = index + 1
        yield {"image": np.full((side, side), index % 256, dtype=np.uint8), "label": index % 10}


def test_an_empty_dataset_is_an_error_not_an_empty_loader(grey_model):
    empty = make_dataset(random_images(0, 28, 28))
    with pytest.raises(data.EmptyDatasetError, match="'made-here' is empty"):
        data.make_loader(empty, grey_model)
    empty_stream = datasets.IterableDataset.from_generator(_examples, gen_kwargs={"count": 0, "progress": [0]})
    with pytest.raises(data.EmptyDatasetError, match="stream 'generator' has no examples"):
        data.make_loader(empty_stream, grey_model)


def test_a_stream_cannot_be_shuffled_by_the_loader(grey_model):
    with pytest.raises(ValueError, match=r"dataset.shuffle\(seed=..., buffer_size=...\)"):
        data.make_loader(make_dataset(random_images(3, 28, 28)).to_iterable_dataset(), grey_model, shuffle=True)


def test_a_stream_is_read_lazily(grey_model):
    progress = [0]
    stream = datasets.IterableDataset.from_generator(_examples, gen_kwargs={"count": 50_000, "progress": progress})
    loader = iter(data.make_loader(stream, grey_model, batch_size=100))
    for batch_number in range(1, 4):
        images, labels = next(loader)
        assert images.shape == (100, 1, 28, 28)
        assert progress[0] <= (batch_number + 1) * 100, "the loader read ahead of the batches it gave"
    assert labels.tolist() == [i % 10 for i in range(200, 300)]


def test_a_50k_stream_goes_through_in_bounded_memory():
    model = timm.create_model("test_resnet", in_chans=1, pretrained_cfg_overlay={**FASHION_OVERLAY, "input_size": (1, 8, 8)})
    progress = [0]
    examples = {"count": 50_000, "progress": progress, "side": 8}
    stream = datasets.IterableDataset.from_generator(_examples, gen_kwargs=examples)
    loader = data.make_loader(stream, model, batch_size=1000)
    tracemalloc.start()
    try:
        seen = sum(len(labels) for _, labels in loader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == progress[0] == 50_000
    # holding the 50,000 examples (arrays in dicts) would take 19 MB; a batch of 1,000 takes 0.3 MB
    assert peak < 8e6, f"peak traced memory {peak / 1e6:.1f} MB"
