"""Drawing sets of distinct images, so that no image repeats within an OOD set.

A repeated image would sit on both sides of the split between tuning and
evaluation images. Crops of a few photos, and glyphs from a finite set of
fonts, sizes and offsets, repeat by chance (about 2% of 10,000 crops); each
repeat, and each image too flat to carry content, is drawn again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["draw_distinct"]

_MAX_ROUNDS = 1000


def _rejected(images: np.ndarray, min_std: float) -> np.ndarray:
    """Indices of the images that are flat or repeat an earlier one."""
    rows = np.ascontiguousarray(images).reshape(len(images), int(np.prod(images.shape[1:])))
    flat = rows.std(axis=1) < min_std
    _, first = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))), return_index=True)
    repeated = np.ones(len(images), dtype=bool)
    repeated[first] = False
    return np.flatnonzero(flat | repeated)


def draw_distinct(count: int, draw: Callable[[int], np.ndarray], min_std: float = 0.0) -> np.ndarray:
    """``count`` distinct uint8 images from ``draw(n)``, each with pixel std >= ``min_std``.

    Args:
        count: how many images.
        draw: returns ``n`` new random images, uint8 ``[n, ...]``.
        min_std: images whose pixel standard deviation is lower are drawn again.

    Raises:
        ValueError: ``draw`` cannot give ``count`` distinct textured images
            (more are asked for than it can make).
    """
    images = draw(count)
    for _ in range(_MAX_ROUNDS):
        rejected = _rejected(images, min_std)
        if not rejected.size:
            return images
        images[rejected] = draw(rejected.size)
    raise ValueError(
        f"could not draw {count} distinct images in {_MAX_ROUNDS} rounds ({rejected.size} still repeat or "
        "are flat): ask for fewer"
    )
