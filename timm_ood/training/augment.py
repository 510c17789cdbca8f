"""Batch-level training augmentation: random crops with padding and horizontal flips.

Works on the normalised tensors a loader yields, vectorised over the batch (no
per-image Python loop) and seeded through a generator the training loop owns.
Padding replicates the border, which is neutral for the dark backgrounds of
Fashion-MNIST and for natural images alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip"]


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int = 2, flip: bool = True
) -> torch.Tensor:
    """Shift each image by up to ``padding`` pixels and mirror half of them, [B, C, H, W] -> same shape."""
    batch, _, height, width = images.shape
    device = images.device
    if padding > 0:
        padded = F.pad(images, (padding,) * 4, mode="replicate")
        offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator).to(device)
        rows = offsets[0, :, None] + torch.arange(height, device=device)  # [B, H]
        cols = offsets[1, :, None] + torch.arange(width, device=device)  # [B, W]
        index = torch.arange(batch, device=device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirrored = torch.rand(batch, generator=generator).to(device) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(3), images)
    return images.contiguous()
