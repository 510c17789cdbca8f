"""Small real image sets shipped in the wheels, rescaled to the benchmark's image size.

- scikit-learn ``load_digits()``: 1,797 handwritten digits, 8x8, grey levels
  0-16 (UCI Optical Recognition of Handwritten Digits), mapped to 0-255;
- scikit-image ``lfw_subset()``: the 100 face crops, 25x25, of its 200 images
  (the other 100 are non-face background patches), from Labeled Faces in the Wild.

Both are resized with Pillow's bilinear filter.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["digit_images", "face_images"]

_DIGIT_LEVELS = 16
_LFW_FACES = 100  # lfw_subset(): faces first, then as many non-faces


def _resize_all(images: np.ndarray, image_size: int) -> np.ndarray:
    size = (image_size, image_size)
    return np.stack([np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)) for image in images])


def digit_images(image_size: int) -> np.ndarray:
    """The 1,797 scikit-learn digits as uint8 ``[1797, image_size, image_size]``."""
    from sklearn.datasets import load_digits

    levels = load_digits().images
    return _resize_all(np.rint(levels * (255 / _DIGIT_LEVELS)).astype(np.uint8), image_size)


def face_images(image_size: int) -> np.ndarray:
    """The 100 LFW face crops of ``skimage.data.lfw_subset()`` as uint8 ``[100, image_size, image_size]``."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:_LFW_FACES]
    return _resize_all(np.rint(faces * 255).astype(np.uint8), image_size)
