"""Reading ``(images, labels)`` batches from whatever a user iterates over.

Accepted batch forms: a tuple/list ``(images, labels)`` (torchvision style, also
``(images,)``), a mapping with ``image``/``images``/``pixel_values`` and optional
``label``/``labels`` (Hugging Face ``datasets`` with a transform), or a bare
image tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from .tap import Tap

__all__ = ["check_images", "iter_batches", "split_batch"]

_IMAGE_KEYS = ("image", "images", "pixel_values")
_LABEL_KEYS = ("label", "labels")


def split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels or None)`` from one batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        images = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        if images is None:
            raise TypeError(
                f"a batch mapping needs one of the keys {_IMAGE_KEYS}; got keys {sorted(batch)}"
            )
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        return images, None if labels is None else torch.as_tensor(labels)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 else None
        return batch[0], None if labels is None else torch.as_tensor(labels)
    raise TypeError(
        f"cannot read images from a batch of type {type(batch).__name__}: expected (images, labels), "
        "a mapping with an 'image' key, or an image tensor"
    )


def iter_batches(data: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(images, labels)`` for each batch of a DataLoader or any iterable of batches.

    Raises:
        TypeError: ``data`` is a single tensor (iterating it would give single
            images, not batches).
    """
    if isinstance(data, torch.Tensor):
        raise TypeError(
            "pass a DataLoader or an iterable of (images, labels) batches, not a tensor; for one "
            "batch of images use [(images, labels)] or call ood_score(images)"
        )
    for batch in data:
        yield split_batch(batch)


def check_images(x: object, tap: Tap) -> torch.Tensor:
    """Validate a batch of images for the tapped model, with messages that say how to fix it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor of images [B, C, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (one image? use x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(f"expected a batch of images of shape [B, C, H, W], got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError("the batch is empty (0 images)")
    if not x.is_floating_point():
        raise TypeError(
            f"images must be float tensors normalised as the model expects, got {x.dtype}; use "
            "timm_ood.data.make_loader(dataset, model) or timm's create_transform"
        )
    channels = tap.input_channels
    if channels is not None and x.shape[1] != channels:
        fix = (
            "x.mean(dim=1, keepdim=True)" if channels == 1 else f"x.expand(-1, {channels}, -1, -1)"
            if x.shape[1] == 1 else "a transform that converts channels"
        )
        raise ValueError(
            f"the model takes {channels}-channel images (in_chans={channels}) but the batch has "
            f"{x.shape[1]} channels; convert with {fix}, or load data with "
            "timm_ood.data.make_loader(dataset, model), which converts channels for the model"
        )
    return x
