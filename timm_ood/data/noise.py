"""ODIN's synthetic OOD sets: Gaussian and uniform noise images (Liang et al. 2018, Sec. 4.2).

*Gaussian*: each pixel i.i.d. N(0.5, 1) ("unit variance"), clipped to [0, 1],
so about 62% of the values saturate at 0 or 1. *Uniform*: each pixel i.i.d.
U[0, 1]. Values are quantised to 8 bits, as images are stored; noise is drawn
afresh for every image, as ODIN's code does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian_images", "uniform_images"]

_CHUNK = 1024  # images drawn per call: bounds the float32 working memory


def _shape(count: int, image_size: int, channels: int) -> tuple[int, ...]:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    return (count, image_size, image_size) if channels == 1 else (count, image_size, image_size, 3)


def gaussian_images(count: int, image_size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Images of i.i.d. N(0.5, 1) pixels clipped to [0, 1], as uint8 ``[N, H, W(, 3)]``."""
    images = np.empty(_shape(count, image_size, channels), dtype=np.uint8)
    for start in range(0, count, _CHUNK):
        chunk = images[start : start + _CHUNK]
        values = rng.standard_normal(chunk.shape, dtype=np.float32) + np.float32(0.5)
        np.rint(np.clip(values, 0.0, 1.0) * 255, out=values)
        chunk[...] = values
    return images


def uniform_images(count: int, image_size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Images of i.i.d. U[0, 1] pixels, quantised to the 256 grey levels with equal mass, uint8."""
    return rng.integers(0, 256, size=_shape(count, image_size, channels), dtype=np.uint8)
