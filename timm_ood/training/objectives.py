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
:class:`Objective` directly. An objective that trains modules of its own next
to the model (Lee et al.'s joint GAN, :class:`~timm_ood.training.JointConfidenceObjective`)
uses the hooks :func:`~timm_ood.training.fit` calls around the model's update:
:meth:`Objective.start` once before the first step (with the run's
:class:`TrainingPlan`), :meth:`Objective.update` before each step's loss,
:meth:`Objective.end_epoch` on each epoch's record, and keeps its modules'
parameters out of the model's optimiser (:meth:`Objective.fit_parameters`).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .loop import EpochRecord

__all__ = ["Objective", "OutlierObjective", "SupervisedObjective", "TrainingPlan", "as_objective"]


@dataclass(frozen=True)
class TrainingPlan:
    """What :func:`~timm_ood.training.fit` tells an objective before the first step (:meth:`Objective.start`).

    Attributes:
        seed: ``fit``'s ``seed`` (each rank seeds its own draws with ``seed + rank``).
        epochs: passes over the training data.
        steps_per_epoch: steps per epoch on this rank.
        max_grad_norm: ``fit``'s gradient clipping (None: off).
        schedule: ``schedule(optimizer)`` is ``fit``'s learning-rate schedule (kind, warm-up,
            milestones, length) for another optimiser; step it once per training step.
    """

    seed: int
    epochs: int
    steps_per_epoch: int
    max_grad_norm: float | None
    schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class Objective(nn.Module, metaclass=ABCMeta):
    """One step's loss from the model and the batch (an ``nn.Module`` so it may hold parameters).

    :func:`~timm_ood.training.fit` moves the objective to the model's device, calls
    :meth:`start` once, then per step :meth:`update`, ``forward`` (whose loss the
    model's optimiser descends, with the objective's :meth:`fit_parameters`) and, per
    epoch, :meth:`end_epoch`. Under torch.distributed its parameters and buffers are
    rank 0's at the start and its running statistics are averaged after each epoch,
    as the model's. The hooks do nothing by default.
    """

    #: whether the step needs an auxiliary outlier batch
    uses_outliers: bool = False

    @abstractmethod
    def forward(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, outliers: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The scalar loss to minimise; ``outliers`` is the step's auxiliary batch, when any."""

    def start(self, model: nn.Module, plan: TrainingPlan) -> None:
        """Called once before the first step, after ``fit`` has seeded the run and made its loader.

        An objective that trains modules of its own builds them (on the model's device),
        their optimisers and their schedules (``plan.schedule``) here.
        """

    def update(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Updates of the objective's own modules before the step's loss (the model in train mode).

        Each such update back-propagates into its own modules' parameters only and
        steps their own optimiser; the model's weights are ``fit``'s to update.
        """

    def fit_parameters(self) -> Iterator[nn.Parameter]:
        """The objective's parameters that ``fit``'s optimiser trains with the model's: all, by default.

        An objective that updates modules of its own (:meth:`update`) leaves theirs out.
        """
        return self.parameters()

    def end_epoch(self, record: EpochRecord) -> EpochRecord:
        """The epoch's record, extended with what the objective measured (as it is, by default)."""
        return record


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
