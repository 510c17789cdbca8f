"""Reading ``(images, labels)`` batches from whatever a user iterates over.

Accepted batch forms: a tuple/list ``(images, labels)`` (torchvision style, also
``(images,)``), a mapping with ``image``/``images``/``pixel_values`` and optional
``label``/``labels`` (Hugging Face ``datasets`` with a transform), or a bare
image tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch

from .tap import Tap

__all__ = ["OOD_LABEL", "check_class_labels", "check_images", "iter_batches", "split_batch"]

#: The label timm-ood's datasets give out-of-distribution images.
OOD_LABEL = -1

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
    _check_size(x, tap)
    _check_values(x)
    return x


_RESIZE_FIX = (
    "resize the images with timm's eval transform (timm.data.create_transform("
    "**timm.data.resolve_data_config({}, model=model))), or load them with "
    "timm_ood.data.make_loader(dataset, model), which resizes for the model"
)


def _check_size(x: torch.Tensor, tap: Tap) -> None:
    """Models with a fixed input size (ViTs with a strict patch embedding) get exactly that size."""
    size = tap.input_size
    if size is not None and tuple(x.shape[2:]) != size:
        raise ValueError(
            f"the model takes {size[0]}x{size[1]} images (its patch embedding has a fixed img_size) but "
            f"the batch is {x.shape[2]}x{x.shape[3]}; {_RESIZE_FIX}"
        )


def _check_values(x: torch.Tensor) -> None:
    """No NaN/inf, and not one value everywhere: one pass (``aminmax``) and one host sync when the batch is fine."""
    low, high = torch.stack(torch.aminmax(x.detach())).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = ~torch.isfinite(x.detach())
        images = int(bad.flatten(1).any(dim=1).sum())
        raise ValueError(
            f"{images} of {x.shape[0]} images contain NaN or inf ({int(bad.sum())} values); the model would "
            f"give NaN scores for {images} of {x.shape[0]} images. Check the loader's decoding and "
            "normalisation (a std of 0 divides by zero), or drop them: "
            "x[torch.isfinite(x).flatten(1).all(dim=1)]"
        )
    if low == high:
        raise ValueError(
            f"every value of the batch is {low:g} ({x.shape[0]} images of {tuple(x.shape[1:])}): it "
            "carries no image content, which is what a failed decode or a wrong transform gives. Check the "
            "loader: look at a few images (e.g. next(iter(loader))[0].std()) and load them with "
            "timm_ood.data.make_loader(dataset, model)"
        )


def check_class_labels(
    labels: torch.Tensor, batch_size: int, num_classes: int, who: str, *, fit_data: str = "fit data",
    ood_fix: str = "",
) -> torch.Tensor:
    """Check one batch of class labels: integer ``[B]`` in ``[0, num_classes)``, no OOD label.

    Args:
        labels: the batch's labels.
        batch_size: number of images in the batch.
        num_classes: the model's classes (0 when unknown: only negatives are refused).
        who: what reads the labels, for the messages.
        fit_data: what the data is called in the messages.
        ood_fix: appended to the fix for OOD labels (-1).

    Raises:
        ValueError / TypeError: with the offending values and the fix.
    """
    if labels.shape != (batch_size,):
        hint = " (one-hot or soft labels? pass class indices: labels.argmax(dim=1))" if labels.ndim == 2 else ""
        raise ValueError(
            f"{who}: labels must have shape [{batch_size}], one class index per image, got shape "
            f"{tuple(labels.shape)}{hint}"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{who}: labels must be integer class indices, got dtype {labels.dtype}; convert them with "
            "labels.long() (for a Hugging Face dataset: dataset.cast_column('label', ClassLabel(names=...)))"
        )
    if labels.numel() == 0:
        return labels
    extremes = torch.aminmax(labels)
    low, high = int(extremes.min), int(extremes.max)
    if low < 0:
        negative = labels[labels < 0]
        values = _listed(negative)
        if bool((negative == OOD_LABEL).any()):
            raise ValueError(
                f"{who}: the {fit_data} carries the OOD label -1 ({int((labels == OOD_LABEL).sum())} of "
                f"{batch_size} labels; negative values: {values}). Fit on in-distribution training data only: "
                f"filter out OOD images (label -1) from the {fit_data}{ood_fix}"
            )
        raise ValueError(
            f"{who}: labels must be class indices >= 0, got {values} ({negative.numel()} of {batch_size} "
            "labels); remap them to 0..K-1"
        )
    if num_classes > 0 and high >= num_classes:
        beyond = labels[labels >= num_classes]
        raise ValueError(
            f"{who}: labels must be class indices in [0, {num_classes}) for this {num_classes}-class model, "
            f"got {_listed(beyond)} ({beyond.numel()} of {batch_size} labels). If the data has {high + 1} "
            f"classes, create the model with num_classes={high + 1} (or model.reset_classifier({high + 1})); "
            f"otherwise remap the labels to 0..{num_classes - 1}"
        )
    return labels


def _listed(values: torch.Tensor, limit: int = 5) -> str:
    """The distinct values, smallest first, at most ``limit`` of them."""
    distinct = torch.unique(values).tolist()
    shown = ", ".join(map(str, distinct[:limit]))
    return shown + (f", ... ({len(distinct)} distinct)" if len(distinct) > limit else "")
