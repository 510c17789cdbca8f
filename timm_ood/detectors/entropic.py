"""IsoMax's entropic score (Macêdo et al., arXiv 1908.05569, Eq. 6), at inference scale 1."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import Detector
from .logits import Entropy

__all__ = ["EntropicScore"]


class EntropicScore(Entropy):
    """IsoMax's entropic score: an alias of ``entropy`` under the paper's name (the same number).

    Paper score (Eq. 5-6): ``ES(x) = Σ_k p_k log p_k = -H(p)`` with
    ``p = softmax(-d(x))``, ``d_k`` the distance of the pre-logits to
    prototype k; higher = in-distribution, so it is returned negated, as the
    entropy ``H(p)``. On a model whose head is an
    :class:`~timm_ood.training.IsoMaxHead` the logits are ``-d``, so this reads
    the logits. The entropic scale ``E_s`` of training is never applied here:
    the paper infers at scale 1 (``softmax(-E_s d)`` would give other
    entropies, not a monotone transform of these).

    It is registered under its own name so that an IsoMax model is evaluated
    under the paper's detector (and ``SoftMax+ES``, the paper's middle column, is
    this detector on a linear-head model); the computation is
    :class:`~timm_ood.detectors.logits.Entropy`'s.
    """

    name = "entropic"
    paper = "Macêdo et al., Isotropic Maximization Loss and Entropic Score (arXiv 1908.05569), Eq. 6, scale 1"


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [EntropicScore]
