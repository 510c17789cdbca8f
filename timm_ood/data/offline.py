"""The offline protocol: sources built from real data the package registries ship.

A built-in plugin: it registers its sources and the ``fashion-mnist`` and
``fashion-mnist-6`` benchmarks through the same hooks a third-party plugin
implements. Generated sets are seeded (the same seed gives the same bytes) and
cached on disk after the first build (:mod:`timm_ood.data.cache`).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..hookspecs import hookimpl
from . import glyphs, noise, photos, rescaled
from .benchmarks import BenchmarkSpec, SourceRef
from .cache import cached_dataset
from .fashion_mnist import DATA_DIR_ENV, DEBIAN_DIR, HUB_ID, load_fashion_mnist
from .images import OOD_LABEL, images_to_dataset
from .sources import SourceSpec

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["FASHION_MNIST_OVERLAY", "timm_ood_benchmarks", "timm_ood_sources"]

#: Data config of a model trained on 28x28 grey Fashion-MNIST (mean and std of
#: the training pixels); crop_pct 1.0 so timm's eval transform crops nothing.
FASHION_MNIST_OVERLAY = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,), "crop_pct": 1.0}
_HOLDOUT_CLASSES = (6, 7, 8, 9)
_TEST_PHOTO_LICENCE = (
    "CC0 or public domain (per the skimage.data docstrings), except china.jpg: CC BY 2.0 "
    "(danielbuechele, Flickr) and coins: no known copyright restrictions (Brooklyn Museum)"
)
_AUXILIARY_PHOTO_LICENCE = (
    "CC0 or public domain, except flower.jpg: CC BY 2.0 (vultilion, Flickr), immunohistochemistry: "
    "no known copyright restrictions, moon and stereo_motorcycle (Middlebury 2014): not stated"
)


def _rng(source: str, seed: int) -> np.random.Generator:
    """One random stream per (source, seed): equal seeds of two sources draw unrelated images."""
    return np.random.default_rng([seed, zlib.crc32(source.encode())])


def _ood_set(source: str, split: str, params: dict[str, Any], make: Callable[[], np.ndarray]) -> Dataset:
    """The cached OOD set ``make()`` builds, all labels -1, described by the source's spec."""
    from datasets import DatasetInfo

    spec = _SOURCES[source]
    info = DatasetInfo(
        dataset_name=source,
        description=f"{spec.description} Provenance: {spec.provenance}",
        license=spec.licence,
    )
    key = {"source": source, "split": split, "params": params}
    return cached_dataset(key, lambda: images_to_dataset(make(), OOD_LABEL, info=info))


