"""Data arguments: one string names a source, a hub id, an image folder, parquet files or a saved dataset."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
from datasets.exceptions import DatasetNotFoundError
from PIL import Image as PILImage

from timm_ood import data
from timm_ood.data import DataArgument, load_data, parse_data_argument
from timm_ood.data.arguments import parse_named_data_argument
from timm_ood.data.images import encode_png

pytestmark = pytest.mark.usefixtures("data_cache_dir", "data_hub_offline")


def write_folder(root: Path, splits: tuple[str, ...], classes: tuple[str, ...], per_class: int, side: int,
                 mode: str = "RGB") -> Path:
    """An image folder like ImageNet's: split folders of class folders (no split level when splits is empty)."""
    rng = np.random.default_rng(0)
    for split in splits or ("",):
        for name in classes or ("",):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = (side, side, 3) if mode == "RGB" else (side, side)
                PILImage.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def cifar_like_parquet(path: Path, count: int) -> Path:
    """The hub's CIFAR-10 schema (``img``, ``label``) at 32 px, as a parquet file."""
    images = np.random.default_rng(1).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    dataset = datasets.Dataset.from_dict(
        {"img": [{"bytes": png, "path": None} for png in encode_png(images)], "label": [i % 10 for i in range(count)]},
        features=features,
    )
    dataset.to_parquet(str(path))
    return path


def test_each_kind_of_argument_is_told_apart_without_loading(tmp_path):
    folder = write_folder(tmp_path / "imgs", (), ("a",), 1, 8)
    assert parse_data_argument(str(folder)) == DataArgument("path", str(folder), None)
    assert parse_data_argument(f"{folder}:validation") == DataArgument("path", str(folder), "validation")
    assert parse_data_argument("fashion-mnist:train") == DataArgument("source", "fashion-mnist", "train")
    assert parse_data_argument("my-org/my-outliers:test") == DataArgument("hub", "my-org/my-outliers", "test")
    assert parse_data_argument("my-org/my-outliers") == DataArgument("hub", "my-org/my-outliers", None)
    assert parse_named_data_argument(f"dtd={folder}") == ("dtd", DataArgument("path", str(folder), None))


@pytest.mark.parametrize("text", ["nothing-here", "./missing/folder"])
def test_an_argument_that_names_nothing_says_what_is_accepted(text):
    with pytest.raises(data.DataNotFoundError, match="image folder, parquet file or save_to_disk folder"):
        parse_data_argument(text)


def test_an_ood_argument_without_a_name_says_the_form():
    with pytest.raises(ValueError, match=r"expected NAME=DATA, e\.g\. --ood textures=\./dtd"):
        parse_named_data_argument("./dtd")


def test_an_imagenet_like_folder_reads_its_classes_and_prefers_val_for_testing(tmp_path):
    root = write_folder(tmp_path / "imagenet", ("train", "val"), ("n01440764", "n01443537"), 2, 224)
    train, test = load_data(str(root), "train"), load_data(str(root), "test")
    assert len(train) == 4 and len(test) == 4
    assert train.features["label"].names == ["n01440764", "n01443537"]
    assert sorted(test["label"]) == [0, 0, 1, 1]
    assert test[0]["image"].size == (224, 224)


def test_a_flat_folder_is_unlabelled_and_an_ood_set_is_labelled_minus_one(tmp_path):
    flat = write_folder(tmp_path / "flat", (), (), 3, 32)
    assert load_data(str(flat), "test")["label"] == [-1, -1, -1]
    labelled = write_folder(tmp_path / "labelled", (), ("x", "y"), 2, 32)
    assert load_data(str(labelled), "ood")["label"] == [-1] * 4


def test_parquet_with_the_hubs_cifar_schema_and_a_saved_dataset_load(tmp_path):
    parquet = cifar_like_parquet(tmp_path / "cifar10-test.parquet", 20)
    loaded = load_data(str(parquet), "test")
    assert loaded.column_names == ["image", "label"] and loaded["label"][:3] == [0, 1, 2]
    loaded.save_to_disk(str(tmp_path / "saved"))
    again = load_data(str(tmp_path / "saved"), "test")
    assert again["label"] == loaded["label"]


def test_a_registered_source_loads_by_name_and_as_an_ood_set(data_fashion_mnist):
    ood = load_data("fashion-mnist:test", "ood")
    assert len(ood) == 10_000 and set(ood["label"]) == {-1}
    assert set(load_data("fashion-mnist", "test")["label"]) == set(range(10))


def test_a_folder_without_images_is_refused_before_datasets_sees_it(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no images here")
    with pytest.raises(data.DataNotFoundError, match="has no images"):
        load_data(str(tmp_path / "docs"), "test")


def test_a_hub_id_offline_says_how_to_use_a_local_copy():
    with pytest.raises(data.HubUnavailableError, match=r"cannot be reached.*save_to_disk"):
        load_data("my-org/my-outliers:test", "ood")


def test_a_gated_hub_dataset_says_how_to_log_in(monkeypatch):
    def gated(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'ILSVRC/imagenet-1k' is a gated dataset on the Hub. You must be "
                                   "authenticated to access it.")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(data.HubAuthenticationError, match=r"gated.*hf auth login.*HF_TOKEN") as error:
        load_data("ILSVRC/imagenet-1k:validation", "test")
    assert "https://huggingface.co/datasets/ILSVRC/imagenet-1k" in str(error.value)

    def missing(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'my-org/nope' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(data.DataNotFoundError, match=r"no dataset 'my-org/nope'.*check the id"):
        load_data("my-org/nope", "ood")


def test_grey_images_for_an_rgb_model_are_converted_and_said_so_once(tmp_path):
    grey = write_folder(tmp_path / "grey", (), (), 4, 32, mode="L")
    model = timm.create_model("test_resnet", num_classes=3)
    loader = data.make_loader(load_data(str(grey), "ood"), model, batch_size=2, name="grey-set")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [batch[0] for batch in loader]
    said = [w for w in caught if "converted to RGB" in str(w.message)]
    assert len(said) == 1 and "'grey-set'" in str(said[0].message) and "converted to RGB" in str(said[0].message)
    assert images[0].shape[1] == 3
    assert np.allclose(images[0][:, 0].numpy() * loader.transform.std[0] + loader.transform.mean[0],
                       images[0][:, 1].numpy() * loader.transform.std[1] + loader.transform.mean[1], atol=1e-5)
