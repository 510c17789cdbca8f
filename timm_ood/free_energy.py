"""The free energy of a classifier's logits: one function for the detectors and the training losses.

``E(x) = -T logsumexp(f(x) / T)`` (Liu et al., NeurIPS 2020, Eq. 4). Low energy
means in-distribution, so the energy itself is an OOD score; the energy loss
(Liu et al. Eq. 6) and GReg (Sharifi et al., Eq. 1, where it is written
``S(x)``) train on it at T = 1, and the activation-shaping detectors (ReAct,
ASH, SCALE, DICE, ...) score their reshaped logits with it.
"""

from __future__ import annotations

import torch

__all__ = ["free_energy"]


def free_energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-T logsumexp(logits / T)`` over the last dimension: ``[B, K] -> [B]``, higher = more out-of-distribution.

    Differentiable (training uses it), in the dtype of ``logits``.
    """
    if temperature == 1.0:
        return -torch.logsumexp(logits, dim=-1)
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)
