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

Tuning ODIN's grid need not pay that per grid point: ŷ and the logits of the
unperturbed input do not depend on T or ε, and the gradient sign depends on T
only, so :func:`odin_grid_scores` scores a whole (T, ε) grid with one forward
with autograd, one backward per T (reusing the graph) and one forward per
(T, ε > 0); images whose gradient sign did not change from the previous T
reuse that T's perturbed logits, which skips about a quarter of the forwards.
:func:`naive_odin_grid_scores` is the reference loop it must equal.
:meth:`ODIN.fast_grid` hands it to :func:`~timm_ood.evaluation.grid_search`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..tap import Outputs, Tap
from .base import Detector, FastGrid, Requirements
from .logits import TEMPERATURE_GRID, check_temperature, negative_log_max_softmax
from .perturbation import gradient_sign, signed_step

__all__ = [
    "EPSILON_GRID", "ODIN", "naive_odin_grid_scores", "odin_gradient_sign", "odin_grid_scores", "odin_scores",
]

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

    @classmethod
    def fast_grid(cls, space: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any]) -> FastGrid | None:
        """The (temperature, epsilon) grid by :func:`odin_grid_scores`, when that is the whole space.

        None for any other space, with hyperparameters held fixed (``std``
        included: the fast grid divides by the model's own std), or for a
        subclass that scores otherwise.
        """
        if set(space) != {"temperature", "epsilon"} or fixed or cls.score is not ODIN.score:
            return None
        temperatures, epsilons = list(space["temperature"]), list(space["epsilon"])

        def scores(outputs: Outputs) -> torch.Tensor:
            return odin_grid_scores(outputs.tap, outputs.inputs, temperatures, epsilons).flatten(0, 1)

        return FastGrid(grid=[{"temperature": t, "epsilon": e} for t in temperatures for e in epsilons],
                        scores=scores, label="ODIN grid", gradients=True)


# -- the whole (T, ε) grid at once ----------------------------------------------------------------------
def odin_grid_scores(
    tap: Tap,
    x: torch.Tensor,
    temperatures: Sequence[float],
    epsilons: Sequence[float],
    *,
    reuse_repeated_signs: bool = True,
) -> torch.Tensor:
    """ODIN scores of one batch at every (T, ε): float64 [len(T), len(ε), B].

    One forward with autograd, one backward per T through the same graph, and
    one forward per (T, ε > 0); ε = 0 reuses the unperturbed logits.

    As T grows the gradient sign converges (``T·∇_x`` of Eq. 2's loss tends to
    ``Σ_j (1/C − [j = ŷ]) ∇_x f_j``, free of T), so at large T many images keep
    the sign map they had at the previous T. Their perturbed inputs are then
    the same tensors, bit for bit, and with ``reuse_repeated_signs`` their
    perturbed logits are reused and only the images whose sign changed are
    forwarded (on Fashion-MNIST, about 27% of the grid's forwards). Those images' logits then come from a smaller batch;
    CPU kernels are not batch-invariant, so the scores equal the naive loop's
    to float32 rounding of the forward (about 1e-6), not bit for bit. With
    ``reuse_repeated_signs=False`` every forward is a full-batch one and the
    scores equal :func:`naive_odin_grid_scores` exactly.
    """
    std = tap.input_std(x)
    out = torch.empty(len(temperatures), len(epsilons), len(x), dtype=torch.float64, device=x.device)
    perturbed = [index for index, epsilon in enumerate(epsilons) if epsilon != 0]
    unperturbed = [index for index, epsilon in enumerate(epsilons) if epsilon == 0]
    reuse_from = None
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        logits = tap.logits(leaf)
        clean_logits = logits.detach()
        predicted = clean_logits.argmax(dim=1)
        for t_index, temperature in enumerate(temperatures):
            loss = F.cross_entropy(logits / temperature, predicted, reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaf, retain_graph=t_index < len(temperatures) - 1)
            sign = torch.sign(grad)
            with torch.no_grad():
                out[t_index, unperturbed] = negative_log_max_softmax(clean_logits, temperature)
                if not perturbed:
                    continue
                perturbed_logits = _perturbed_logits(tap, x, sign, [epsilons[i] for i in perturbed], std, reuse_from)
                out[t_index, perturbed] = negative_log_max_softmax(perturbed_logits.flatten(0, 1), temperature) \
                    .view(len(perturbed), len(x))
            if reuse_repeated_signs:
                reuse_from = (sign, perturbed_logits)
    return out


def _perturbed_logits(
    tap: Tap, x: torch.Tensor, sign: torch.Tensor, epsilons: Sequence[float], std: torch.Tensor,
    reuse_from: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Logits of ``x - ε·sign/σ`` for each ε, [len(ε), B, C].

    With ``reuse_from = (previous_sign, previous_logits)``, images whose sign map
    equals the previous one keep their previous logits; the (ε, image) pairs
    left are packed ε-major into forwards of ``len(x)`` images, so memory stays
    that of one batch and, when every image is forwarded, each forward is
    exactly one ε's full batch.
    """
    rows = torch.arange(len(x), device=x.device)
    result = None
    if reuse_from is not None:
        previous_sign, previous_logits = reuse_from
        changed = ~(sign == previous_sign).flatten(1).all(dim=1)
        if not changed.any():
            return previous_logits
        rows = changed.nonzero().squeeze(1)
        result = previous_logits.clone()
    steps = torch.tensor(list(epsilons), dtype=x.dtype, device=x.device).view(-1, *[1] * (x.dim() - 1))
    pairs = len(epsilons) * len(rows)
    for start in range(0, pairs, len(x)):
        flat = torch.arange(start, min(start + len(x), pairs), device=x.device)
        e_index, row = flat // len(rows), rows[flat % len(rows)]
        logits = tap.logits(signed_step(x[row], sign[row], steps[e_index], std))
        if result is None:
            result = logits.new_empty(len(epsilons), len(x), logits.shape[1])
        result[e_index, row] = logits
    if result is None:  # no (ε, image) pair was forwarded: the callers pass at least one ε
        raise ValueError("_perturbed_logits needs at least one epsilon")
    return result


def naive_odin_grid_scores(
    tap: Tap, x: torch.Tensor, temperatures: Sequence[float], epsilons: Sequence[float]
) -> torch.Tensor:
    """The reference: one full ODIN pass per grid point, [len(T), len(ε), B] (for tests and benchmarks)."""
    return torch.stack([
        torch.stack([odin_scores(tap, x, t, e) for e in epsilons]) for t in temperatures
    ])


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [ODIN]
