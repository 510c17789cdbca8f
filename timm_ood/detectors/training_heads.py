"""Scores read from the heads of BIN/BINC and VIB/VIBY training (Sreeramdas & Sarawagi, Sec. 3, Eq. 3-7).

Each detector needs the matching head installed by
:func:`timm_ood.training.replace_head` (and trained with its loss); on another
model it raises :class:`~timm_ood.errors.IncompatibleModelError` when wrapped.
The paper's scores are confidences r in [0, 1], higher = in-distribution; each
is returned as ``-log r`` (strictly decreasing in r, so every ranking metric is
the same), in float64: ``exp(-KL)`` and a saturated sigmoid tie in float32
where ``-log r`` keeps the order.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import IncompatibleModelError
from ..hookspecs import hookimpl
from ..model_info import timm_api
from ..tap import Need, Outputs, Tap
from ..training.bottleneck import GaussianBottleneckHead, VIBHead, VIBYHead
from ..training.heads import ReplacementHead
from ..training.sigmoid_heads import BINCHead, BINHead
from .base import Detector, Requirements

__all__ = ["BinaryMaxSigmoid", "ClassPriorKL", "ExpectedClassPriorKL", "PriorKL"]

_PAPER = "Sreeramdas & Sarawagi, Out-of-distribution image detection with deep neural networks"


class _HeadDetector(Detector):
    """A detector reading the pre-logits through a replaced head of one of :attr:`head_types`."""

    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}))
    head_types: ClassVar[tuple[type[ReplacementHead], ...]] = ()

    def check_model(self, tap: Tap) -> None:
        super().check_model(tap)
        self._head(tap)

    def _head(self, tap: Tap):
        classifier = timm_api(tap.model).get_classifier()
        if not isinstance(classifier, self.head_types):
            kinds = " or ".join(repr(head.kind) for head in self.head_types)
            raise IncompatibleModelError(
                f"detector {self.name!r} reads a {kinds} head, but this model's classifier is a "
                f"{type(classifier).__name__}: install it with training.replace_head(model, "
                f"{self.head_types[0].kind!r}) and train with its loss, or choose another detector"
            )
        return classifier


class BinaryMaxSigmoid(_HeadDetector):
    """BIN/BINC's score (survey Sec. 3): ``r = max_c σ(p_c)`` of the K sigmoids; returns ``-log r``.

    ``-log σ(max_c p_c) = softplus(-max_c p_c)``. On a BINC model ``p`` are the
    sigmoid head's logits (the softmax head gives the predictions); the paper
    leaves which head scores unsaid, and only the sigmoid head is calibrated
    by MMCE for this.
    """

    name = "bin"
    paper = f"{_PAPER}, Sec. 3 (BIN, BINC): r = max_c sigmoid(p_c)"
    head_types = (BINHead, BINCHead)

    def score(self, outputs: Outputs) -> torch.Tensor:
        logits = self._head(outputs.tap).binary_logits(outputs.pre_logits).to(torch.float64)
        return F.softplus(-logits.amax(dim=1))


class _BottleneckDetector(_HeadDetector):
    def posterior_kl(self, outputs: Outputs) -> tuple[GaussianBottleneckHead, torch.Tensor, torch.Tensor]:
        """The head, the posterior mean [B, z] and ``KL(q(z|x) || prior_j)`` [B, P] in float64."""
        head = self._head(outputs.tap)
        mean, log_variance = head.posterior(outputs.pre_logits)
        return head, mean, head.kl_to_priors(mean.to(torch.float64), log_variance.to(torch.float64))


class PriorKL(_BottleneckDetector):
    """VIB's score (survey Eq. 5): ``r = exp(-KL(q(z|x) || prior))``; returns ``-log r = KL``."""

    name = "vib"
    paper = f"{_PAPER}, Eq. 5 (VIB)"
    head_types = (VIBHead,)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.posterior_kl(outputs)[2][:, 0]


class ExpectedClassPriorKL(_BottleneckDetector):
    """VIBY's r_I (survey Eq. 6): ``exp(-Σ_y P(y|x) KL(q(z|x) || prior_y))``; returns the exponent.

    ``P(y|x)`` is the softmax of the decoder at the posterior mean, the
    model's own eval-mode prediction (a choice: the paper does not say mean
    latent or Monte-Carlo average; the mean keeps the score deterministic).
    """

    name = "viby-1"
    paper = f"{_PAPER}, Eq. 6 (VIBY, r_I)"
    head_types = (VIBYHead,)

    def score(self, outputs: Outputs) -> torch.Tensor:
        head, mean, kl = self.posterior_kl(outputs)
        probabilities = torch.softmax(head.decoder(mean).to(torch.float64), dim=1)
        return (probabilities * kl).sum(dim=1)


class ClassPriorKL(_BottleneckDetector):
    """VIBY's r_II (survey Eq. 7): ``exp(-min_y KL(q(z|x) || prior_y))``; returns ``min_y KL``."""

    name = "viby-2"
    paper = f"{_PAPER}, Eq. 7 (VIBY, r_II)"
    head_types = (VIBYHead,)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return self.posterior_kl(outputs)[2].amin(dim=1)


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [BinaryMaxSigmoid, PriorKL, ExpectedClassPriorKL, ClassPriorKL]
