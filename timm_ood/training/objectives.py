"""What one training step minimises, given the model and the step's batches.

The loop (:func:`timm_ood.training.fit`) is the same for every method; an
:class:`Objective` says how a step's loss is computed. Plain losses are adapted
automatically:

- ``loss(logits, targets)`` (cross-entropy, IsoMax): :class:`SupervisedObjective`;
- ``loss(logits_in, targets, logits_out)`` with an auxiliary outlier batch
  (outlier exposure, Lee et al.'s confidence loss, the energy loss):
  :class:`OutlierObjective`, which runs in- and out-of-distribution images
  through one forward, as the outlier-exposure reference code does.

Methods that need more than logits (GReg's input-gradient penalty) subclass
:class:`Objective` directly.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from torch import nn

__all__ = ["Objective", "OutlierObjective", "SupervisedObjective", "as_objective"]


class Objective(nn.Module, metaclass=ABCMeta):
    """One step's loss from the model and the batch (an ``nn.Module`` so it may hold parameters)."""

    #: whether the step needs an auxiliary outlier batch
    uses_outliers: bool = False

    @abstractmethod
    def forward(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, outliers: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The scalar loss to minimise; ``outliers`` is the step's auxiliary batch, when any."""


class SupervisedObjective(Objective):
    """``loss(model(images), targets)``."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, model, images, targets, outliers=None):
        return self.loss(model(images), targets)


class OutlierObjective(Objective):
    """``loss(logits_in, targets, logits_out)`` from one forward over both batches."""

    uses_outliers = True

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, model, images, targets, outliers=None):
        if outliers is None:
            raise ValueError(f"{type(self.loss).__name__} needs an auxiliary outlier batch: pass outliers=...")
        logits = model(torch.cat([images, outliers]))
        return self.loss(logits[: len(images)], targets, logits[len(images):])


def as_objective(loss: nn.Module | None, with_outliers: bool) -> Objective:
    """The objective for a loss: itself if it is one, else the plain adapter that fits."""
    if isinstance(loss, Objective):
        return loss
    loss = nn.CrossEntropyLoss() if loss is None else loss
    return OutlierObjective(loss) if with_outliers else SupervisedObjective(loss)
