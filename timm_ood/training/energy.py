"""Energy-bounded training (Liu et al. 2020) and GReg's gradient regularisation (Sharifi et al. 2024).

- :func:`energy_score` ``S(x) = -logsumexp(f(x))``: lower means in-distribution
  (the score the ``energy`` detector reports at temperature 1).
- :func:`energy_margin_loss` ``L_S`` (GReg Eq. 1, Liu et al. 2020 Eq. 6): squared
  hinges on the ID energies above ``m_in`` and the auxiliary energies below ``m_out``.
- :class:`EnergyLoss` ``(logits_in, targets, logits_out)``: ``CE + λ_S L_S``, for
  :func:`timm_ood.training.fit` with ``outliers=``.
- :class:`GRegObjective`: ``CE + λ_S L_S + λ_∇S L_∇S`` (GReg Eq. 3), the input
  gradient of the masked energy hinge taken by double backprop.
- :func:`energy_input_gradient_norms` ``||∇_x S(x)||_2`` per image: what GReg's
  Fig. 3 plots per epoch (mean over ID and over auxiliary images).

The margins default to the GReg authors' code (``m_in = -25``, ``m_out = -7``):
the seed's values are stripped, and Liu et al. use -23/-5 (CIFAR-10) and
-27/-5 (CIFAR-100). The published GReg version calls ``m_out`` ``m_aux``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IncompatibleModelError
from ..free_energy import free_energy
from .objectives import Objective

__all__ = ["EnergyLoss", "GRegObjective", "GRegTerms", "energy_input_gradient_norms", "energy_margin_loss",
           "energy_score"]

GradientScaling = Literal["batch-mean", "per-sample"]
GRADIENT_SCALINGS: tuple[str, ...] = ("batch-mean", "per-sample")
DEFAULT_M_IN, DEFAULT_M_OUT = -25.0, -7.0


#: the energy ``S(x) = -log Σ_k exp(f_k(x))`` of each row of ``logits`` (GReg's name for it; lower = ID):
#: :func:`timm_ood.free_energy.free_energy` at T = 1, the same function the ``energy`` detector scores with
energy_score = free_energy


def energy_input_gradient_norms(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``||∇_x S(x)||_2`` of every image, the model in eval mode (GReg, Sharifi et al. 2024, Fig. 3).

    The gradient is with respect to the model's input (normalised pixels), as in
    :class:`GRegObjective`, but of the plain energy ``S`` (not the masked hinge),
    one image at a time in effect: the energies are summed over a batch, and in
    eval mode no image's energy depends on another's. The model's mode and its
    parameters' gradients are left as they were.

    Args:
        model: the classifier (logits out).
        images: [N, ...] model inputs.
        batch_size: images per backward pass.

    Returns:
        [N] float32 norms, on the images' device.
    """
    was_training = model.training
    model.eval()
    norms = []
    try:
        for start in range(0, len(images), batch_size):
            inputs = images[start:start + batch_size].detach().requires_grad_(True)
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(energy_score(model(inputs)).sum(), inputs)
            norms.append(gradient.flatten(1).norm(dim=1).float())
    finally:
        model.train(was_training)
    return torch.cat(norms) if norms else images.new_zeros(0)


def energy_margin_loss(
    logits_in: torch.Tensor, logits_out: torch.Tensor, m_in: float = DEFAULT_M_IN, m_out: float = DEFAULT_M_OUT
) -> torch.Tensor:
    """``L_S`` of GReg Eq. 1 (Liu et al. 2020, Eq. 6): squared hinges on the energy.

    ``L_S = mean_in max(0, S(x) - m_in)^2 + mean_aux max(0, m_out - S(x'))^2``:
    an ID sample whose energy is already below ``m_in``, or an auxiliary sample
    whose energy is already above ``m_out``, adds nothing. Each term is a mean
    over its own batch, as in both papers' code.

    Args:
        logits_in: in-distribution logits [B, K].
        logits_out: auxiliary outlier logits [N, K].
        m_in: the ID margin.
        m_out: the auxiliary margin (``m_aux``).

    Returns:
        The scalar loss.

    Raises:
        ValueError: an empty outlier batch, or a different number of classes.
    """
    _check_outlier_logits(logits_in, logits_out)
    return (F.relu(energy_score(logits_in) - m_in).square().mean()
            + F.relu(m_out - energy_score(logits_out)).square().mean())


def _check_outlier_logits(logits_in: torch.Tensor, logits_out: torch.Tensor) -> None:
    if logits_out.ndim != 2 or logits_out.shape[0] == 0:
        raise ValueError(f"the energy loss needs a non-empty batch of outlier logits [N, K], got shape "
                         f"{tuple(logits_out.shape)}")
    if logits_out.shape[1] != logits_in.shape[1]:
        raise ValueError(f"in-distribution logits have {logits_in.shape[1]} classes but outlier logits have "
                         f"{logits_out.shape[1]}")


