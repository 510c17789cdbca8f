"""ODIN: temperature scaling plus input preprocessing (Liang, Li & Srikant, ICLR 2018).

Implemented as ``methods/odin.md`` Sec. 1 specifies:

1. ``ŷ = argmax_i f_i(x)`` from the unperturbed input (the predicted label,
   never the ground truth).
2. Eq. (2): ``x̃ = x - ε · sign(∇_x CE(f(x)/T, ŷ))``; the same T as in the
   score; the loss summed over the batch; the step divided by the model's
   normalisation std so that ε is in [0, 1] pixel units.
3. Eq. (1) at ``x̃``: ``S(x̃; T) = max_i softmax(f(x̃)/T)_i``, returned as
   ``-log S(x̃; T)`` (higher = more OOD, same ranking as ``-S``).

Cost: two forwards and one backward. Run the model in eval mode and float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..tap import Outputs, Tap
from .base import Detector, Requirements
from .logits import TEMPERATURE_GRID, check_temperature, negative_log_max_softmax
from .perturbation import gradient_sign, signed_step

__all__ = ["EPSILON_GRID", "ODIN", "odin_gradient_sign", "odin_scores"]

#: ODIN's ε grid: 21 evenly spaced values from 0 to 0.004 (Sec. 4.4).
EPSILON_GRID: tuple[float, ...] = tuple(round(0.0002 * i, 4) for i in range(21))


def odin_gradient_sign(tap: Tap, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sign(∇_x CE(f(x)/T, ŷ))`` with ŷ the prediction on ``x`` (Eq. 2)."""

    def loss(inputs: torch.Tensor) -> torch.Tensor:
        logits = tap.logits(inputs)
        predicted = logits.detach().argmax(dim=1)
        return F.cross_entropy(logits / temperature, predicted, reduction="sum")

    return gradient_sign(x, loss)


def odin_scores(
    tap: Tap,
    x: torch.Tensor,
    temperature: float,
    epsilon: float,
    std: torch.Tensor | None = None,
    sign: torch.Tensor | None = None,
) -> torch.Tensor:
    """ODIN scores ``-log S(x̃; T)`` for a batch; ``sign`` may be precomputed for this T."""
    if epsilon != 0:
        if sign is None:
            sign = odin_gradient_sign(tap, x, temperature)
        x = signed_step(x, sign, epsilon, tap.input_std(x) if std is None else std)
    return negative_log_max_softmax(tap.logits(x), temperature)


class ODIN(Detector):
    """ODIN (Liang, Li & Srikant, ICLR 2018, Eq. 1-2): temperature + input preprocessing.

    Args:
        temperature: T > 0, in both the gradient and the score (paper grid
            1..1000; 1000 chosen in most settings).
        epsilon: perturbation magnitude in [0, 1] pixel units (grid 0..0.004;
            0.0014 chosen for DenseNet on CIFAR-10).
        std: per-channel normalisation std of the inputs; default the model's
            own from ``pretrained_cfg`` (via timm's data config).

    With ``temperature=1, epsilon=0`` it is exactly :class:`~timm_ood.detectors.logits.MSP`.
    """

    name = "odin"
    paper = "Liang, Li & Srikant, Enhancing the Reliability of OOD Image Detection (ODIN), ICLR 2018, Eq. 1-2"
    requirements = Requirements(outputs=frozenset(), input_gradients=True)
    search_space: ClassVar = {"temperature": TEMPERATURE_GRID, "epsilon": EPSILON_GRID}

    def __init__(
        self, temperature: float = 1000.0, epsilon: float = 0.0014, std: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.epsilon = epsilon
        self.std = std
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        check_temperature(self)
        if not float(self.epsilon) >= 0:
            raise ValueError(f"odin: epsilon must be >= 0 (pixel units), got {self.epsilon!r}")

    def _std(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.std is None:
            return None
        return torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)

    def score(self, outputs: Outputs) -> torch.Tensor:
        x = outputs.inputs
        return odin_scores(outputs.tap, x, float(self.temperature), float(self.epsilon), self._std(x))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [ODIN]
