"""The conformance task: scikit-learn's digits in, uniform noise out, and the model trained on it.

:func:`conformance_model` builds a tiny timm ``test_*`` model and trains it in
a second or two on the digits, with outlier exposure on uniform-noise images
(Hendrycks, Mazeika & Dietterich, ICLR 2019); :func:`conformance_data` gives
the digits to fit on, held-out digits and noise in a model's input format.
Both are cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IncompatibleModelError
from ..model_info import data_config

__all__ = ["DEFAULT_ARCHITECTURE", "ConformanceData", "conformance_data", "conformance_model"]

#: The timm architecture the checks run on unless told otherwise.
DEFAULT_ARCHITECTURE = "test_convnext"

_IMAGE_SIZE = 32
_MEAN, _STD = 0.3, 0.4  # normalisation of the kit's 1-channel digits
_NUM_CLASSES = 10
_TRAIN_POOL = 1400  # digits the model trains on and detectors fit on; the rest is held out
_FIT_IMAGES, _FIT_BATCH = 256, 128
_EVAL_IMAGES = 64
_TRAIN_STEPS, _TRAIN_BATCH, _EXPOSURE_BATCH = 40, 24, 12
_EXPOSURE_WEIGHT = 0.5
_SEED = 0


@dataclass(frozen=True)
class ConformanceData:
    """The kit's data for one model's input format, normalised as the model expects.

    Attributes:
        fit_batches: in-distribution training batches ``(images, labels)`` to fit detectors on.
        in_distribution: held-out digits [N, C, H, W].
        out_of_distribution: uniform-noise images [N, C, H, W], the easy OOD case.
    """

    fit_batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    in_distribution: torch.Tensor
    out_of_distribution: torch.Tensor

    def mixed(self, count: int) -> torch.Tensor:
        """``count`` images, half held-out digits and half noise, for invariance checks."""
        half = count // 2
        return torch.cat([self.in_distribution[:count - half], self.out_of_distribution[:half]])


@functools.cache
def _digit_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as [N, 1, 8, 8] pixels in [0, 1] and labels, in a seeded order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(_SEED))
    pixels = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16
    return pixels[order], torch.tensor(bunch.target)[order]


def _noise_pixels(count: int, channels: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.rand(count, channels, *size, generator=torch.Generator().manual_seed(seed))


class _InputFormat:
    """Turns [0, 1] pixels into a model's inputs: its size, channels and normalisation."""

    def __init__(self, input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.channels, self.size = input_size[0], (input_size[1], input_size[2])
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != self.size:
            pixels = F.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False)
        pixels = pixels.expand(-1, self.channels, -1, -1)
        return (pixels - self.mean) / self.std

    def noise(self, count: int, seed: int) -> torch.Tensor:
        return self(_noise_pixels(count, self.channels, self.size, seed))


def _input_format_key(model: nn.Module) -> tuple:
    try:
        config = data_config(model)
    except IncompatibleModelError as error:
        raise TypeError(
            f"the conformance kit cannot tell what images {type(model).__name__} takes ({error}); pass "
            "a timm architecture name as model=, or a timm model with a pretrained_cfg"
        ) from error
    return tuple(config["input_size"]), tuple(config["mean"]), tuple(config["std"])


@functools.cache
def _conformance_data(key: tuple) -> ConformanceData:
    to_inputs = _InputFormat(*key)
    pixels, labels = _digit_pixels()
    fit_images, fit_labels = to_inputs(pixels[:_FIT_IMAGES]), labels[:_FIT_IMAGES]
    batches = tuple(
        (fit_images[i:i + _FIT_BATCH], fit_labels[i:i + _FIT_BATCH]) for i in range(0, _FIT_IMAGES, _FIT_BATCH)
    )
    held_out = to_inputs(pixels[_TRAIN_POOL:_TRAIN_POOL + _EVAL_IMAGES])
    return ConformanceData(batches, held_out, to_inputs.noise(_EVAL_IMAGES, seed=_SEED + 1))


def conformance_data(model: nn.Module) -> ConformanceData:
    """The kit's digits and noise in ``model``'s input format (size, channels, normalisation).

    Raises:
        TypeError: the model carries no timm data config to read its input format from.
    """
    return _conformance_data(_input_format_key(model))


def _create_model(architecture: str) -> nn.Module:
    import timm

    overlay = {"input_size": (1, _IMAGE_SIZE, _IMAGE_SIZE), "mean": (_MEAN,), "std": (_STD,), "crop_pct": 1.0}
    fixed_size = getattr(timm.models.get_pretrained_cfg(architecture), "fixed_input_size", False)
    size: dict[str, Any] = {"img_size": _IMAGE_SIZE} if fixed_size else {}  # ViTs are built for one input size
    return timm.create_model(architecture, num_classes=_NUM_CLASSES, in_chans=1,
                             pretrained_cfg_overlay=overlay, **size)


def _train(model: nn.Module) -> None:
    """Cross-entropy on digits plus outlier exposure: uniform predictions on noise images."""
    to_inputs = _InputFormat(*_input_format_key(model))
    pixels, labels = _digit_pixels()
    images, labels = to_inputs(pixels[:_TRAIN_POOL]), labels[:_TRAIN_POOL]
    generator = torch.Generator().manual_seed(_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(_TRAIN_STEPS):
        index = torch.randint(0, len(images), (_TRAIN_BATCH,), generator=generator)
        noise = to_inputs.noise(_EXPOSURE_BATCH, seed=_SEED + 1000 + step)
        logits = model(torch.cat([images[index], noise]))
        exposure = -logits[_TRAIN_BATCH:].log_softmax(dim=1).mean()
        loss = F.cross_entropy(logits[:_TRAIN_BATCH], labels[index]) + _EXPOSURE_WEIGHT * exposure
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@functools.cache
def _trained_state(architecture: str) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = _create_model(architecture)
        _train(model)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def conformance_model(architecture: str = DEFAULT_ARCHITECTURE) -> nn.Module:
    """A fresh copy of the kit's model: ``architecture`` (a timm name) trained on the kit's digits.

    1-channel 32x32 inputs, 10 classes, in eval mode. Trained once per process
    (a second or two for timm's ``test_*`` architectures) with a fixed seed;
    the caller's random number generators are left as they were.
    """
    model = _create_model(architecture)
    model.load_state_dict(_trained_state(architecture))
    return model.eval()


@functools.cache
def _shared_model(architecture: str) -> nn.Module:
    """One model per architecture and process, shared by the checks: they never modify it."""
    return conformance_model(architecture)
