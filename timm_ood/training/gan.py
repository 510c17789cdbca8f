"""Lee et al.'s joint confidence training: a classifier trained with a GAN that makes boundary samples.

Lee, Lee, Lee & Shin, "Training Confidence-calibrated Classifiers for Detecting
Out-of-Distribution Samples", ICLR 2018, Eq. 4 and Algorithm 1::

    min_G min_θ max_D   E_Pin[-log Pθ(y|x)]                              (c) classifier
                      + β E_PG[KL(U(y) || Pθ(y|x))]                      (d) shared
                      + E_Pin[log D(x)] + E_PG[log(1 - D(x))]            (e) GAN

Per in-distribution batch, in the paper's order, with fresh noise z each time:

1. D ascends ``mean log D(x) + log(1 - D(G(z)))``;
2. G descends ``mean log(1 - D(G(z))) + β KL(U || Pθ(y|G(z)))`` through the
   classifier, which is frozen for the step: only G's optimiser steps and the
   classifier runs in eval mode, so neither its weights nor its BatchNorm
   statistics change (Lee et al.'s VGG has no BatchNorm; a timm model's would
   otherwise be updated with generated-batch statistics, and its dropout would
   make G chase a random sub-network);
3. the classifier descends ``mean CE(x, y) + β KL(U || Pθ(y|G(z)))`` on
   *detached* generated samples: the confidence loss
   (:class:`~timm_ood.training.ConfidenceLoss`) with G's output as the outlier
   batch, ID and generated images in one forward as :func:`~timm_ood.training.fit`
   does for auxiliary outliers.

Input space: G ends in a sigmoid, so it makes pixels in [0, 1]; they are
mapped with the classifier's own mean/std (``model_info.data_config(model)``)
into the normalised space the loaders produce. Both the classifier and D see
normalised images: real batches straight from the loader, generated ones
through that mapping.

G's loss: ``generator_loss="paper"`` is Algorithm 1's ``log(1 - D(G(z)))``;
``"non-saturating"`` is ``-log D(G(z))``, the usual GAN substitute that the
authors' code uses (the paper's form gives G almost no gradient while D rejects
its samples confidently). D outputs a logit; ``log D = -softplus(-l)`` and
``log(1 - D) = -softplus(l)`` are computed without forming D.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._runtime import eval_mode, model_device
from ..batches import iter_batches
from .loop import (
    EpochRecord,
    TrainingHistory,
    _scheduled_loader,
    _training_batch,
    accuracy,
    make_optimizer,
    make_schedule,
)
from .losses import ConfidenceLoss, kl_to_uniform
from .objectives import OutlierObjective

__all__ = [
    "GENERATOR_LOSSES",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "JointConfidenceRun",
    "JointConfidenceTrainer",
    "JointEpochRecord",
    "fit_joint_confidence",
]

GENERATOR_LOSSES = ("paper", "non-saturating")


def _stages(height: int, width: int) -> tuple[int, int, int]:
    """``(n, base_h, base_w)``: n stride-2 stages from a base of 4-7 pixels on the shorter side.

    ``base * 2**n >= size``: 28 -> 7*4, 32 -> 4*8, 64 -> 4*16, 224 -> 7*32; odd
    sizes are generated a little larger and centre-cropped.
    """
    shorter = min(height, width)
    if shorter < 4:
        raise ValueError(f"the DCGAN needs images of at least 4x4 pixels, got {height}x{width}")
    n = max(1, math.floor(math.log2(shorter / 4))) if shorter >= 8 else 0
    return n, math.ceil(height / 2**n), math.ceil(width / 2**n)


def _input_contract(model: nn.Module) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    from ..model_info import data_config

    config = data_config(model)
    channels, height, width = (int(v) for v in config["input_size"])
    return (channels, height, width), tuple(config["mean"]), tuple(config["std"])


def _init_dcgan(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016; Lee et al.'s code): N(0, 0.02) convs, N(1, 0.02) BN scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """A DCGAN generator sized to a classifier's input, emitting *normalised* images.

    ``z [B, latent_dim]`` -> a transposed convolution to a 4-7 px base ->
    ``n`` x (4x4 stride-2 transposed conv, BatchNorm, ReLU) -> sigmoid pixels in
    [0, 1] -> ``(pixels - mean) / std``, the classifier's normalisation. Widths
    halve per stage from ``width * 2**(n-1)`` (28 px: 128-64-C; 32 px:
    256-128-64-C; Lee et al.'s MNIST net is 512-256-128-1).

    Args:
        input_size: ``(C, H, W)`` of the classifier's inputs.
        mean / std: its per-channel normalisation (length C).
        latent_dim: size of z (100, as Lee et al.).
        width: channels of the last hidden stage.
    """

    def __init__(
        self, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], latent_dim: int = 100,
        width: int = 64,
    ) -> None:
        super().__init__()
        channels, height, width_px = (int(v) for v in input_size)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
        self.input_size = (channels, height, width_px)
        self.latent_dim = int(latent_dim)
        n, base_h, base_w = _stages(height, width_px)
        widths = [width * 2 ** (n - 1 - i) for i in range(n)] if n else [width]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], (base_h, base_w), 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for i in range(n - 1):
            layers += [nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=False),
                       nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1) if n else nn.Conv2d(widths[-1], channels, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        _init_dcgan(self)

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> DCGANGenerator:
        """A generator for ``model``'s inputs: channels, size and normalisation from its data config."""
        input_size, mean, std = _input_contract(model)
        return cls(input_size, mean, std, **kwargs)

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Generated images in [0, 1] pixel space, [B, C, H, W]."""
        out = torch.sigmoid(self.net(z.view(len(z), self.latent_dim, 1, 1)))
        _, height, width = self.input_size
        top, left = (out.shape[2] - height) // 2, (out.shape[3] - width) // 2
        return out[:, :, top:top + height, left:left + width]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generated images normalised as the classifier expects them."""
        return (self.pixels(z) - self.mean) / self.std

    def latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of z ~ N(0, I), on this module's device."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        return z.to(self.mean.device)


class DCGANDiscriminator(nn.Module):
    """A DCGAN discriminator over normalised images; returns one logit per image (``D = sigmoid``).

    ``n`` x (4x4 stride-2 conv, BatchNorm except on the first, LeakyReLU 0.2),
    widths doubling from ``width``, then a convolution over the remaining map to
    one logit (Lee et al.: 128-256-512-1 for 32 px with width 128).

    Args:
        input_size: ``(C, H, W)``.
        width: channels of the first stage.
    """

    def __init__(self, input_size: Sequence[int], width: int = 64) -> None:
        super().__init__()
        channels, height, width_px = (int(v) for v in input_size)
        self.input_size = (channels, height, width_px)
        n, _, _ = _stages(height, width_px)
        layers: list[nn.Module] = []
        in_channels = channels
        for i in range(n):
            out_channels = width * 2**i
            layers.append(nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            in_channels = out_channels
            height, width_px = height // 2, width_px // 2
        layers.append(nn.Conv2d(in_channels, 1, (height, width_px), 1, 0))
        self.net = nn.Sequential(*layers)
        _init_dcgan(self)

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> DCGANDiscriminator:
        """A discriminator for ``model``'s input size and channels."""
        input_size, _, _ = _input_contract(model)
        return cls(input_size, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B]: ``log D(x) = -softplus(-logit)``, ``log(1 - D(x)) = -softplus(logit)``."""
        return self.net(images).flatten()


def _parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter],
             max_grad_norm: float | None, what: str) -> None:
    """One optimiser step on ``loss`` whose gradients reach ``parameters`` only."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the {what} loss became {float(loss.detach())}: lower the learning rates "
                                 "or set max_grad_norm")
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=parameters)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()


