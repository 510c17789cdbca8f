"""Hub sources through their real load_dataset code path, with small local copies (the hub is unreachable here)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Image
from PIL import Image as PILImage

from timm_ood import data
from timm_ood.data.images import encode_png

pytestmark = pytest.mark.usefixtures("data_cache_dir", "data_hub_offline")


def write_image_folder(root: Path, splits: tuple[str, ...], classes: tuple[str, ...], per_class: int, side: int):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
                PILImage.fromarray(pixels).save(folder / f"{i}.png")


def cifar100_like(count: int) -> datasets.Dataset:
    """Columns named as on the hub's CIFAR-100: img, fine_label, coarse_label."""
    features = datasets.Features(
        {"img": Image(), "fine_label": datasets.Value("int64"), "coarse_label": datasets.Value("int64")}
    )
    images = np.random.default_rng(1).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    return datasets.Dataset.from_dict(
        {
            "img": [{"bytes": png, "path": None} for png in encode_png(images)],
            "fine_label": list(range(count)),
            "coarse_label": [0] * count,
        },
        features=features,
    )


def test_offline_the_hub_is_reported_unreachable_with_the_way_out():
    with pytest.raises(data.HubUnavailableError) as error:
        data.load_source("cifar10", split="test")
    message = str(error.value)
    assert "'uoft-cs/cifar10'" in message and "cannot be reached" in message
    assert "path=" in message and "save_to_disk" in message and "parquet" in message
    assert isinstance(error.value, ConnectionError)


def test_a_source_without_a_verified_hub_copy_asks_for_a_local_one():
    with pytest.raises(data.DataNotFoundError, match="'places365' has no verified copy"):
        data.load_source("places365")


def test_a_local_image_folder_loads_through_the_hub_code_path(tmp_path):
    root = tmp_path / "cifar10"
    write_image_folder(root, ("train", "test"), ("cat", "dog"), per_class=3, side=32)
    test = data.load_source("cifar10", split="test", path=root)
    assert test.column_names == ["image", "label"] and len(test) == 6
    assert test.features["label"] == ClassLabel(names=["cat", "dog"])
    assert sorted(test["label"][:]) == [0, 0, 0, 1, 1, 1]
    as_ood = data.load_source("cifar10", split="train", path=root, as_ood=True)
    assert as_ood["label"][:] == [-1] * 6


def test_a_flat_image_folder_is_an_unlabelled_ood_set(tmp_path):
    root = tmp_path / "lsun"
    root.mkdir()
    for i in range(4):
        PILImage.fromarray(np.full((36, 40), 40 * i, dtype=np.uint8)).save(root / f"{i}.jpg")
    lsun = data.load_source("lsun-resize", path=root)
    assert len(lsun) == 4 and lsun["label"][:] == [-1] * 4
    assert lsun[0]["image"].size == (40, 36)


def test_local_parquet_files_have_their_columns_renamed(tmp_path):
    cifar100_like(5).to_parquet(str(tmp_path / "test.parquet"))
    for kwargs in ({"path": tmp_path / "test.parquet"}, {"path": "parquet", "data_files": {"test": str(tmp_path / "test.parquet")}}):
        loaded = data.load_source("cifar100", split="test", **kwargs)
        assert loaded.column_names == ["image", "label"], kwargs
        assert loaded["label"][:] == [0, 1, 2, 3, 4] and isinstance(loaded.features["image"], Image)


def test_a_saved_dataset_loads_and_streams(tmp_path):
    cifar100_like(7).save_to_disk(str(tmp_path / "saved"))
    loaded = data.load_source("cifar100", split="test", path=tmp_path / "saved")
    assert len(loaded) == 7 and loaded.column_names == ["image", "label"]
    stream = data.load_source("cifar100", split="test", path=tmp_path / "saved", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [example["label"] for example in stream] == list(range(7))


def test_tinyimagenet_crop_and_resize_are_built_like_odins(tmp_path):
    root = tmp_path / "tiny-imagenet"
    write_image_folder(root, ("train", "valid"), ("n01", "n02"), per_class=2, side=64)
    crop = data.load_source("tin-crop", path=root)
    resize = data.load_source("tin-resize", path=root)
    assert len(crop) == len(resize) == 4
    assert crop["label"][:] == resize["label"][:] == [-1] * 4
    originals = data.load_source("tiny-imagenet", split="test", path=root)
    for original, cropped, resized in zip(originals["image"], crop["image"], resize["image"], strict=True):
        assert cropped.size == resized.size == (32, 32)
        big, patch = np.asarray(original), np.asarray(cropped)
        found = [
            (top, left)
            for top in range(33)
            for left in range(33)
            if np.array_equal(big[top : top + 32, left : left + 32], patch)
        ]
        assert found, "a crop is a 32x32 patch of its image, without resampling"
    again = data.load_source("tin-crop", path=root)
    assert [np.asarray(i).tobytes() for i in again["image"]] == [np.asarray(i).tobytes() for i in crop["image"]]