def _check_margins(m_in: float, m_out: float) -> None:
    if not m_in < m_out:
        raise ValueError(f"the margins must satisfy m_in < m_out (ID energies are pushed below m_in, outliers' above "
                         f"m_out), got m_in={m_in!r}, m_out={m_out!r}")


class EnergyLoss(nn.Module):
    """Energy-bounded learning (Liu, Wang, Owens & Li, NeurIPS 2020, Eq. 6; GReg Eq. 1) with an outlier batch.

    ``L = CE(f(x), y) + λ_S L_S`` with ``L_S`` the squared energy hinges of
    :func:`energy_margin_loss`. Pair it with the ``energy`` detector.

    Args:
        m_in: ID margin (default -25, the GReg code's; Liu et al.: -23 on CIFAR-10, -27 on CIFAR-100).
        m_out: auxiliary margin (default -7, the GReg code's; Liu et al.: -5).
        energy_weight: ``λ_S`` >= 0 (0.1, both papers').

    Raises:
        ValueError: ``m_in >= m_out`` or a negative weight; on call, a bad outlier batch.
    """

    def __init__(self, m_in: float = DEFAULT_M_IN, m_out: float = DEFAULT_M_OUT, energy_weight: float = 0.1) -> None:
        super().__init__()
        _check_margins(m_in, m_out)
        if not energy_weight >= 0:
            raise ValueError(f"energy_weight must be >= 0, got {energy_weight!r}")
        self.m_in, self.m_out, self.energy_weight = float(m_in), float(m_out), float(energy_weight)

    def forward(self, logits_in: torch.Tensor, targets: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(logits_in, targets)
                + self.energy_weight * energy_margin_loss(logits_in, logits_out, self.m_in, self.m_out))

    def extra_repr(self) -> str:
        return f"m_in={self.m_in:g}, m_out={self.m_out:g}, energy_weight={self.energy_weight:g}"


class GRegTerms(NamedTuple):
    """The three terms of one GReg step (each a scalar with its graph)."""

    cross_entropy: torch.Tensor
    energy: torch.Tensor
    gradient: torch.Tensor