def _fashion_holdout(split: str, *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST test images of classes 6-9, labelled -1; ``data_dir`` as for ``fashion-mnist``."""
    return load_fashion_mnist(split, classes=_HOLDOUT_CLASSES, as_ood=True, data_dir=data_dir)


def _digits(split: str, *, image_size: int = 28) -> Dataset:
    """The 1,797 scikit-learn digits at ``image_size``."""
    return _ood_set("digits", split, {"image_size": image_size}, lambda: rescaled.digit_images(image_size))


def _faces(split: str, *, image_size: int = 28) -> Dataset:
    """The 100 LFW faces of scikit-image at ``image_size``."""
    return _ood_set("faces", split, {"image_size": image_size}, lambda: rescaled.face_images(image_size))


def _natural_crop(split: str, *, size: int = 10_000, seed: int = 0, image_size: int = 28) -> Dataset:
    """``size`` random crops of the test photos (:func:`~timm_ood.data.photos.random_crops`)."""
    def make() -> np.ndarray:
        return photos.random_crops(photos.TEST_PHOTOS, size, image_size, _rng("natural-crop", seed))

    return _ood_set("natural-crop", split, {"size": size, "seed": seed, "image_size": image_size}, make)


def _natural_resize(split: str, *, size: int = 10_000, seed: int = 0, image_size: int = 28) -> Dataset:
    """``size`` downsampled windows of the test photos (:func:`~timm_ood.data.photos.random_tiles`)."""
    def make() -> np.ndarray:
        return photos.random_tiles(photos.TEST_PHOTOS, size, image_size, _rng("natural-resize", seed))

    return _ood_set("natural-resize", split, {"size": size, "seed": seed, "image_size": image_size}, make)


def _aux_photos(split: str, *, size: int = 50_000, seed: int = 0, image_size: int = 28) -> Dataset:
    """``size`` auxiliary outliers, half crops and half windows of the auxiliary photos, shuffled."""
    def make() -> np.ndarray:
        rng = _rng("aux-photos", seed)
        crops = photos.random_crops(photos.AUXILIARY_PHOTOS, size // 2, image_size, rng)
        tiles = photos.random_tiles(photos.AUXILIARY_PHOTOS, size - size // 2, image_size, rng)
        return np.concatenate([crops, tiles])[rng.permutation(size)]

    return _ood_set("aux-photos", split, {"size": size, "seed": seed, "image_size": image_size}, make)


def _glyphs(split: str, *, size: int = 10_000, seed: int = 0, image_size: int = 28) -> Dataset:
    """``size`` rendered letters A-J (:func:`~timm_ood.data.glyphs.render_glyphs`)."""
    params = {"size": size, "seed": seed, "image_size": image_size, "fonts": glyphs.font_files()}
    return _ood_set("glyphs", split, params, lambda: glyphs.render_glyphs(size, image_size, _rng("glyphs", seed)))


def _gaussian(split: str, *, size: int = 10_000, seed: int = 0, image_size: int = 28, channels: int = 1) -> Dataset:
    """``size`` images of N(0.5, 1) noise clipped to [0, 1], grey or RGB (``channels`` 1 or 3)."""
    params = {"size": size, "seed": seed, "image_size": image_size, "channels": channels}
    return _ood_set(
        "gaussian", split, params, lambda: noise.gaussian_images(size, image_size, channels, _rng("gaussian", seed))
    )


def _uniform(split: str, *, size: int = 10_000, seed: int = 0, image_size: int = 28, channels: int = 1) -> Dataset:
    """``size`` images of U[0, 1] noise, grey or RGB (``channels`` 1 or 3)."""
    params = {"size": size, "seed": seed, "image_size": image_size, "channels": channels}
    return _ood_set(
        "uniform", split, params, lambda: noise.uniform_images(size, image_size, channels, _rng("uniform", seed))
    )


_FASHION_PROVENANCE = (
    f"Zalando Research; IDX files from Debian's dataset-fashion-mnist ({DEBIAN_DIR}), data_dir= or "
    f"${DATA_DIR_ENV}, else the hub copy {HUB_ID!r}"
)
_PHOTO_PROVENANCE = "grey photos from skimage.data and sklearn.datasets.load_sample_images()"

_SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec(
            "fashion-mnist",
            load_fashion_mnist,
            "Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images of 10 clothing classes.",
            _FASHION_PROVENANCE,
            "MIT",
            splits=("train", "test"),
            num_classes=10,
            hub_id=HUB_ID,
            model_overlay=FASHION_MNIST_OVERLAY,
        ),
        SourceSpec(
            "fashion-holdout",
            _fashion_holdout,
            "Fashion-MNIST test images of classes 6-9 (shirt, sneaker, bag, ankle boot), labels -1: "
            "near-OOD for a model trained on classes 0-5 (ODIN's CIFAR-80/20).",
            _FASHION_PROVENANCE,
            "MIT",
            hub_id=HUB_ID,
        ),
        SourceSpec(
            "digits",
            _digits,
            "1,797 real 8x8 handwritten digits upscaled to 28x28 (plays MNIST: far OOD, same modality).",
            "sklearn.datasets.load_digits(), UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak)",
            "CC BY 4.0 (UCI ML Repository); shipped in scikit-learn (BSD-3-Clause)",
        ),
        SourceSpec(
            "natural-crop",
            _natural_crop,
            f"10,000 random 28x28 crops of {len(photos.TEST_PHOTOS)} test photos at random pyramid octaves (plays "
            "TinyImageNet/LSUN crop, ODIN Sec. 4.2).",
            f"{_PHOTO_PROVENANCE}: {', '.join(photos.TEST_PHOTOS)}",
            _TEST_PHOTO_LICENCE,
        ),
        SourceSpec(
            "natural-resize",
            _natural_resize,
            "10,000 random square windows (1/4 to all of the shorter side) of "
            f"{len(photos.TEST_PHOTOS)} test photos, "
            "downsampled to 28x28 (plays TinyImageNet/LSUN resize, ODIN Sec. 4.2).",
            f"{_PHOTO_PROVENANCE}: {', '.join(photos.TEST_PHOTOS)}",
            _TEST_PHOTO_LICENCE,
        ),
        SourceSpec(
            "glyphs",
            _glyphs,
            "10,000 letters A-J, white on black, in 12 DejaVu fonts and Pillow's default, several sizes and "
            "offsets (plays notMNIST).",
            "rendered with Pillow in the DejaVu fonts (matplotlib's copy or Debian's fonts-dejavu-core) "
            "and Pillow's default font",
            "generated; DejaVu fonts: Bitstream Vera licence (free); Pillow: MIT-CMU",
        ),
        SourceSpec(
            "faces",
            _faces,
            "100 real 25x25 LFW face crops resized to 28x28 (a real unseen object class).",
            "skimage.data.lfw_subset() (its first 100 images; the rest are non-faces), from Labeled Faces in the Wild",
            "LFW: no licence stated, research use; shipped in scikit-image (BSD-3-Clause)",
        ),
        SourceSpec(
            "gaussian",
            _gaussian,
            "10,000 images of i.i.d. N(0.5, 1) pixels clipped to [0, 1] (ODIN Gaussian).",
            "generated with numpy, seeded",
            "generated (no third-party content)",
        ),
        SourceSpec(
            "uniform",
            _uniform,
            "10,000 images of i.i.d. U[0, 1] pixels (ODIN Uniform).",
            "generated with numpy, seeded",
            "generated (no third-party content)",
        ),
        SourceSpec(
            "aux-photos",
            _aux_photos,
            "50,000 auxiliary outliers for training-time methods: half crops, half downsampled windows "
            f"of {len(photos.AUXILIARY_PHOTOS)} photos disjoint from the test photos.",
            f"{_PHOTO_PROVENANCE}: {', '.join(photos.AUXILIARY_PHOTOS)}",
            _AUXILIARY_PHOTO_LICENCE,
            splits=("train",),
        ),
    )
}

_FAR_OOD_SETS = ("digits", "natural-crop", "natural-resize", "glyphs", "faces", "gaussian", "uniform")
_OOD_SETS = {name: SourceRef(name) for name in _FAR_OOD_SETS}
_FIRST_SIX = tuple(range(6))


@hookimpl
def timm_ood_sources() -> list[SourceSpec]:
    """The offline sources."""
    return list(_SOURCES.values())


@hookimpl
def timm_ood_benchmarks() -> list[BenchmarkSpec]:
    """``fashion-mnist`` (the offline default) and ``fashion-mnist-6`` (near-OOD by class split)."""
    outliers = SourceRef("aux-photos", "train")
    return [
        BenchmarkSpec(
            "fashion-mnist",
            "Fashion-MNIST (10 classes) against digits, natural crops and resizes, glyphs, faces and noise.",
            id_train=SourceRef("fashion-mnist", "train"),
            id_test=SourceRef("fashion-mnist", "test"),
            ood=dict(_OOD_SETS),
            num_classes=10,
            offline=True,
            outliers=outliers,
        ),
        BenchmarkSpec(
            "fashion-mnist-6",
            "Fashion-MNIST classes 0-5 against the held-out classes 6-9 (near-OOD) and the far OOD sets.",
            id_train=SourceRef("fashion-mnist", "train", {"classes": _FIRST_SIX}),
            id_test=SourceRef("fashion-mnist", "test", {"classes": _FIRST_SIX}),
            ood={"fashion-holdout": SourceRef("fashion-holdout"), **_OOD_SETS},
            num_classes=6,
            offline=True,
            outliers=outliers,
        ),
    ]
