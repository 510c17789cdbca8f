"""VIB and VIBY: a stochastic Gaussian bottleneck with learned priors (Sreeramdas & Sarawagi, Sec. 3, Eq. 5-7).

::

    training.replace_head(model, "vib", latent_dim=64)    # one learned prior
    training.fit(model, data, loss=training.VIBLoss(beta=0.005), epochs=5)
    timm_ood.wrap(model, "vib")                            # KL(q(z|x) || prior) = -log r(x)

    training.replace_head(model, "viby", latent_dim=64)   # one learned prior per class
    training.fit(model, data, loss=training.VIBYLoss(beta=0.01), epochs=5)
    timm_ood.wrap(model, ["viby-1", "viby-2"])

The head maps the pre-logits h to a diagonal Gaussian posterior
``q(z|x) = N(μ(h), diag σ²(h))`` over R^z, decodes a latent to class logits,
and holds the learned Gaussian prior(s). In training mode its ``forward``
decodes one reparameterised sample ``z = μ + σ ε``; in eval mode it decodes
the posterior mean ``μ`` (deterministic predictions and scores). The losses
(:class:`VIBLoss`, :class:`VIBYLoss`) are :class:`~timm_ood.training.Objective` s
that call the head explicitly for the posterior and the KL; the detectors
(``vib``, ``viby-1``, ``viby-2``) read the pre-logits and do the same.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .heads import HEAD_KINDS, ReplacementHead, installed_head, pre_logits
from .objectives import Objective

__all__ = ["GaussianBottleneckHead", "VIBHead", "VIBLoss", "VIBYHead", "VIBYLoss", "gaussian_kl"]


def gaussian_kl(
    mean_q: torch.Tensor, log_variance_q: torch.Tensor, mean_p: torch.Tensor, log_variance_p: torch.Tensor
) -> torch.Tensor:
    """``KL(N(μ_q, diag σ_q²) || N(μ_p, diag σ_p²))`` in closed form, summed over the last dimension.

    ``KL = ½ Σ_d [log σ_p² - log σ_q² + (σ_q² + (μ_q - μ_p)²) / σ_p² - 1]``.
    The arguments broadcast: a posterior ``[B, 1, z]`` against priors
    ``[P, z]`` gives ``[B, P]``.
    """
    return 0.5 * (log_variance_p - log_variance_q
                  + (log_variance_q.exp() + (mean_q - mean_p).pow(2)) * torch.exp(-log_variance_p)
                  - 1).sum(dim=-1)


class GaussianBottleneckHead(ReplacementHead):
    """A stochastic Gaussian bottleneck (Alemi et al., Deep VIB) on the pre-logits, with learned priors.

    Encoder: one linear layer ``h -> (μ, log σ²)`` (the backbone is the body of
    the encoder; the paper does not say more). Decoder: one linear layer
    ``z -> logits``. Priors: ``num_priors`` learned diagonal Gaussians
    ``N(m_j, diag s_j²)`` (means and log-variances are parameters, initialised
    to N(0, I); weight decay pulls them back towards it). A single Gaussian
    rather than Alemi et al.'s mixture, so every KL has a closed form.

    Args:
        in_features: D, the pre-logits width.
        num_classes: K.
        latent_dim: z (64, the paper's).
        num_priors: how many priors (1 for VIB, K for VIBY).
    """

    def __init__(self, in_features: int, num_classes: int, latent_dim: int = 64, *, num_priors: int = 1) -> None:
        super().__init__(in_features, num_classes)
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim!r}")
        self.latent_dim = int(latent_dim)
        self.encoder = nn.Linear(in_features, 2 * self.latent_dim)
        self.decoder = nn.Linear(self.latent_dim, num_classes)
        self.prior_mean = nn.Parameter(torch.zeros(num_priors, self.latent_dim))
        self.prior_log_variance = nn.Parameter(torch.zeros(num_priors, self.latent_dim))

    def options(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim}

    def posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean μ and log-variance log σ², each [B, z], of pre-logits [B, D]."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects pre-logits [B, {self.in_features}], "
                             f"got shape {tuple(features.shape)}")
        mean, log_variance = self.encoder(features).chunk(2, dim=1)
        return mean, log_variance

    @staticmethod
    def sample(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        """One reparameterised sample ``μ + σ ε``, ε ~ N(0, I) (differentiable in μ and σ)."""
        return mean + torch.exp(0.5 * log_variance) * torch.randn_like(mean)

    def kl_to_priors(self, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        """``KL(q(z|x) || prior_j)`` for every posterior row and prior: [B, z] -> [B, num_priors].

        Computed in the posterior's dtype (pass float64 posteriors for float64 KLs).
        """
        prior_mean = self.prior_mean.to(mean.dtype)
        prior_log_variance = self.prior_log_variance.to(mean.dtype)
        return gaussian_kl(mean[:, None, :], log_variance[:, None, :], prior_mean, prior_log_variance)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of one posterior sample in training mode, of the posterior mean in eval mode."""
        mean, log_variance = self.posterior(features)
        return self.decoder(self.sample(mean, log_variance) if self.training else mean)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.out_features}, latent_dim={self.latent_dim}, "
                f"num_priors={self.prior_mean.shape[0]}")


