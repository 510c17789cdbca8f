"""Temperature scaling calibrated on in-distribution data (Guo, Pleiss, Sun & Weinberger, ICML 2017).

Guo et al. fit one temperature T by minimising the negative log-likelihood of
held-out labelled data, ``NLL(T) = Σ_i [logsumexp(z_i / T) - z_{i,y_i} / T]``,
with L-BFGS over all stored logits. Storing every logit is not a streaming
fit, so the fit here keeps sufficient statistics of a dense grid instead: in
the inverse temperature β = 1/T the NLL is convex, and for 73 values of β
(T from 1/64 to 64, six per octave) one pass accumulates its first and
second derivatives,

    NLL'(β)  = Σ_i E_{softmax(β z_i)}[z - z_{i,y_i}],
    NLL''(β) = Σ_i Var_{softmax(β z_i)}[z]  (>= 0),

per sample in the logits' precision (at least float32), summed in float64:
146 numbers whatever the data size. The minimiser is the root of NLL', found
in the grid interval where NLL' changes sign on the cubic Hermite
interpolant of NLL' (from its values and slopes at both ends): within 1e-4
relative of the exact minimiser (the tests compare with SciPy on all the
logits; about 1e-5 on trained models).
"""

from __future__ import annotations

import warnings

import torch

from ..hookspecs import hookimpl
from ..tap import Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, score_dtype
from .logits import negative_log_max_softmax

__all__ = ["TemperatureScaling", "nll_derivatives", "nll_minimiser"]

#: The grid of inverse temperatures β: 2^-6 ... 2^6 in steps of 2^(1/6).
INVERSE_TEMPERATURES = tuple(2.0 ** (step / 6) for step in range(-36, 37))
#: Grid points evaluated at once: about 64K values of β z, which stay in cache.
_ELEMENTS_PER_CHUNK = 2**16


def nll_derivatives(
    logits: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivatives in β of ``Σ_i CE(β z_i, y_i)`` at every β of ``betas``.

    Per sample in the precision of ``logits`` (at least float32), summed in float64.

    Args:
        logits: [N, K].
        labels: [N], class indices.
        betas: [G], inverse temperatures.

    Returns:
        Two float64 tensors [G]: ``NLL'(β)`` and ``NLL''(β)``.
    """
    # logits relative to the true class: E_p[z] - z_y = Σ_j p_j (z_j - z_y) keeps its sign and digits
    # when p is nearly one-hot, where E_p[z] and z_y agree to every digit
    logits = score_dtype(logits)
    relative = logits - logits.gather(1, labels[:, None])
    betas = betas.to(relative)
    chunk = max(1, _ELEMENTS_PER_CHUNK // max(1, relative.numel()))
    slopes, curvatures = [], []
    for start in range(0, betas.numel(), chunk):
        p = torch.softmax(betas[start:start + chunk, None, None] * relative, dim=2)  # [G', N, K]
        mean = (p * relative).sum(dim=2, keepdim=True)
        slopes.append(mean.to(torch.float64).sum(dim=(1, 2)))
        curvatures.append((p * (relative - mean).square()).sum(dim=2).to(torch.float64).sum(dim=1))
    return torch.cat(slopes), torch.cat(curvatures)


def nll_minimiser(betas: torch.Tensor, slopes: torch.Tensor, curvatures: torch.Tensor) -> float:
    """β minimising the convex NLL, from its derivatives on a grid; clamped to the grid's ends.

    Inside the interval where the slope changes sign, the root of the cubic
    Hermite interpolant of the slope, by bisection.
    """
    rising = torch.nonzero(slopes >= 0)
    if rising.numel() == 0 or int(rising[0]) == 0:
        end = float(betas[-1] if rising.numel() == 0 else betas[0])
        warnings.warn(
            f"temperature-scaling: the NLL-optimal temperature lies outside [{1 / float(betas[-1]):g}, "
            f"{1 / float(betas[0]):g}]; using T = {1 / end:g}", RuntimeWarning, stacklevel=3,
        )
        return end
    right = int(rising[0])
    b0, b1 = float(betas[right - 1]), float(betas[right])
    g0, g1 = float(slopes[right - 1]), float(slopes[right])
    width = b1 - b0
    h0, h1 = width * float(curvatures[right - 1]), width * float(curvatures[right])

    def slope_at(t: float) -> float:
        return ((2 * t**3 - 3 * t**2 + 1) * g0 + (t**3 - 2 * t**2 + t) * h0
                + (3 * t**2 - 2 * t**3) * g1 + (t**3 - t**2) * h1)

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if slope_at(middle) < 0 else (low, middle)
    return b0 + width * (low + high) / 2


class TemperatureScaling(Detector):
    """Max softmax at the temperature that calibrates the model (Guo et al., ICML 2017, Sec. 4.2).

    Fit (labelled in-distribution data, ideally a held-out validation split):
    ``T* = argmin_T Σ_i -log softmax(z_i / T)_{y_i}``, streamed as the module
    docstring explains. Score: ``-log max_k softmax(z / T*)_k`` (the paper's
    calibrated confidence, higher = in-distribution, negated in log space:
    same ranking, no ties at probability 1.0), in float64.

    Relation to ``temperature``: the same score, but ``temperature`` takes T as
    a hyperparameter (ODIN's Baseline+T, tuned on OOD data, 1000 by default);
    here T is learnt from in-distribution labels alone and is usually near 1
    to 3, so the ranking stays close to ``msp``. The fitted value is the buffer
    ``fitted_temperature`` (not a hyperparameter, so it is not called
    ``temperature``).
    """

    name = "temperature-scaling"
    paper = "Guo, Pleiss, Sun & Weinberger, On Calibration of Modern Neural Networks, ICML 2017, Sec. 4.2"
    requirements = Requirements(fit=True, fit_labels=True)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fitted_temperature", None)
        self._slopes: torch.Tensor | None = None
        self._curvatures: torch.Tensor | None = None

    def reset_fit(self, tap: Tap) -> None:
        self._slopes = self._curvatures = None

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        if labels is None:
            raise ValueError("temperature-scaling needs class labels to fit: pass (images, labels) batches")
        logits = outputs.logits.detach()
        labels = labels.to(device=logits.device, dtype=torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
            raise ValueError(
                f"fit labels must be class indices in [0, {logits.shape[1]}): fit on labelled "
                "in-distribution data only (OOD samples are labelled -1)"
            )
        betas = torch.tensor(INVERSE_TEMPERATURES, dtype=torch.float64, device=logits.device)
        slopes, curvatures = nll_derivatives(logits, labels, betas)
        if self._slopes is None or self._curvatures is None:  # the two are set together
            self._slopes, self._curvatures = slopes, curvatures
        else:
            self._slopes += slopes
            self._curvatures += curvatures

    def finish_fit(self) -> None:
        slopes, curvatures = self._slopes, self._curvatures
        if slopes is None or curvatures is None:  # the two are set together
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(slopes, curvatures)
        betas = torch.tensor(INVERSE_TEMPERATURES, dtype=torch.float64, device=slopes.device)
        self.fitted_temperature = torch.tensor(1 / nll_minimiser(betas, slopes, curvatures),
                                               dtype=torch.float64, device=slopes.device)
        self._slopes = self._curvatures = None

    def score(self, outputs: Outputs) -> torch.Tensor:
        return negative_log_max_softmax(outputs.logits, float(self.fitted_temperature))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [TemperatureScaling]
