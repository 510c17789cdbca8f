"""Dataset examples to the tensors a timm model expects, read from the model itself.

:class:`ModelTransform` resolves the model's data config with
:func:`timm_ood.model_info.data_config` (timm's ``resolve_data_config`` with the
model's real channel count), so the normalisation here is the one ODIN's
epsilon is divided by. Per image it only converts the colour mode to the
model's channels (grey <-> RGB, Pillow's ITU-R 601 luma for RGB -> grey) and
runs the geometric part of timm's eval transform (``create_transform(...,
use_prefetcher=True)``: resize, centre crop, uint8 tensor), which it skips for
images already of the model's size when that part leaves them unchanged
(``crop_pct=1.0``). The float conversion and normalisation run once per batch,
as timm's prefetcher does, with the same float32 operations as ``ToTensor`` +
``Normalize``, so the values are identical, in single-threaded numpy: a batch of
small images is too little work to gain from torch's intra-op threads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import IncompatibleModelError
from ..model_info import data_config

__all__ = ["ModelTransform", "UndecodableImageError"]

_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}
#: Pillow modes of one-channel images (with or without alpha)
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class UndecodableImageError(Exception):
    """An image at ``position`` in a batch could not be decoded (the loader adds dataset and index)."""

    def __init__(self, position: int, cause: BaseException) -> None:
        super().__init__(position, cause)
        self.position, self.cause = position, cause


class ModelTransform:
    """Turns a batch of ``{"image": [...], "label": [...]}`` into normalised model inputs.

    Usable directly with ``dataset.with_transform(ModelTransform(model))``: it
    returns ``{"images": float32 [B, C, H, W], "labels": int64 [B]}``.

    Args:
        model: a timm model; its data config gives size, interpolation, crop,
            mean and std, and its stem the number of channels.
        **config_overrides: timm data-config arguments that replace the
            model's (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``).

    Raises:
        IncompatibleModelError: the model takes neither 1 nor 3 channels.
    """

    def __init__(self, model: nn.Module, **config_overrides: Any) -> None:
        from datasets import Image as ImageFeature
        from timm.data import create_transform

        self.config = data_config(model, **config_overrides)
        channels = self.config["input_size"][0]
        if channels not in _MODE_FOR_CHANNELS:
            raise IncompatibleModelError(
                f"{type(model).__name__} takes {channels} input channels; images convert to 1 (grey) or 3 (RGB)"
            )
        self.mode = _MODE_FOR_CHANNELS[channels]
        self.geometry = create_transform(**self.config, is_training=False, use_prefetcher=True)
        self.mean = np.asarray(self.config["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(self.config["std"], dtype=np.float32).reshape(-1, 1, 1)
        self._decoder = ImageFeature()
        height, width = self.config["input_size"][1:]
        self._input_width_height = (width, height)
        model_shape = (height, width) if self.mode == "L" else (height, width, 3)
        # images of this shape skip the resize and crop, unless these change them (crop_pct < 1)
        self._ready_shape = model_shape if self._geometry_keeps(model_shape) else None
        #: the dataset's name in the message said when grey images are made RGB (set by make_loader)
        self.name: str | None = None
        self._said_grey_to_rgb = False
        self._said_upscaled = False

    def __repr__(self) -> str:
        size, mean, std = self.config["input_size"], self.config["mean"], self.config["std"]
        return f"{type(self).__name__}(mode={self.mode!r}, input_size={size}, mean={mean}, std={std})"

    def _to_image(self, value: Any) -> Image.Image:
        if isinstance(value, np.ndarray):
            return Image.fromarray(value)
        return self._decoder.decode_example(value)  # PIL images pass through; {bytes, path} are decoded

    def _pixels(self, value: Any, position: int) -> np.ndarray:
        """uint8 ``[C, H, W]`` of one image, in the model's mode and size."""
        if not (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.shape == self._ready_shape):
            try:
                image = self._to_image(value)
            except Exception as error:  # any failure to decode is a corrupt image
                raise UndecodableImageError(position, error) from error
            if image.mode != self.mode:
                if self.mode == "RGB" and image.mode in _GREY_MODES and not self._said_grey_to_rgb:
                    self._say_grey_to_rgb(image.mode)
                image = image.convert(self.mode)
            if image.size != self._input_width_height or self._ready_shape is None:
                width, height = self._input_width_height
                if not self._said_upscaled and 2 * image.width <= width and 2 * image.height <= height:
                    self._say_upscaled(image.size)
                return self.geometry(image).numpy()
            value = np.asarray(image)
        return value[np.newaxis] if value.ndim == 2 else value.transpose(2, 0, 1)

    def _say_grey_to_rgb(self, mode: str) -> None:
        """Warn once that grey images are fed to an RGB model (the grey level repeated in R, G and B)."""
        self._said_grey_to_rgb = True
        where = f"dataset {self.name!r}" if self.name else "the dataset"
        warnings.warn(
            f"{where} holds {mode!r} (grey) images and the model takes 3 channels: each is converted to RGB "
            "(the grey level in R, G and B). Convert the dataset yourself to silence this, e.g. "
            "dataset.cast_column('image', datasets.Image(mode='RGB'))",
            UserWarning,
            stacklevel=2,
        )

    def _say_upscaled(self, size: tuple[int, int]) -> None:
        """Warn once that images are at most half the model's input size: each is enlarged to it, at its cost."""
        self._said_upscaled = True
        width, height = self._input_width_height
        warnings.warn(
            f"images of {size[0]}x{size[1]} pixels for a model that takes {width}x{height} inputs: each is "
            f"upscaled to {width}x{height}, {width * height / (size[0] * size[1]):.0f}x the pixels to compute on. "
            "For a model trained on these images, give it their input size and statistics when creating it: "
            "timm.create_model(..., pretrained_cfg_overlay=timm_ood.data.model_overlay('fashion-mnist')) (the "
            "source's name), benchmark.model_overlay(), or pretrained_cfg_overlay={'input_size': (C, H, W), "
            "'mean': ..., 'std': ..., 'crop_pct': 1.0}",
            UserWarning,
            stacklevel=2,
        )

    def _geometry_keeps(self, shape: tuple[int, ...]) -> bool:
        """Whether the resize and crop leave an image of the model's shape unchanged (crop_pct 1.0).

        Checked on a random image rather than inferred from the config, so it
        holds whatever timm's eval transform does.
        """
        probe = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
        out = self.geometry(Image.fromarray(probe)).numpy()
        expected = probe[np.newaxis] if probe.ndim == 2 else probe.transpose(2, 0, 1)
        return out.shape == expected.shape and bool(np.array_equal(out, expected))

    def images(self, values: Sequence[Any]) -> torch.Tensor:
        """Decode, convert and resize each image, then normalise the batch: float32 ``[B, C, H, W]``.

        Args:
            values: PIL images, uint8 arrays, or undecoded ``{"bytes", "path"}`` dicts.

        Raises:
            UndecodableImageError: an image cannot be decoded (its position in ``values``).
        """
        batch = np.stack([self._pixels(value, position) for position, value in enumerate(values)]).astype(np.float32)
        batch /= 255  # ToTensor, then Normalize: the same float32 operations, so the same values
        batch -= self.mean
        batch /= self.std
        return torch.from_numpy(batch)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        """``{"images", "labels"}`` of a batch with ``image`` and integer ``label`` columns.

        Raises:
            ValueError: a column is missing (the message names the columns found).
            TypeError: labels that are not integers (class names, floats).
        """
        missing = [column for column in ("image", "label") if column not in batch]
        if missing:
            raise ValueError(
                f"the batch has no {' or '.join(map(repr, missing))} column (its columns: "
                f"{', '.join(map(repr, batch)) or '(none)'}); rename them with dataset.rename_column(old, new)"
            )
        labels = np.asarray(batch["label"])
        if labels.size and labels.dtype.kind not in "iu":
            raise TypeError(
                f"labels must be integer class indices, got {labels.dtype} values such as {labels.ravel()[:3].tolist()}; "
                "encode the 'label' column: dataset.class_encode_column('label') for class names, or "
                "dataset.cast_column('label', Value('int64')) for whole numbers stored as floats"
            )
        return {"images": self.images(batch["image"]), "labels": torch.as_tensor(labels.astype(np.int64, copy=False))}
