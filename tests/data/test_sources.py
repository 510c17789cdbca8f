"""Offline sources: sizes, labels, determinism, disjoint photo groups, no network, errors, the registry."""

from __future__ import annotations

import hashlib
import socket

import numpy as np
import pytest
from datasets import Image

import timm_ood
from timm_ood import DuplicateNameError, UnknownNameError, data
from timm_ood.data import fashion_mnist, glyphs, photos
from timm_ood.data.images import OOD_LABEL, images_to_dataset, label_array

from ..conftest import REQUIRE_DATA_ENV, require_data

pytestmark = pytest.mark.usefixtures("data_cache_dir")

SMALL = 64

#: (source, parameters for a small build, expected size, image side)
GENERATED = [
    ("natural-crop", {"size": SMALL}, SMALL, 28),
    ("natural-resize", {"size": SMALL}, SMALL, 28),
    ("glyphs", {"size": SMALL}, SMALL, 28),
    ("gaussian", {"size": SMALL}, SMALL, 28),
    ("uniform", {"size": SMALL, "image_size": 32}, SMALL, 32),
    ("aux-photos", {"split": "train", "size": SMALL}, SMALL, 28),
]


def image_bytes(dataset) -> list[bytes]:
    return [image["bytes"] for image in dataset.cast_column("image", Image(decode=False))["image"]]


def pixels(dataset) -> np.ndarray:
    return np.stack([np.asarray(image) for image in dataset["image"]])


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# -- listing ---------------------------------------------------------------


def test_list_sources_says_which_need_the_hub():
    offline = data.list_sources(offline=True)
    assert set(offline) == {
        "fashion-mnist", "fashion-holdout", "digits", "natural-crop", "natural-resize",
        "glyphs", "faces", "gaussian", "uniform", "aux-photos",
    }  # fmt: skip
    hub = data.list_sources(offline=False)
    assert {"cifar10", "cifar100", "svhn", "mnist", "tin-crop", "tin-resize", "lsun-crop", "isun"} <= set(hub)
    assert hub["cifar10"].hub_id == "uoft-cs/cifar10"
    assert list(data.list_sources("natural-*")) == ["natural-crop", "natural-resize"]
    for spec in data.list_sources().values():
        assert spec.description and spec.provenance and spec.licence


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match=r"Did you mean 'gaussian'.*Known sources: .*aux-photos") as error:
        data.load_source("gausian")
    assert "fashion-mnist" in error.value.known


def test_bad_split_and_unknown_parameter_are_named():
    with pytest.raises(ValueError, match="source 'gaussian' has no split 'train'; its splits are: test"):
        data.load_source("gaussian", split="train")
    with pytest.raises(ValueError, match="source 'aux-photos' has no split 'test'; its splits are: train"):
        data.load_source("aux-photos")
    with pytest.raises(TypeError, match="no parameter 'sise'; its parameters are: size, seed, image_size, channels"):
        data.load_source("gaussian", sise=3)


def test_an_empty_set_is_an_error():
    with pytest.raises(data.EmptyDatasetError, match="source 'gaussian', split 'test' is empty"):
        data.load_source("gaussian", size=0)


# -- sizes, labels, pixels -------------------------------------------------


@pytest.mark.parametrize(("name", "params", "size", "side"), GENERATED, ids=[g[0] for g in GENERATED])
def test_generated_sources_have_their_size_and_ood_labels(name, params, size, side):
    dataset = data.load_source(name, **params)
    assert len(dataset) == size
    assert set(label_array(dataset)) == {OOD_LABEL}
    assert pixels(dataset).shape == (size, side, side)


def test_digits_are_the_1797_sklearn_digits_on_a_0_255_scale():
    digits = data.load_source("digits")
    assert len(digits) == 1797 and set(label_array(digits)) == {OOD_LABEL}
    values = pixels(digits)
    assert values.shape == (1797, 28, 28) and values.min() == 0 and values.max() == 255


def test_faces_are_the_100_lfw_faces():
    faces = data.load_source("faces", image_size=32)
    assert len(faces) == 100 and set(label_array(faces)) == {OOD_LABEL}
    assert pixels(faces).shape == (100, 32, 32)


