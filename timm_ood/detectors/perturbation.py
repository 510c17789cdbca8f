"""Input preprocessing shared by ODIN and Mahalanobis: one signed-gradient step.

``x̃ = x - ε · sign(∇_x L(x)) / σ`` where ``L`` is a loss whose *decrease* makes
the input look more in-distribution (cross-entropy against the predicted label
for ODIN, the distance to the closest class for Mahalanobis), ``ε`` is in
[0, 1] pixel units and ``σ`` is the model's per-channel normalisation std, so
the step is ``ε`` in pixel space although the model sees normalised inputs
(ODIN's released code, ``methods/odin.md`` Sec. 1 and pitfall 4). No clipping
and no quantisation, as in that code.

The gradient sign depends only on the loss (for ODIN: on T, not on ε), so a
grid over ε reuses one backward pass per T (:func:`gradient_sign` then
:func:`signed_step`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["gradient_sign", "signed_step"]


def gradient_sign(x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sign(∇_x loss(x))`` for a batch, with autograd on regardless of the caller's mode.

    ``loss`` must return a scalar that is a *sum* over the batch: a mean would
    shrink every gradient by the batch size, and at T = 1000 float32 gradients
    underflow to zero (``methods/odin.md`` pitfall 5). Samples stay independent
    as long as the model is in eval mode.
    """
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(leaf), leaf)
    return torch.sign(grad)


def signed_step(
    x: torch.Tensor, sign: torch.Tensor, epsilon: float | torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """``x - epsilon * sign / std``: a descent step of ``epsilon`` pixel units on normalised inputs.

    ``epsilon`` is a number, or a tensor broadcasting against ``x`` (one ε per image: [B, 1, 1, 1]).
    """
    if not isinstance(epsilon, torch.Tensor) and epsilon == 0:
        return x
    return x - (epsilon * sign) / std
