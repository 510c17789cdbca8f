"""IsoMax's entropic score (Macêdo et al., arXiv 1908.05569, Eq. 6), at inference scale 1."""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..tap import Outputs
from .base import Detector

__all__ = ["EntropicScore"]


class EntropicScore(Detector):
    """The entropic score: the entropy of ``softmax(logits)`` at scale 1, higher = more OOD.

    Paper score (Eq. 5-6): ``ES(x) = Σ_k p_k log p_k = -H(p)`` with
    ``p = softmax(-d(x))``, ``d_k`` the distance of the pre-logits features to
    prototype k; higher = in-distribution, so it is returned negated, as the
    entropy ``H(p)``. On a model whose head is an
    :class:`~timm_ood.training.IsoMaxHead` the logits are ``-d``, so this reads
    the logits. The entropic scale ``E_s`` of training is never applied here:
    the paper infers at scale 1 (``softmax(-E_s d)`` would give other
    entropies, not a monotone transform of these). Computed as
    ``-(softmax(z) * log_softmax(z)).sum()`` (free of ``0 log 0``) in float64:
    at scale 1 an IsoMax model's entropies all sit just below ``log K`` and
    float32 would tie inputs whose distance gaps differ slightly.

    Relation to ``entropy``: the same number. ``entropy`` is the generic
    Shannon-entropy baseline for any classifier; ``entropic`` is the IsoMax
    paper's name, listed separately so an IsoMax model is evaluated under the
    paper's detector (and ``SoftMax+ES``, the paper's middle column, is this
    detector on a linear-head model).
    """

    name = "entropic"
    paper = "Macêdo et al., Isotropic Maximization Loss and Entropic Score (arXiv 1908.05569), Eq. 6, scale 1"

    def score(self, outputs: Outputs) -> torch.Tensor:
        log_p = torch.log_softmax(outputs.logits.to(torch.float64), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [EntropicScore]