class VIBHead(GaussianBottleneckHead):
    """VIB's head (survey Eq. 5): a Gaussian bottleneck with one learned prior.

    Args:
        in_features: D, the pre-logits width.
        num_classes: K.
        latent_dim: z (64).
    """

    kind = "vib"

    def __init__(self, in_features: int, num_classes: int, latent_dim: int = 64) -> None:
        super().__init__(in_features, num_classes, latent_dim, num_priors=1)


class VIBYHead(GaussianBottleneckHead):
    """VIBY's head (survey Eq. 6-7): a Gaussian bottleneck with one learned prior per class.

    All K priors start at N(0, I); :class:`VIBYLoss` pulls each towards its
    class's posteriors, so they separate as the classes do.

    Args:
        in_features: D, the pre-logits width.
        num_classes: K (also the number of priors).
        latent_dim: z (64).
    """

    kind = "viby"

    def __init__(self, in_features: int, num_classes: int, latent_dim: int = 64) -> None:
        super().__init__(in_features, num_classes, latent_dim, num_priors=num_classes)


HEAD_KINDS.update({VIBHead.kind: VIBHead, VIBYHead.kind: VIBYHead})


class _BottleneckLoss(Objective):
    """``CE(decoder(z), y) + β mean_i KL_i`` with z one reparameterised posterior sample per input."""

    head_type: type[GaussianBottleneckHead] = GaussianBottleneckHead

    def __init__(self, beta: float) -> None:
        super().__init__()
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.beta = float(beta)

    @abstractmethod
    def kl(self, head: GaussianBottleneckHead, mean: torch.Tensor, log_variance: torch.Tensor,
           targets: torch.Tensor) -> torch.Tensor:
        """The per-input KL term [B]."""

    def forward(self, model, images, targets, outliers=None):
        head = installed_head(model, (self.head_type,), type(self).__name__)
        assert isinstance(head, GaussianBottleneckHead)  # installed_head returns one of the kinds it is given
        mean, log_variance = head.posterior(pre_logits(model, images))
        logits = head.decoder(head.sample(mean, log_variance))
        return F.cross_entropy(logits, targets) + self.beta * self.kl(head, mean, log_variance, targets).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class VIBLoss(_BottleneckLoss):
    """VIB's objective (Alemi et al. 2017, Eq. 7; survey Eq. 5 trains with it): ``CE + β KL(q(z|x) || prior)``.

    The survey never writes the objective; β is the weight of the KL in the
    standard VIB loss. Both terms are means over the batch; the
    cross-entropy is of one reparameterised sample per input (a choice: the
    paper does not give the number of training samples; Alemi et al. found
    one enough). The prior is learned jointly (its parameters live in the head).

    Args:
        beta: β >= 0 (0.005, the paper's for VIB).

    Raises (on call):
        IncompatibleModelError: the model's classifier is not a :class:`VIBHead`.
    """

    head_type = VIBHead

    def __init__(self, beta: float = 0.005) -> None:
        super().__init__(beta)

    def kl(self, head, mean, log_variance, targets):
        return head.kl_to_priors(mean, log_variance)[:, 0]


class VIBYLoss(_BottleneckLoss):
    """VIBY's objective: ``CE + β KL(q(z|x) || prior_y)``, the KL to the *true class's* prior.

    The paper does not say which prior a training input is pulled towards;
    the true class's is the class-conditional reading (a per-class prior
    ``p(z|y)``), and it is what lets each prior model its class. Means over
    the batch, one reparameterised sample per input, as :class:`VIBLoss`.

    Args:
        beta: β >= 0 (0.01, the paper's for VIBY).

    Raises (on call):
        IncompatibleModelError: the model's classifier is not a :class:`VIBYHead`.
    """

    head_type = VIBYHead

    def __init__(self, beta: float = 0.01) -> None:
        super().__init__(beta)

    def kl(self, head, mean, log_variance, targets):
        prior_mean = head.prior_mean[targets].to(mean.dtype)
        prior_log_variance = head.prior_log_variance[targets].to(mean.dtype)
        return gaussian_kl(mean, log_variance, prior_mean, prior_log_variance)