class GRegObjective(Objective):
    """GReg (Sharifi et al., Gradient-Regularized OOD Detection, ECCV 2024, Eq. 1-3) as a training objective.

    ``L = CE + λ_S L_S + λ_∇S L_∇S`` with ``L_S`` the energy hinges of Eq. 1 and
    (Eq. 3) ``L_∇S = mean over ID and auxiliary samples of ||∇_x h(x)||_2``,
    where ``h(x) = max(0, m_in - S(x))`` on ID samples and
    ``h(x') = max(0, S(x') - m_out)`` on auxiliary ones: the gradient of the
    energy is penalised only on samples already beyond their margin (the
    "correctly detected" ones), the side opposite to ``L_S``. The gradient is
    with respect to the model's input (the normalised pixels), taken exactly by
    double backprop (``create_graph=True``), not by finite differences.

    Choices the paper leaves open, made here:

    - One forward, in train mode, over ``cat(ID, outliers)`` gives CE, ``L_S``
      and the input gradient. The authors' code runs a second forward for the
      gradient; with BatchNorm both couple the samples of the batch through the
      batch statistics, as here, but their running statistics update twice.
    - ``gradient_scaling="batch-mean"`` (default) reproduces the authors' code,
      which differentiates ``mean_in h + mean_aux h``: each sample's gradient
      norm carries a factor ``1 / (its group's batch size)`` before the mean over
      all samples. ``λ_∇S = 1`` was chosen with this scaling.
      ``"per-sample"`` is Eq. 3 as written (each norm unscaled); with
      ``λ_∇S = 1`` it is about a batch size times stronger.
    - The norm is the L2 norm over all input elements of a sample.

    Pair it with the ``energy`` detector. GReg+ adds energy-based outlier
    sampling: pass an :class:`~timm_ood.training.EnergyClusterSampler` as ``outliers``.

    Args:
        m_in: ID margin (default -25, the authors' code; the seed's value is stripped).
        m_out: auxiliary margin (default -7, the authors' code).
        energy_weight: ``λ_S`` >= 0 (0.1).
        gradient_weight: ``λ_∇S`` >= 0 (1).
        gradient_scaling: ``"batch-mean"`` (the authors' code) or ``"per-sample"`` (Eq. 3 literally).

    Raises:
        ValueError: bad margins, weights or scaling; on call, no outlier batch.
        IncompatibleModelError: on the first call, an architecture whose
            operations have no double backward (e.g. fused attention on CPU);
            to find out, the first step for each model differentiates the
            penalty once more (one extra backward).
    """

    uses_outliers = True

    def __init__(
        self,
        m_in: float = DEFAULT_M_IN,
        m_out: float = DEFAULT_M_OUT,
        energy_weight: float = 0.1,
        gradient_weight: float = 1.0,
        gradient_scaling: GradientScaling = "batch-mean",
    ) -> None:
        super().__init__()
        _check_margins(m_in, m_out)
        for name, value in (("energy_weight", energy_weight), ("gradient_weight", gradient_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if gradient_scaling not in GRADIENT_SCALINGS:
            raise ValueError(f"unknown gradient_scaling {gradient_scaling!r}; choose one of "
                             f"{', '.join(GRADIENT_SCALINGS)}")
        self.m_in, self.m_out = float(m_in), float(m_out)
        self.energy_weight, self.gradient_weight = float(energy_weight), float(gradient_weight)
        self.gradient_scaling = gradient_scaling
        self._double_backward_checked: set[int] = set()

    def terms(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, outliers: torch.Tensor
    ) -> GRegTerms:
        """CE, ``L_S`` and ``L_∇S`` of one step, unweighted, with their graphs.

        Args:
            model: the classifier, in the mode to train in.
            images: ID images [B, ...]; targets: their labels [B].
            outliers: auxiliary images [N, ...] (same image shape).

        Returns:
            ``GRegTerms(cross_entropy, energy, gradient)``: CE on the ID
            images, ``L_S`` (Eq. 1) and ``L_∇S`` (Eq. 3, with this objective's scaling).

        Raises:
            ValueError: an empty outlier batch or mismatched image shapes.
            IncompatibleModelError: the model cannot be differentiated twice.
        """
        if outliers.shape[0] == 0 or outliers.shape[1:] != images.shape[1:]:
            raise ValueError(f"GReg needs a non-empty outlier batch shaped like the ID images {tuple(images.shape[1:])},"
                             f" got {tuple(outliers.shape)}")
        inputs = torch.cat([images, outliers]).requires_grad_(True)
        logits = model(inputs)
        count_in = len(images)
        energy = energy_score(logits)
        hinges = torch.cat([F.relu(self.m_in - energy[:count_in]), F.relu(energy[count_in:] - self.m_out)])
        if self.gradient_scaling == "batch-mean":
            group_sizes = torch.cat([inputs.new_full((count_in,), count_in),
                                     inputs.new_full((len(outliers),), len(outliers))])
            hinges = hinges / group_sizes
        (input_gradient,) = torch.autograd.grad(hinges.sum(), inputs, create_graph=True)
        gradient_penalty = input_gradient.flatten(1).norm(dim=1).mean()
        self._check_double_backward(model, gradient_penalty)
        return GRegTerms(
            F.cross_entropy(logits[:count_in], targets),
            energy_margin_loss(logits[:count_in], logits[count_in:], self.m_in, self.m_out),
            gradient_penalty,
        )

    def forward(self, model, images, targets, outliers=None):
        if outliers is None:
            raise ValueError("GRegObjective needs an auxiliary outlier batch: pass outliers=... to training.fit")
        cross_entropy, energy, gradient = self.terms(model, images, targets, outliers)
        return cross_entropy + self.energy_weight * energy + self.gradient_weight * gradient

    def _check_double_backward(self, model: nn.Module, gradient_penalty: torch.Tensor) -> None:
        """Once per model: differentiate the penalty, so a missing double backward fails here, by name."""
        if id(model) in self._double_backward_checked or not gradient_penalty.requires_grad:
            return
        parameters = [p for p in model.parameters() if p.requires_grad]
        try:
            torch.autograd.grad(gradient_penalty, parameters, retain_graph=True, allow_unused=True)
        except RuntimeError as error:
            config = getattr(model, "pretrained_cfg", None)
            architecture = config.get("architecture") if isinstance(config, dict) else None
            raise IncompatibleModelError(
                f"GReg differentiates the input gradient (double backward), which {architecture or type(model).__name__}"
                f" does not support here: {error}. For timm attention models, turn fused attention off "
                f"(timm.layers.set_fused_attn(False) before creating the model, or attn.fused_attn = False on each "
                f"attention module)."
            ) from error
        self._double_backward_checked.add(id(model))

    def extra_repr(self) -> str:
        return (f"m_in={self.m_in:g}, m_out={self.m_out:g}, energy_weight={self.energy_weight:g}, "
                f"gradient_weight={self.gradient_weight:g}, gradient_scaling={self.gradient_scaling!r}")
