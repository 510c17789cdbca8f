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

:class:`JointConfidenceObjective` is the three updates as an objective that
:func:`~timm_ood.training.fit` runs: its :meth:`~JointConfidenceObjective.update`
makes steps 1 and 2 with G's and D's own optimisers, and ``fit`` makes step 3
with the classifier's, on the objective's loss. :func:`fit_joint_confidence` is
``fit`` with that objective; :class:`JointConfidenceTrainer` runs the three
updates one by one for a loop of your own.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime import eval_mode, model_device
from ..distributed import all_reduce_sum, world
from . import _distributed
from .loop import EpochRecord, TrainingHistory, fit
from .losses import ConfidenceLoss, kl_to_uniform
from .objectives import Objective, OutlierObjective, TrainingPlan

__all__ = [
    "GENERATOR_LOSSES",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "JointConfidenceObjective",
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

    mean: torch.Tensor  # buffers [1, C, 1, 1]
    std: torch.Tensor

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
    """One optimiser step on ``loss`` whose gradients reach ``parameters`` only.

    Under torch.distributed the loss is checked over all ranks and the gradients
    are averaged over them before clipping, as :func:`~timm_ood.training.fit` does.
    """
    world_size = world()[1]
    value = torch.tensor([float(loss.detach())], dtype=torch.float64)
    all_reduce_sum(value)  # a diverging rank stops every rank
    if not math.isfinite(float(value)):
        raise FloatingPointError(f"the {what} loss became {float(value) / world_size}: lower the learning rates "
                                 "or set max_grad_norm")
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=parameters)
    if world_size > 1:
        _distributed.average_gradients(parameters)
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
            optimisers over the three modules' parameters (the classifier's may be
            None where another loop updates it, as :class:`JointConfidenceObjective` in ``fit``).
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
        classifier_optimizer: torch.optim.Optimizer | None,
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
        if self.classifier_optimizer is None:
            raise ValueError("this trainer has no classifier_optimizer: the classifier is updated by another loop")
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


