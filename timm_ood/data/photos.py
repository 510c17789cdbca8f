"""Natural photographs shipped inside scikit-image and scikit-learn, cut into 28x28 OOD images.

The photos are split into two disjoint, fixed groups: :data:`TEST_PHOTOS` feed
the ``natural-crop`` and ``natural-resize`` test sets, :data:`AUXILIARY_PHOTOS`
the ``aux-photos`` outlier set that training-time methods may train on, so
nothing a method trains on appears in a test set. Only photos stored in the
wheels are used (``skimage.data`` fetches some others with pooch from the
network); ``cat`` is the same file as ``chelsea``, and the right view of
``stereo_motorcycle`` is left out because it shows the scene of the left.

Two ways of making small images from a photo, after ODIN (Liang et al. 2018,
Sec. 4.2), who built TinyImageNet/LSUN *crop* by "randomly cropping image
patches" and *resize* by "downsampling each image":

- :func:`random_crops` cuts ``size x size`` patches with no resampling, from a
  random octave of the photo's image pyramid (the photo and its 2x, 4x, ...
  box-filtered reductions, down to a shorter side of ``2 * size``: the
  TinyImageNet 32-of-64 ratio at the coarsest);
- :func:`random_tiles` downsamples random square windows of 1/4 to all of the
  photo's shorter side to ``size x size`` (antialiased bilinear).

Flat patches (pixel standard deviation under 2 grey levels, e.g. the black
border around ``retina``) carry no content, and repeated ones would fall on both
sides of the tuning/evaluation split: both are drawn again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, partial

import numpy as np
from PIL import Image

from .sampling import draw_distinct

__all__ = ["AUXILIARY_PHOTOS", "TEST_PHOTOS", "load_photo", "random_crops", "random_tiles"]

#: Photos behind the test OOD sets ``natural-crop`` and ``natural-resize``.
TEST_PHOTOS: tuple[str, ...] = (
    "camera", "astronaut", "coffee", "rocket", "china",
    "coins", "grass", "brick", "hubble_deep_field", "retina",
)  # fmt: skip
#: Photos behind the auxiliary outlier set ``aux-photos``; disjoint from :data:`TEST_PHOTOS`.
AUXILIARY_PHOTOS: tuple[str, ...] = (
    "chelsea", "motorcycle", "flower", "clock", "gravel",
    "moon", "cell", "immunohistochemistry", "text",
)  # fmt: skip

_MIN_STD = 2.0
_MIN_TILE_FRACTION = 0.25


def _from_skimage(function: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, function)()


def _from_sklearn(filename: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(filename)


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    **{
        name: partial(_from_skimage, name)
        for name in (
            "camera", "astronaut", "coffee", "rocket", "coins", "grass", "brick", "hubble_deep_field",
            "retina", "chelsea", "clock", "gravel", "moon", "cell", "immunohistochemistry", "text",
        )
    },
    "motorcycle": lambda: _from_skimage("stereo_motorcycle")[0],
    "china": lambda: _from_sklearn("china.jpg"),
    "flower": lambda: _from_sklearn("flower.jpg"),
}  # fmt: skip


@cache
def load_photo(name: str) -> np.ndarray:
    """A photo as a grey uint8 array ``[H, W]`` (ITU-R 601 luma, as Pillow's ``convert("L")``).

    Raises:
        KeyError: not one of :data:`TEST_PHOTOS` or :data:`AUXILIARY_PHOTOS`.
    """
    pixels = _LOADERS[name]()
    grey = np.asarray(Image.fromarray(pixels).convert("L")) if pixels.ndim == 3 else pixels
    grey.setflags(write=False)
    return grey


def _pyramid(photo: np.ndarray, min_side: int) -> list[np.ndarray]:
    levels, image = [photo], Image.fromarray(photo)
    while min(image.size) // 2 >= min_side:
        image = image.reduce(2)
        levels.append(np.asarray(image))
    return levels


def random_crops(photos: Sequence[str], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random ``size x size`` crops, each from a random photo and pyramid octave.

    Returns:
        uint8 ``[count, size, size]``.
    """
    pyramids = [_pyramid(load_photo(name), 2 * size) for name in photos]

    def draw(n: int) -> np.ndarray:
        photo = rng.integers(len(pyramids), size=n)
        octave = (rng.random(n) * np.array([len(p) for p in pyramids])[photo]).astype(int)
        where = rng.random((n, 2))
        crops = np.empty((n, size, size), dtype=np.uint8)
        offsets = np.arange(size)
        for p, o in {(int(p), int(o)) for p, o in zip(photo, octave, strict=True)}:
            level = pyramids[p][o]
            chosen = np.flatnonzero((photo == p) & (octave == o))
            tops = (where[chosen, 0] * (level.shape[0] - size + 1)).astype(int)
            lefts = (where[chosen, 1] * (level.shape[1] - size + 1)).astype(int)
            rows, cols = tops[:, None] + offsets, lefts[:, None] + offsets
            crops[chosen] = level[rows[:, :, None], cols[:, None, :]]
        return crops

    return draw_distinct(count, draw, min_std=_MIN_STD)


def random_tiles(photos: Sequence[str], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random square windows of the photos, downsampled to ``size x size``.

    Returns:
        uint8 ``[count, size, size]``.
    """
    images = [Image.fromarray(load_photo(name)) for name in photos]

    def draw(n: int) -> np.ndarray:
        photo = rng.integers(len(images), size=n)
        fraction = rng.uniform(_MIN_TILE_FRACTION, 1.0, size=n)
        where = rng.random((n, 2))
        tiles = np.empty((n, size, size), dtype=np.uint8)
        for i, (p, f, (y, x)) in enumerate(zip(photo, fraction, where, strict=True)):
            image = images[p]
            side = max(size, int(f * min(image.size)))
            left, top = int(x * (image.width - side + 1)), int(y * (image.height - side + 1))
            box = (left, top, left + side, top + side)
            tiles[i] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0))
        return tiles

    return draw_distinct(count, draw, min_std=_MIN_STD)
