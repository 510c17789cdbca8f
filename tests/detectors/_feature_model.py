"""A hand-made "model" whose input *is* its feature map, for checking detectors against their papers.

The cross-checks of ``tests/detectors/`` that use it fit and score through the
public API (``wrap`` / ``fit`` / ``ood_score``) on :class:`FeatureModel`, so the
features, logits and intermediate maps are tiny known tensors; the references
are written from the papers' formulas with NumPy / SciPy / scikit-learn, one
sample or class at a time where that is clearest. The fits stream in small
batches, so the merging of sufficient statistics is what is checked.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import timm_ood

from .._models import batches

CLASSES, CHANNELS, SIDE = 3, 4, 2


CENTERS = torch.tensor([[2.0, 0, 0, 1], [0, 2.0, 0, -1], [0, 0, 2.0, 0.5]], dtype=torch.float64)


class FeatureModel(nn.Module):
    """A model with timm's contract whose input is its last feature map [B, C, 2, 2].

    ``forward_intermediates`` returns two maps: the input, and ``tanh(x) + x²``
    (any fixed nonlinear function will do). Pre-logits: the spatial mean; a
    linear classifier on top, close to the class centres of :func:`hand_made_data`
    so that most training samples are classified correctly.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.num_classes, self.num_features = CLASSES, CHANNELS
        self.fc = nn.Linear(CHANNELS, CLASSES).double()
        with torch.no_grad():
            self.fc.weight.copy_(CENTERS + 0.3 * torch.randn(CLASSES, CHANNELS, generator=generator, dtype=torch.float64))
            self.fc.bias.copy_(0.2 * torch.randn(CLASSES, generator=generator, dtype=torch.float64))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(x)

    def forward_intermediates(self, x, indices=None, intermediates_only=False, stop_early=False):
        maps = [x, torch.tanh(x) + x.square()]
        if indices is not None:
            maps = [maps[i] for i in indices]
        return maps if intermediates_only else (x, maps)


def hand_made_data(count: int = 36, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps of three well-separated classes (labels = the true class), float64."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    maps = CENTERS[labels][:, :, None, None] + 0.7 * torch.randn(count, CHANNELS, SIDE, SIDE, generator=generator,
                                                                 dtype=torch.float64)
    return maps, labels


def queries(count: int = 10, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(count, CHANNELS, SIDE, SIDE, generator=generator, dtype=torch.float64)


def fit(name: str, count: int = 36, batch_size: int = 5, **hyperparameters) -> timm_ood.OODModel:
    maps, labels = hand_made_data(count)
    ood = timm_ood.wrap(FeatureModel(), name, **hyperparameters)
    return ood.fit(batches(maps, labels, batch_size), progress=False)


def pooled(maps: torch.Tensor) -> np.ndarray:
    return maps.mean(dim=(2, 3)).numpy()


def logits_of(maps: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return FeatureModel()(maps).numpy()


def classifier() -> tuple[np.ndarray, np.ndarray]:
    fc = FeatureModel().fc
    return fc.weight.detach().numpy(), fc.bias.detach().numpy()


def scores_of(ood: timm_ood.OODModel, x: torch.Tensor) -> np.ndarray:
    return ood.ood_score(x).double().numpy()


# -- references, from the papers ----------------------------------------------------------------


def class_means_and_tied_covariance(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    means = np.stack([z[y == c].mean(0) for c in range(CLASSES)])
    centered = z - means[y]
    return means, centered.T @ centered / len(z)