def test_noise_follows_odin():
    gaussian = pixels(data.load_source("gaussian", size=500)) / 255
    saturated = np.mean((gaussian == 0) | (gaussian == 1))
    assert 0.58 < saturated < 0.66  # P(|N(0, 1)| > 0.5) = 0.617
    uniform = pixels(data.load_source("uniform", size=500))
    assert abs(uniform.mean() - 127.5) < 2 and uniform.min() == 0 and uniform.max() == 255
    rgb = data.load_source("gaussian", size=3, image_size=32, channels=3)
    assert rgb[0]["image"].mode == "RGB" and rgb[0]["image"].size == (32, 32)


def test_crops_and_tiles_are_not_flat():
    for name in ("natural-crop", "natural-resize"):
        assert pixels(data.load_source(name, size=SMALL)).std(axis=(1, 2)).min() >= 2


def test_glyphs_use_the_dejavu_fonts_and_pillows_default():
    fonts = glyphs.font_files()
    assert len(fonts) == len(glyphs.FONT_FILES) + 1, fonts


# -- determinism -----------------------------------------------------------


@pytest.mark.parametrize(("name", "params", "size", "side"), GENERATED, ids=[g[0] for g in GENERATED])
def test_the_same_seed_gives_the_same_bytes(name, params, size, side, monkeypatch, tmp_path):
    first = image_bytes(data.load_source(name, **params))
    monkeypatch.setenv("TIMM_OOD_CACHE_DIR", str(tmp_path))  # build again, not read back
    assert image_bytes(data.load_source(name, **params)) == first
    assert image_bytes(data.load_source(name, **params, seed=1)) != first


# -- the photo groups --------------------------------------------------------


def test_auxiliary_and_test_photo_groups_are_disjoint():
    assert not set(photos.TEST_PHOTOS) & set(photos.AUXILIARY_PHOTOS)

    def fingerprint(name: str) -> str:
        return hashlib.sha256(photos.load_photo(name).tobytes()).hexdigest()

    test = {fingerprint(name) for name in photos.TEST_PHOTOS}
    auxiliary = {fingerprint(name) for name in photos.AUXILIARY_PHOTOS}
    assert len(test) == len(photos.TEST_PHOTOS) and len(auxiliary) == len(photos.AUXILIARY_PHOTOS)
    assert not test & auxiliary


def test_no_auxiliary_image_appears_in_a_test_set():
    auxiliary = set(image_bytes(data.load_source("aux-photos", split="train", size=2000)))
    for name in ("natural-crop", "natural-resize"):
        assert not auxiliary & set(image_bytes(data.load_source(name, size=2000))), name


def test_offline_photos_faces_and_digits_never_touch_the_network(no_network):
    photos.load_photo.cache_clear()
    for name in (*photos.TEST_PHOTOS, *photos.AUXILIARY_PHOTOS):
        assert photos.load_photo(name).dtype == np.uint8
    data.load_source("faces", image_size=20)
    data.load_source("digits", image_size=20)


# -- Fashion-MNIST -----------------------------------------------------------


