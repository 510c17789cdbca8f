"""Letters A-J rendered in several fonts, sizes and offsets: a notMNIST-like OOD set.

notMNIST (ODIN's MNIST table) shows the letters A-J in many typefaces. Here
they are drawn white on black, as Fashion-MNIST's objects are, in the DejaVu
TrueType families (Sans, Sans Mono, Serif; regular, bold, oblique/italic) and
Pillow's built-in scalable font. The DejaVu files are read from matplotlib's
bundled copy (a dependency, so every machine with the same matplotlib renders
the same bytes) or, failing that, from Debian's ``fonts-dejavu-core``.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from .sampling import draw_distinct

__all__ = ["FONT_FILES", "LETTERS", "font_files", "render_glyphs"]

LETTERS = "ABCDEFGHIJ"
FONT_FILES: tuple[str, ...] = tuple(
    f"DejaVu{family}{style}.ttf"
    for family, styles in (
        ("Sans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("SansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("Serif", ("", "-Bold", "-Italic", "-BoldItalic")),
    )
    for style in styles
)
_DEBIAN_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_MAX_OFFSET = 3  # pixels, each way
_PILLOW_DEFAULT = "pillow-default"


def _matplotlib_font_dir() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"


def font_files() -> tuple[str, ...]:
    """The fonts glyphs are drawn in: DejaVu file paths, then Pillow's default font when scalable."""
    folders = [folder for folder in (_matplotlib_font_dir(), _DEBIAN_FONT_DIR) if folder is not None]
    found = []
    for name in FONT_FILES:
        path = next((folder / name for folder in folders if (folder / name).is_file()), None)
        if path is not None:
            found.append(str(path))
    if features.check("freetype2"):  # without FreeType, Pillow's default is one fixed-size bitmap
        found.append(_PILLOW_DEFAULT)
    return tuple(found)


@cache
def _font(file: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if file == _PILLOW_DEFAULT:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(file, size=size)


def render_glyphs(count: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct glyphs: a random letter, font, size (half the image to 2 px short of it) and offset.

    Returns:
        uint8 ``[count, image_size, image_size]``.

    Raises:
        RuntimeError: no font is available (no DejaVu files and no FreeType).
    """
    fonts = font_files()
    if not fonts:
        raise RuntimeError(
            "no font to draw glyphs with: install matplotlib or fonts-dejavu-core, or a Pillow built with FreeType"
        )
    centre = image_size / 2

    def draw(n: int) -> np.ndarray:
        letters = rng.integers(len(LETTERS), size=n)
        font_choice = rng.integers(len(fonts), size=n)
        sizes = rng.integers(image_size // 2, image_size - 1, size=n)
        offsets = rng.integers(-_MAX_OFFSET, _MAX_OFFSET + 1, size=(n, 2))
        glyphs = np.empty((n, image_size, image_size), dtype=np.uint8)
        for i in range(n):
            canvas = Image.new("L", (image_size, image_size))
            font = _font(fonts[font_choice[i]], int(sizes[i]))
            position = (centre + offsets[i, 0], centre + offsets[i, 1])
            ImageDraw.Draw(canvas).text(position, LETTERS[letters[i]], fill=255, font=font, anchor="mm")
            glyphs[i] = np.asarray(canvas)
        return glyphs

    return draw_distinct(count, draw)
