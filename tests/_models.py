"""Small real models for the tests: timm ``test_*`` architectures trained briefly on sklearn digits.

Each is trained once per test process (a few seconds on 2 CPU cores) and
cached in memory. Digits are 8x8 greys in [0, 16], upscaled to 32x32.
"""

from __future__ import annotations

import functools

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

ARCHITECTURES = ("test_resnet", "test_convnext", "test_vit")
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4
IMAGE_SIZE = 32


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits as normalised [N, 1, 32, 32] float32 images and labels."""
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return (images - DIGITS_MEAN) / DIGITS_STD, torch.tensor(bunch.target)


def digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed train / test split (first 1,400 / last 397)."""
    images, labels = digits()
    return {"train": (images[:1400], labels[:1400]), "test": (images[1400:], labels[1400:])}


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 100) -> list:
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def noise_images(n: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise images in pixel space [0, 1], normalised like the digits (far OOD)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return (pixels - DIGITS_MEAN) / DIGITS_STD


def create(name: str, num_classes: int = 10, **kwargs) -> torch.nn.Module:
    """An untrained 1-channel 32x32 timm test model carrying its data config."""
    extra = {"img_size": IMAGE_SIZE} if "vit" in name else {}
    overlay = {"input_size": (1, IMAGE_SIZE, IMAGE_SIZE), "mean": (DIGITS_MEAN,), "std": (DIGITS_STD,), "crop_pct": 1.0}
    return timm.create_model(name, num_classes=num_classes, in_chans=1, pretrained_cfg_overlay=overlay,
                             **extra, **kwargs)


@functools.cache
def _trained_state(name: str, epochs: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = create(name)
    images, labels = digits_split()["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            index = order[start:start + 64]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(name: str = "test_resnet", epochs: int = 4) -> torch.nn.Module:
    """A fresh copy of ``name`` trained on digits (eval mode)."""
    model = create(name)
    model.load_state_dict(_trained_state(name, epochs))
    return model.eval()