@pytest.mark.usefixtures("data_fashion_mnist")
def test_fashion_mnist_splits_and_labels():
    test = data.load_source("fashion-mnist", split="test")
    assert len(test) == 10_000
    assert test.features["label"].names[9] == "Ankle boot"
    labels = label_array(test)
    assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).tolist() == [1000] * 10
    image = test[0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    assert len(data.load_source("fashion-mnist", split="train")) == 60_000


@pytest.mark.usefixtures("data_fashion_mnist")
def test_fashion_holdout_is_classes_6_to_9_labelled_ood():
    holdout = data.load_source("fashion-holdout")
    assert len(holdout) == 4000 and set(label_array(holdout)) == {OOD_LABEL}
    test = data.load_source("fashion-mnist", split="test", classes=(6, 7, 8, 9))
    assert image_bytes(holdout) == image_bytes(test)
    first_six = data.load_source("fashion-mnist", split="test", classes=range(6))
    assert set(label_array(first_six)) == set(range(6)) and len(first_six) == 6000


@pytest.mark.usefixtures("data_fashion_mnist")
def test_fashion_mnist_from_a_data_dir(tmp_path):
    files = fashion_mnist.find_idx_files()
    for images_file, labels_file in files.values():
        for path in (images_file, labels_file):
            (tmp_path / "fashion-mnist").mkdir(exist_ok=True)
            (tmp_path / "fashion-mnist" / path.name).write_bytes(path.read_bytes())
    assert len(data.load_source("fashion-mnist", split="test", data_dir=tmp_path)) == 10_000


def test_missing_fashion_mnist_names_the_three_ways_to_get_it(monkeypatch, tmp_path, data_hub_offline):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.delenv(fashion_mnist.DATA_DIR_ENV, raising=False)
    with pytest.raises(data.DataNotFoundError) as error:
        data.load_source("fashion-mnist", split="test")
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data_dir=" in message and "TIMM_OOD_DATA_DIR" in message
    assert "zalando-datasets/fashion_mnist" in message and "failed" in message
    with pytest.raises(data.DataNotFoundError, match=r"searched .*empty"):
        data.load_source("fashion-mnist", split="test", data_dir=tmp_path / "empty")


def test_missing_data_skips_unless_it_is_required(monkeypatch):
    monkeypatch.delenv(REQUIRE_DATA_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="Fashion-MNIST is not available"):
        require_data("Fashion-MNIST", "apt-get install dataset-fashion-mnist")
    monkeypatch.setenv(REQUIRE_DATA_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="TIMM_OOD_REQUIRE_DATA=1 makes missing data a failure"):
        require_data("Fashion-MNIST", "apt-get install dataset-fashion-mnist")


def test_a_corrupt_idx_file_is_refused(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2, 3]))
    with pytest.raises(ValueError, match="holds 3 bytes of data, its header says"):
        fashion_mnist.read_idx(bad)


# -- model data configs ------------------------------------------------------


def test_model_overlay_gives_a_timm_pretrained_cfg_for_the_source():
    assert data.model_overlay("fashion-mnist") == {
        "input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,), "crop_pct": 1.0,
    }  # fmt: skip
    assert data.model_overlay("cifar10")["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match=r"'gaussian' declares no model data config; .* do: fashion-mnist, cifar10"):
        data.model_overlay("gaussian")


# -- plugins -----------------------------------------------------------------


def _squares(split: str, *, size: int = 4):
    images = np.zeros((size, 8, 8), np.uint8)
    images[:, 2:6, 2:6] = 255
    from datasets import DatasetInfo

    return images_to_dataset(images, OOD_LABEL, info=DatasetInfo(dataset_name="squares"))


class SquaresPlugin:
    @timm_ood.hookimpl
    def timm_ood_sources(self):
        return [data.SourceSpec("squares", _squares, "White squares.", "drawn in the test", "CC0")]

    @timm_ood.hookimpl
    def timm_ood_benchmarks(self):
        return [
            data.BenchmarkSpec(
                "squares-vs-noise",
                "Squares as ID (all one label) against uniform noise.",
                id_train=data.SourceRef("squares", params={"size": 6}),
                id_test=data.SourceRef("squares", params={"size": 20}),
                ood={"uniform": data.SourceRef("uniform", params={"size": 30, "image_size": 8})},
                num_classes=1,
                offline=True,
            )
        ]


class GaussianAgainPlugin:
    @timm_ood.hookimpl
    def timm_ood_sources(self):
        return [data.SourceSpec("gaussian", _squares, "A clash.", "test", "CC0")]


@pytest.fixture
def fresh_plugins():
    yield
    timm_ood.reload_plugins()


@pytest.mark.usefixtures("fresh_plugins")
def test_a_plugin_registers_sources_and_benchmarks_through_the_hooks():
    timm_ood.register_plugin(SquaresPlugin(), "squares-plugin")
    assert "squares" in data.list_sources(offline=True)
    assert len(data.load_source("squares", size=3)) == 3
    benchmark = data.load_benchmark("squares-vs-noise")
    assert len(benchmark.id_test) == 18 and len(benchmark.tuning.id) == 2
    assert len(benchmark.ood["uniform"]) == 27


@pytest.mark.usefixtures("fresh_plugins")
def test_a_plugin_reusing_a_source_name_is_an_error():
    timm_ood.register_plugin(GaussianAgainPlugin(), "gaussian-again")
    with pytest.raises(DuplicateNameError, match="source name 'gaussian' is registered twice"):
        data.list_sources()