class JointConfidenceObjective(Objective):
    """Lee et al.'s Algorithm 1 as an objective of :func:`~timm_ood.training.fit`.

    Per step, :meth:`update` makes D's and G's updates (1 and 2 of the module
    docstring) with their own Adam optimisers, which follow ``fit``'s learning-rate
    schedule; ``forward`` is the classifier's loss on fresh, detached G samples,
    which ``fit`` descends with the classifier's optimiser (update 3). G and D are
    submodules but not among :meth:`fit_parameters`: ``fit``'s optimiser never sees
    them. Each epoch's record is a :class:`JointEpochRecord`.

    Args:
        beta: β of Eq. 4, in the G and the classifier steps.
        generator_loss: ``"paper"`` (``log(1 - D(G(z)))``) or ``"non-saturating"``.
        generator / discriminator: bring your own (default: DCGANs sized to the model,
            made when ``fit`` starts, after it has seeded the run).
        latent_dim / gan_width: of the default DCGANs.
        gan_lr / gan_betas: Adam settings of G and D.

    z is drawn from a generator seeded with ``fit``'s ``seed + 1`` (``+ rank`` under
    torch.distributed, where G's and D's gradients are averaged over the ranks as
    the classifier's are).
    """

    def __init__(
        self,
        beta: float = 1.0,
        generator_loss: str = "paper",
        *,
        generator: DCGANGenerator | None = None,
        discriminator: DCGANDiscriminator | None = None,
        latent_dim: int = 100,
        gan_width: int = 64,
        gan_lr: float = 2e-4,
        gan_betas: tuple[float, float] = (0.5, 0.999),
    ) -> None:
        super().__init__()
        if generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"unknown generator_loss {generator_loss!r}; choose one of {', '.join(GENERATOR_LOSSES)}")
        self.beta, self.generator_loss = float(beta), generator_loss
        self.generator, self.discriminator = generator, discriminator
        self.latent_dim, self.gan_width = latent_dim, gan_width
        self.gan_lr, self.gan_betas = gan_lr, gan_betas
        self.trainer: JointConfidenceTrainer | None = None
        self._schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        self._sums = torch.zeros(3, dtype=torch.float64)  # D and G objectives x images, images

    def start(self, model: nn.Module, plan: TrainingPlan) -> None:
        """Make G and D (unless given) on the model's device, their optimisers and schedules, and the trainer."""
        device = model_device(model)
        if self.generator is None:
            self.generator = DCGANGenerator.for_model(model, latent_dim=self.latent_dim, width=self.gan_width)
        if self.discriminator is None:
            self.discriminator = DCGANDiscriminator.for_model(model, width=self.gan_width)
        self.generator.to(device)
        self.discriminator.to(device)
        optimizers = [torch.optim.Adam(_parameters(m), lr=self.gan_lr, betas=self.gan_betas)
                      for m in (self.generator, self.discriminator)]
        self._schedulers = [plan.schedule(o) for o in optimizers]
        self.trainer = JointConfidenceTrainer(
            model, self.generator, self.discriminator, None, *optimizers, beta=self.beta,
            generator_loss=self.generator_loss, noise=torch.Generator().manual_seed(plan.seed + 1 + world()[0]),
            max_grad_norm=plan.max_grad_norm,
        )
        self._sums.zero_()

    def _started(self) -> JointConfidenceTrainer:
        if self.trainer is None:
            raise RuntimeError("JointConfidenceObjective runs inside training.fit, which calls start() first")
        return self.trainer

    def update(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
        """D ascends its objective, then G descends its own (the classifier frozen); their schedules step."""
        trainer = self._started()
        assert self.generator is not None and self.discriminator is not None  # start() made both
        self.generator.train()
        self.discriminator.train()
        d = trainer.discriminator_step(images)
        g = trainer.generator_step(len(images))
        for scheduler in self._schedulers:
            scheduler.step()
        self._sums += torch.tensor([d, g, 1.0], dtype=torch.float64) * len(images)

    def forward(self, model, images, targets, outliers=None):
        """The classifier's ``mean CE(x, y) + β mean KL(U || Pθ(y|G(z)))`` on fresh, detached samples."""
        trainer = self._started()
        return trainer.classifier_objective(images, targets, trainer.latent(len(images)))

    def fit_parameters(self) -> Iterator[nn.Parameter]:
        """None: G and D are updated by :meth:`update` with their own optimisers."""
        return iter(())

    def end_epoch(self, record: EpochRecord) -> JointEpochRecord:
        """The record with the epoch's mean D and G objectives (over all ranks' images)."""
        all_reduce_sum(self._sums)
        means = (self._sums[:2] / max(float(self._sums[2]), 1)).tolist()
        self._sums.zero_()
        return JointEpochRecord(**asdict(record), discriminator_objective=means[0], generator_objective=means[1])


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
    one recipe; the GAN's learning rates follow the same schedule. It is ``fit``
    with a :class:`JointConfidenceObjective` (so it runs under torch.distributed as
    ``fit`` does, G and D kept identical on every rank).

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
        progress: tqdm bars (default: on a terminal; only on rank 0 under torch.distributed).

    Returns:
        :class:`JointConfidenceRun`: per-epoch history (classifier loss, GAN
        objectives, accuracy) and the trained generator and discriminator. The
        model, G and D are left in eval mode.
    """
    objective = JointConfidenceObjective(
        beta, generator_loss, generator=generator, discriminator=discriminator, latent_dim=latent_dim,
        gan_width=gan_width, gan_lr=gan_lr, gan_betas=gan_betas,
    )
    history = fit(
        model, train_data, loss=objective, epochs=epochs, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        momentum=momentum, schedule=schedule, milestones=milestones, warmup_epochs=warmup_epochs,
        batch_size=batch_size, augment=augment, seed=seed, eval_data=eval_data, max_grad_norm=max_grad_norm,
        progress=progress,
    )
    assert objective.generator is not None and objective.discriminator is not None  # fit() started the objective
    return JointConfidenceRun(history, objective.generator, objective.discriminator)