class JointConfidenceTrainer:
    """The three updates of Lee et al.'s Algorithm 1, one method each, for one batch.

    Each ``*_objective`` is the quantity its step ascends (D) or descends (G,
    classifier); each ``*_step`` evaluates it on fresh noise (or the ``z``
    given), back-propagates into its own module's parameters only and steps
    its own optimiser. :meth:`step` runs the three in the paper's order.

    Args:
        model: the classifier (a timm model returning logits).
        generator / discriminator: the GAN (see :class:`DCGANGenerator`).
        classifier_optimizer / generator_optimizer / discriminator_optimizer:
            optimisers over the three modules' parameters.
        beta: β of the KL term, the same in the G and classifier steps.
        generator_loss: ``"paper"`` (``log(1 - D(G(z)))``) or ``"non-saturating"`` (``-log D(G(z))``).
        noise: seeds the draws of z.
        max_grad_norm: clip each step's gradient norm (off by default).
    """

    def __init__(
        self,
        model: nn.Module,
        generator: DCGANGenerator,
        discriminator: DCGANDiscriminator,
        classifier_optimizer: torch.optim.Optimizer,
        generator_optimizer: torch.optim.Optimizer,
        discriminator_optimizer: torch.optim.Optimizer,
        *,
        beta: float = 1.0,
        generator_loss: str = "paper",
        noise: torch.Generator | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"unknown generator_loss {generator_loss!r}; choose one of {', '.join(GENERATOR_LOSSES)}")
        self.model, self.generator, self.discriminator = model, generator, discriminator
        self.classifier_optimizer = classifier_optimizer
        self.generator_optimizer = generator_optimizer
        self.discriminator_optimizer = discriminator_optimizer
        self.confidence = OutlierObjective(ConfidenceLoss(beta))
        self.beta = float(beta)
        self.generator_loss = generator_loss
        self.noise = noise
        self.max_grad_norm = max_grad_norm

    def latent(self, n: int) -> torch.Tensor:
        """Fresh z for ``n`` samples."""
        return self.generator.latent(n, self.noise)

    # -- the objectives ------------------------------------------------------------
    def discriminator_objective(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``mean log D(x) + mean log(1 - D(G(z)))`` with G's samples detached (to *ascend*)."""
        with torch.no_grad():
            fake = self.generator(z)
        real_logits, fake_logits = self.discriminator(images), self.discriminator(fake)
        return -F.softplus(-real_logits).mean() - F.softplus(fake_logits).mean()

    def generator_objective(self, z: torch.Tensor) -> torch.Tensor:
        """G's GAN term plus ``β mean KL(U || Pθ(y|G(z)))``, the classifier in eval mode (to descend)."""
        fake = self.generator(z)
        logits = self.discriminator(fake)
        # paper: log(1 - D(G(z))) = -softplus(l); non-saturating: -log D(G(z)) = softplus(-l)
        gan = -F.softplus(logits).mean() if self.generator_loss == "paper" else F.softplus(-logits).mean()
        with eval_mode(self.model):
            kl = kl_to_uniform(self.model(fake)).mean()
        return gan + self.beta * kl

    def classifier_objective(self, images: torch.Tensor, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``mean CE(x, y) + β mean KL(U || Pθ(y|G(z)))`` on detached samples, one forward (to descend)."""
        with torch.no_grad():
            fake = self.generator(z)
        return self.confidence(self.model, images, labels, fake)

    # -- the steps ---------------------------------------------------------------------
    def discriminator_step(self, images: torch.Tensor, z: torch.Tensor | None = None) -> float:
        """Ascend D's objective one step; returns its value before the step."""
        objective = self.discriminator_objective(images, self.latent(len(images)) if z is None else z)
        _descend(-objective, self.discriminator_optimizer, _parameters(self.discriminator), self.max_grad_norm,
                 "discriminator")
        return float(objective.detach())

    def generator_step(self, batch_size: int, z: torch.Tensor | None = None) -> float:
        """Descend G's objective one step (the classifier and D are not updated); returns its value."""
        objective = self.generator_objective(self.latent(batch_size) if z is None else z)
        _descend(objective, self.generator_optimizer, _parameters(self.generator), self.max_grad_norm, "generator")
        return float(objective.detach())

    def classifier_step(self, images: torch.Tensor, labels: torch.Tensor, z: torch.Tensor | None = None) -> float:
        """Descend the classifier's objective one step; returns its value."""
        self.model.train()
        objective = self.classifier_objective(images, labels, self.latent(len(images)) if z is None else z)
        _descend(objective, self.classifier_optimizer, _parameters(self.model), self.max_grad_norm, "classifier")
        return float(objective.detach())

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
        """Algorithm 1 on one batch: D, then G, then the classifier; returns the three objectives."""
        self.generator.train()
        self.discriminator.train()
        d = self.discriminator_step(images)
        g = self.generator_step(len(images))
        c = self.classifier_step(images, labels)
        return d, g, c


@dataclass
class JointEpochRecord(EpochRecord):
    """One epoch of joint training: the classifier's record plus the GAN's mean objectives."""

    discriminator_objective: float = float("nan")
    generator_objective: float = float("nan")


@dataclass
class JointConfidenceRun:
    """What :func:`fit_joint_confidence` returns: the history and the trained GAN (the model is trained in place)."""

    history: TrainingHistory
    generator: DCGANGenerator
    discriminator: DCGANDiscriminator


def fit_joint_confidence(
    model: nn.Module,
    train_data: Any,
    *,
    beta: float = 1.0,
    epochs: int = 1,
    generator_loss: str = "paper",
    generator: DCGANGenerator | None = None,
    discriminator: DCGANDiscriminator | None = None,
    latent_dim: int = 100,
    gan_width: int = 64,
    gan_lr: float = 2e-4,
    gan_betas: tuple[float, float] = (0.5, 0.999),
    optimizer: str = "adam",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str = "step",
    milestones: Sequence[float] = (0.6,),
    warmup_epochs: float = 0.0,
    batch_size: int = 128,
    augment: bool = False,
    seed: int = 0,
    eval_data: Iterable | Any | None = None,
    max_grad_norm: float | None = None,
    progress: bool | None = None,
) -> JointConfidenceRun:
    """Train ``model`` in place jointly with a boundary-sample GAN (Lee et al. 2018, Algorithm 1).

    Defaults follow the paper and the authors' code: Adam (lr 2e-4) for the
    classifier, Adam (lr 2e-4, betas 0.5/0.999) for G and D, every learning
    rate x0.1 at 60% of training, z ~ N(0, I) of size 100, no augmentation
    and no weight decay. The classifier's settings (``optimizer``, ``lr``,
    ``weight_decay``, ``schedule``, ``augment``...) mean what they mean in
    :func:`~timm_ood.training.fit`, so a comparison can train every method with
    one recipe; the GAN's learning rates follow the same schedule.

    Args:
        model: a timm model (any ``nn.Module`` returning logits that
            ``model_info.data_config`` can read for the GAN's input size).
        train_data: a DataLoader / iterable of ``(images, labels)`` batches or a Hugging Face ``Dataset``,
            loaded with the model's data config (as for ``fit``).
        beta: β of Eq. 4, in the G and the classifier steps.
        epochs: passes over ``train_data``; each batch runs the three updates.
        generator_loss: ``"paper"`` (``log(1 - D(G(z)))``) or ``"non-saturating"``.
        generator / discriminator: bring your own (default: DCGANs sized to the model).
        latent_dim / gan_width: of the default DCGANs.
        gan_lr / gan_betas: Adam settings of G and D.
        optimizer / lr / weight_decay / momentum: the classifier's optimiser.
        schedule: ``"step"`` (x0.1 at ``milestones``), ``"cosine"`` or ``"constant"``, for all three.
        milestones: fractions of training where ``"step"`` divides the rates by 10.
        warmup_epochs: linear warm-up of all three rates.
        batch_size: images per batch when ``train_data`` is a ``Dataset``.
        augment: random shifts and flips of the ID batch (as ``fit``).
        seed: seeds the default G and D's initialisation, shuffling, augmentation and z (the
            classifier's weights come from when it was created, as in ``fit``).
        eval_data: labelled batches or a Hugging Face dataset to report accuracy on after each epoch.
        max_grad_norm: clip each step's gradient norm.
        progress: tqdm bars (default: on a terminal).

    Returns:
        :class:`JointConfidenceRun`: per-epoch history (classifier loss, GAN
        objectives, accuracy) and the trained generator and discriminator. The
        model, G and D are left in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    device = model_device(model)
    generator = (generator or DCGANGenerator.for_model(model, latent_dim=latent_dim, width=gan_width)).to(device)
    discriminator = (discriminator or DCGANDiscriminator.for_model(model, width=gan_width)).to(device)
    augmentation = torch.Generator().manual_seed(seed)
    loader, steps_per_epoch = _scheduled_loader(train_data, model, batch_size, seed)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    optimizers = (
        make_optimizer(_parameters(model), optimizer, lr, weight_decay, momentum),
        torch.optim.Adam(_parameters(generator), lr=gan_lr, betas=gan_betas),
        torch.optim.Adam(_parameters(discriminator), lr=gan_lr, betas=gan_betas),
    )
    schedulers = [make_schedule(o, schedule, total, warmup, milestones=milestones) for o in optimizers]
    trainer = JointConfidenceTrainer(
        model, generator, discriminator, *optimizers, beta=beta, generator_loss=generator_loss,
        noise=torch.Generator().manual_seed(seed + 1), max_grad_norm=max_grad_norm,
    )
    history = TrainingHistory()
    for epoch in range(1, epochs + 1):
        start, seen = time.perf_counter(), 0
        sums = torch.zeros(3, dtype=torch.float64)
        bar = tqdm(iter_batches(loader), total=steps_per_epoch, desc=f"joint epoch {epoch}/{epochs}", leave=False,
                   disable=None if progress is None else not progress)
        for images, labels in bar:
            images, labels = _training_batch(images, labels, device, augment, augmentation)
            values = trainer.step(images, labels)
            for scheduler in schedulers:
                scheduler.step()
            sums += torch.tensor(values, dtype=torch.float64) * len(images)
            seen += len(images)
            bar.set_postfix(loss=f"{sums[2] / seen:.4f}")
        means = (sums / max(seen, 1)).tolist()
        record = JointEpochRecord(epoch, means[2], schedulers[0].get_last_lr()[0], time.perf_counter() - start,
                                  discriminator_objective=means[0], generator_objective=means[1])
        if eval_data is not None:
            record.accuracy = accuracy(model, eval_data)
        history.epochs.append(record)
    model.eval()
    generator.eval()
    discriminator.eval()
    return JointConfidenceRun(history, generator, discriminator)
