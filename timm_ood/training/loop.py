"""One supervised training loop for every method: plain, outlier exposure, IsoMax, energy, GReg...

``fit`` trains a timm model in place: SGD (Nesterov) or AdamW, a cosine (or
step) learning-rate schedule over all steps, optional batch augmentation,
seeded. What a step minimises is an :class:`~timm_ood.training.objectives.Objective`
(a plain loss is adapted), and an optional auxiliary-outlier source is
interleaved with the in-distribution batches, one outlier batch per step. An
objective may train modules of its own around the model's update (Lee et al.'s
joint GAN: :func:`~timm_ood.training.fit_joint_confidence` is ``fit`` with such an objective).
Under an initialised torch.distributed process group each rank trains on its
part of the data and the replicas stay identical (see :func:`fit`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._runtime import eval_mode, model_device
from ..batches import check_class_labels, iter_batches
from ..distributed import all_reduce_sum, is_main_process, world
from ..passes import shard
from ..tap import inspect_head
from . import _distributed
from .augment import random_crop_flip
from .objectives import TrainingPlan, as_objective
from .outliers import OutlierSource, as_outlier_source, is_hf_dataset, outlier_batches

__all__ = ["EpochRecord", "TrainingHistory", "accuracy", "fit", "make_optimizer", "make_schedule"]

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "step", "constant")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3, "adam": 1e-3}


@dataclass
class EpochRecord:
    """What one epoch did."""

    epoch: int
    loss: float
    lr: float
    seconds: float
    accuracy: float | None = None


@dataclass
class TrainingHistory:
    """Per-epoch records of a :func:`fit` run."""

    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float | None:
        return self.epochs[-1].accuracy if self.epochs else None

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.epochs)


def make_optimizer(
    parameters: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float, momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum), AdamW or Adam over ``parameters``; weight decay applies to all of them."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_schedule(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0,
    milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step learning-rate multiplier: linear warm-up, then cosine to 0, steps, or constant.

    ``"step"`` divides by ``1/gamma`` at the given fractions of training (the
    ODIN and survey papers' schedule: x0.1 at 50% and 75%).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    total_steps = max(total_steps, 1)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "cosine":
            progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if name == "step":
            return gamma ** sum(step >= m * total_steps for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable | Any) -> float:
    """Top-1 accuracy of ``model`` over labelled batches (in eval mode).

    ``data`` is a DataLoader, an iterable of ``(images, labels)`` batches, or a
    Hugging Face dataset with ``image`` and ``label`` columns (read with the
    model's data config, :func:`timm_ood.data.as_batches`).

    Under torch.distributed each rank reads its part of ``data``
    (:func:`timm_ood.passes.shard`) and the counts are summed: every rank returns the whole data's accuracy.
    """
    if is_hf_dataset(data):
        from ..data import as_batches

        data = as_batches(data, model)
    device = model_device(model)
    correct = total = 0
    with eval_mode(model):
        for images, labels in iter_batches(shard(data)):
            if labels is None:  # would fail at labels.cpu() below
                raise ValueError("accuracy needs labelled batches: (images, labels), or a dataset with a label column")
            predictions = model(images.to(device)).argmax(dim=1).cpu()
            correct += int((predictions == labels.cpu()).sum())
            total += len(labels)
    counts = torch.tensor([correct, total], dtype=torch.long)
    all_reduce_sum(counts)
    correct, total = counts.tolist()
    if total == 0:
        raise ValueError("accuracy needs at least one labelled image")
    return correct / total


def _train_loader(train_data: Any, model: nn.Module, batch_size: int, seed: int) -> Iterable:
    """Hugging Face datasets become a shuffled loader for the model; anything else is used as given."""
    if not is_hf_dataset(train_data):
        return train_data
    from datasets import IterableDataset

    from ..data import make_loader

    if isinstance(train_data, IterableDataset):
        raise TypeError(
            "train_data is a streamed IterableDataset, whose length is unknown: training needs its batches per "
            "epoch to schedule the learning rate. Pass a map-style Dataset (load_dataset(..., streaming=False)), "
            "or a DataLoader or list of batches that has a length"
        )
    return make_loader(train_data, model, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)


def _scheduled_loader(train_data: Any, model: nn.Module, batch_size: int, seed: int) -> tuple[Iterable, int]:
    """The training loader and its steps per epoch (a learning-rate schedule needs a known, non-zero length)."""
    loader = _train_loader(train_data, model, batch_size, seed)
    if not isinstance(loader, Sized):
        raise TypeError("train_data must have a length (a DataLoader or a list of batches) to schedule the learning rate")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("train_data yielded no batches")
    return loader, steps_per_epoch


def _training_batch(
    images: torch.Tensor, labels: torch.Tensor | None, device: torch.device, augment: bool,
    generator: torch.Generator, num_classes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ID batch on the model's device, augmented when asked; unlabelled batches are refused.

    Labels must be class indices of the model's ``num_classes`` (0: unknown, only negatives refused).
    """
    if labels is None:
        raise ValueError("training batches need labels: pass (images, labels) batches")
    if not isinstance(images, torch.Tensor) or images.ndim == 0:
        raise TypeError(f"training images must be a tensor [B, C, H, W], got {type(images).__name__}")
    check_class_labels(labels, len(images), num_classes, "training.fit", fit_data="training data",
                       ood_fix=", and pass auxiliary outliers as fit(..., outliers=...)")
    images, labels = images.to(device), labels.to(device)
    if augment:
        images = random_crop_flip(images, generator)
    return images, labels


def fit(
    model: nn.Module,
    train_data: Any,
    *,
    loss: nn.Module | None = None,
    outliers: Iterable | OutlierSource | Any | None = None,
    epochs: int = 1,
    optimizer: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    schedule: str = "cosine",
    milestones: Sequence[float] = (0.5, 0.75),
    warmup_epochs: float = 0.0,
    batch_size: int = 128,
    augment: bool = False,
    seed: int = 0,
    eval_data: Iterable | Any | None = None,
    max_grad_norm: float | None = None,
    progress: bool | None = None,
) -> TrainingHistory:
    """Train ``model`` in place on in-distribution data, optionally with auxiliary outliers.

    Args:
        model: a timm model (any ``nn.Module`` returning logits).
        train_data: a DataLoader / iterable of ``(images, labels)`` batches, or
            a Hugging Face ``Dataset`` (then loaded for the model with
            ``timm_ood.data.make_loader``, shuffled with ``seed``).
        loss: ``loss(logits, targets)``, or with ``outliers``
            ``loss(logits_in, targets, logits_out)``, or an ``Objective``
            (which may train modules of its own: its hooks are called as
            :class:`~timm_ood.training.Objective` describes); default cross-entropy.
        outliers: auxiliary outliers, one batch per step, cycled: a DataLoader or
            iterable of batches (``(images, labels)`` or images), a Hugging Face
            dataset with an ``image`` column (its ``label``, if any, is ignored;
            loaded for the model in batches of ``batch_size``, a map-style one
            reshuffled on every pass, see :func:`~timm_ood.training.outliers.outlier_batches`),
            or an ``OutlierSource`` that picks them with the current model
            (:class:`~timm_ood.training.EnergyClusterSampler`).
        epochs: passes over ``train_data``.
        optimizer: ``"sgd"`` (Nesterov momentum), ``"adamw"`` or ``"adam"``.
        lr: peak learning rate (default 0.1 for SGD, 1e-3 for Adam/AdamW).
        weight_decay: applied to every parameter (IsoMax prototypes included).
        momentum: SGD momentum.
        schedule: ``"cosine"`` (per step, to 0), ``"step"`` (x0.1 at ``milestones``) or ``"constant"``.
        milestones: fractions of training where ``"step"`` divides the learning rate by 10.
        warmup_epochs: linear warm-up length in epochs.
        batch_size: images per batch of a Hugging Face dataset given as ``train_data`` or ``outliers``.
        augment: random 2-pixel shifts and horizontal flips of the ID batch.
        seed: seeds the global generator for the run (dropout, drop-path), shuffling and
            augmentation. The model's initial weights come from when it was created: seed
            ``torch.manual_seed`` before ``timm.create_model`` to make them reproducible.
        eval_data: labelled batches or a Hugging Face dataset to report accuracy on after each epoch.
        max_grad_norm: clip the gradient norm (off by default).
        progress: tqdm bars (default: on a terminal; only on rank 0 under torch.distributed).

    Returns:
        The per-epoch history (records as the objective's :meth:`~timm_ood.training.Objective.end_epoch`
        returns them); the model and the objective are left in eval mode.

    Under torch.distributed (any initialised process group of more than one
    process: torchrun, Accelerate, Lightning), call ``fit`` on every rank with the
    same arguments; each rank trains its replica on its part of the data:

    - a ``Dataset`` (or a map-style ``make_loader`` loader) is read in global batches
      of ``world_size x batch_size`` rows in the order one process would read them
      (shuffled with ``seed`` each epoch), each rank taking its ``batch_size`` rows;
      the last incomplete global batch is dropped. ``batch_size`` is per rank: two
      ranks of 64 see the batches of one process of 128.
    - any other ``train_data`` is split by :func:`timm_ood.passes.shard` (its own
      ``for_rank``, every ``world_size``-th batch, or kept when it has a
      ``DistributedSampler``, whose ``set_epoch`` is called each epoch), and every
      rank takes as many steps as the rank with the fewest batches (extra batches
      are dropped). A DataLoader shuffled without a ``generator`` is refused.
    - an iterable of outlier batches is split the same way (an ``OutlierSource``
      is used as given, on each rank).
    - rank 0's weights (the objective's included) are copied to every rank first;
      after each backward the gradients (the objective's parameters included) are averaged over the ranks,
      before clipping; BatchNorm normalises with each rank's batch statistics, and
      the running statistics are averaged over the ranks after each epoch, so the
      replicas end identical.
    - dropout, drop-path and augmentation are seeded with ``seed + rank``; the
      recorded loss and accuracy are over all ranks' images (``eval_data`` is
      split too).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    rank, world_size = world()
    torch.manual_seed(seed + rank)
    generator = torch.Generator().manual_seed(seed + rank)
    device = model_device(model)
    objective = as_objective(loss, with_outliers=outliers is not None).to(device)
    if objective.uses_outliers and outliers is None:
        raise ValueError(f"{type(objective).__name__} trains with auxiliary outliers: pass outliers=...")
    if outliers is not None and not isinstance(outliers, OutlierSource):
        # seeded apart from the ID shuffling: equally long sets would otherwise pair the same images every epoch
        batches = outlier_batches(outliers, model, batch_size=batch_size, seed=seed + 1)
        outliers = _distributed.shard_outliers(batches) if world_size > 1 else batches
    outlier_source = None if outliers is None else as_outlier_source(outliers)
    loader, steps_per_epoch = _scheduled_loader(train_data, model, batch_size, seed)
    if world_size > 1:
        loader, steps_per_epoch = _distributed.rank_loader(loader, seed)
    total_steps, warmup_steps = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)

    def scheduled(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return make_schedule(optimizer, schedule, total_steps, warmup_steps, milestones=milestones)

    objective.start(model, TrainingPlan(seed, epochs, steps_per_epoch, max_grad_norm, scheduled))
    if world_size > 1:
        _distributed.broadcast_from_main([model, objective])
    num_classes = inspect_head(model).num_classes
    parameters = [p for p in [*model.parameters(), *objective.fit_parameters()] if p.requires_grad]
    lr = DEFAULT_LR.get(optimizer, 0.1) if lr is None else lr
    opt = make_optimizer(parameters, optimizer, lr, weight_decay, momentum)
    scheduler = scheduled(opt)
    history = TrainingHistory()
    for epoch in range(1, epochs + 1):
        start, total_loss, seen = time.perf_counter(), 0.0, 0
        model.train()
        objective.train()
        bar = tqdm(iter_batches(loader), total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=not is_main_process() or (None if progress is None else not progress))
        for images, labels in bar:
            images, labels = _training_batch(images, labels, device, augment, generator, num_classes)
            outlier_images = None
            if outlier_source is not None:
                outlier_images = outlier_source.next_batch(model, len(images)).to(device)
                model.train()  # a sampler may have scored candidates in eval mode
            objective.update(model, images, labels)
            step_loss = objective(model, images, labels, outlier_images)
            # summed over the ranks before backward: a diverging rank stops every rank
            step_sum = torch.tensor([float(step_loss.detach()) * len(images), len(images)], dtype=torch.float64)
            all_reduce_sum(step_sum)
            loss_sum, count = step_sum.tolist()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"the training loss became {loss_sum / count} at epoch {epoch}: lower the learning "
                    f"rate (now {scheduler.get_last_lr()[0]:.3g}) or set max_grad_norm"
                )
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            if world_size > 1:
                _distributed.average_gradients(parameters)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            opt.step()
            scheduler.step()
            total_loss += loss_sum
            seen += int(count)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        if world_size > 1:
            _distributed.sync_buffers([model, objective])
        # float learning rates (make_optimizer's), which torch types as float | Tensor
        record = EpochRecord(epoch, total_loss / max(seen, 1), float(scheduler.get_last_lr()[0]),
                             time.perf_counter() - start)
        record = objective.end_epoch(record)
        if eval_data is not None:
            record.accuracy = accuracy(model, eval_data)
        history.epochs.append(record)
    model.eval()
    objective.eval()
    return history
