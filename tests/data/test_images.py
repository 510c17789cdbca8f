"""The PNG writer, array-to-dataset construction and the on-disk cache."""

from __future__ import annotations

import io

import numpy as np
import pytest
from datasets import ClassLabel, DatasetInfo, Image, Value
from PIL import Image as PILImage

from timm_ood.data.cache import cached_dataset
from timm_ood.data.images import (
    OOD_LABEL,
    encode_png,
    images_to_dataset,
    label_array,
    relabel_as_ood,
)

pytestmark = pytest.mark.usefixtures("data_cache_dir")


@pytest.mark.parametrize("shape", [(5, 28, 28), (3, 17, 9), (4, 32, 32, 3)])
def test_encode_png_decodes_to_the_same_pixels(shape):
    images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    for png, expected in zip(encode_png(images), images, strict=True):
        decoded = PILImage.open(io.BytesIO(png))
        assert decoded.format == "PNG"
        assert decoded.mode == ("L" if len(shape) == 3 else "RGB")
        np.testing.assert_array_equal(np.asarray(decoded), expected)


@pytest.mark.parametrize(
    "images",
    [np.zeros((2, 8, 8), np.float32), np.zeros((8, 8), np.uint8), np.zeros((2, 8, 8, 4), np.uint8)],
)
def test_encode_png_rejects_what_is_not_a_uint8_grey_or_rgb_batch(images):
    with pytest.raises(ValueError, match="expected uint8 images"):
        encode_png(images)


def test_images_to_dataset_has_an_image_and_a_label_column():
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    info = DatasetInfo(dataset_name="tiny", license="CC0")
    ood = images_to_dataset(images, OOD_LABEL, info=info)
    assert isinstance(ood.features["image"], Image) and ood.features["label"] == Value("int64")
    assert ood["label"][:] == [-1, -1, -1]
    assert ood.info.license == "CC0" and ood.info.dataset_name == "tiny"
    np.testing.assert_array_equal(np.asarray(ood[2]["image"]), images[2])

    labelled = images_to_dataset(images, np.array([0, 1, 1]), info=info, class_names=["a", "b"])
    assert labelled.features["label"] == ClassLabel(names=["a", "b"])
    np.testing.assert_array_equal(label_array(labelled.select([2, 0])), [1, 0])


def test_relabel_as_ood_replaces_every_label():
    images = np.zeros((4, 4, 4), np.uint8)
    labelled = images_to_dataset(images, np.array([0, 1, 2, 3]), info=DatasetInfo(), class_names=list("abcd"))
    ood = relabel_as_ood(labelled.select([1, 3]))
    assert ood.features["label"] == Value("int64")
    assert ood["label"][:] == [-1, -1]
    streamed = relabel_as_ood(labelled.to_iterable_dataset())
    assert [example["label"] for example in streamed] == [-1] * 4


def test_cached_dataset_builds_once_then_reads_the_saved_copy():
    builds = []

    def build():
        builds.append(1)
        return images_to_dataset(np.full((2, 3, 3), 7, np.uint8), OOD_LABEL, info=DatasetInfo())

    key = {"source": "cache-test", "split": "test", "params": {"size": 2}}
    first, second = cached_dataset(key, build), cached_dataset(key, build)
    assert len(builds) == 1
    assert first.cache_files and first.cache_files == second.cache_files
    cached_dataset({**key, "params": {"size": 3}}, build)
    assert len(builds) == 2
