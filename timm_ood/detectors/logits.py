"""Detectors that read only the logits: one forward, no fit.

Scores are computed in log space where the paper's score is a probability:
``-log max softmax`` is a strictly decreasing function of the max softmax
probability, so every ranking metric is the same as for ``-MSP``, but confident
inputs no longer tie at exactly 1.0 in float32 (``docs/metrics.md``,
"saturated softmax scores"). The softmax-family scores (``msp``,
``temperature``, ``odin``) are computed and returned in float64: at T = 1000
every input's score sits within about 1e-4 of ``log K`` and float32 would
tie inputs whose logit gaps differ by less than 1e-4 * T / 1000.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from ..free_energy import free_energy
from ..hookspecs import hookimpl
from ..tap import Outputs
from .base import Detector, score_dtype

__all__ = ["MSP", "Energy", "Entropy", "MaxLogit", "TemperatureScaledMSP", "check_temperature",
           "negative_log_max_softmax"]

#: ODIN's temperature grid (Liang et al. 2018, Sec. 4.4).
TEMPERATURE_GRID: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def negative_log_max_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-log max_i softmax(z / T)_i = logsumexp(z / T) - max_i z_i / T``, per row (>= 0), float64."""
    scaled = logits.to(torch.float64) / temperature
    return torch.logsumexp(scaled, dim=1) - scaled.amax(dim=1)


class _Tempered(Protocol):
    """A detector with a ``temperature`` hyperparameter."""

    @property
    def name(self) -> str: ...

    @property
    def temperature(self) -> float: ...


def check_temperature(detector: _Tempered) -> None:
    """Refuse a detector whose ``temperature`` hyperparameter is not > 0."""
    if not float(detector.temperature) > 0:
        raise ValueError(f"{detector.name}: temperature must be > 0, got {detector.temperature!r}")


class MSP(Detector):
    """Maximum softmax probability baseline (Hendrycks & Gimpel, ICLR 2017).

    Paper score: ``max_i softmax(f(x))_i``, higher = in-distribution. Returned
    negated and in log space: ``-log max_i softmax(f(x))_i`` (same ranking).
    """

    name = "msp"
    paper = "Hendrycks & Gimpel, A Baseline for Detecting Misclassified and OOD Examples, ICLR 2017"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return negative_log_max_softmax(outputs.logits)


class TemperatureScaledMSP(Detector):
    """Baseline+T: max softmax at temperature T (Liang et al. 2018 Eq. 1, ε = 0; survey Sec. 3).

    ``S(x; T) = max_i exp(f_i/T) / Σ_j exp(f_j/T)``; returned as
    ``-log S(x; T)`` (higher = more OOD). T is tuned on held-out OOD data in the
    papers; the default is ODIN's chosen T = 1000.

    Args:
        temperature: T > 0.
    """

    name = "temperature"
    paper = "Liang, Li & Srikant, ODIN, ICLR 2018, Eq. 1 (Baseline+T in Sreeramdas & Sarawagi)"
    search_space: ClassVar = {"temperature": TEMPERATURE_GRID}

    def __init__(self, temperature: float = 1000.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        check_temperature(self)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return negative_log_max_softmax(outputs.logits, float(self.temperature))


class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., Scaling OOD Detection to Real-World Settings, ICML 2022).

    Paper score ``max_i f_i(x)`` (higher = in-distribution), returned negated.
    """

    name = "maxlogit"
    paper = "Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022"

    def score(self, outputs: Outputs) -> torch.Tensor:
        return -score_dtype(outputs.logits).amax(dim=1)


class Energy(Detector):
    """Free energy ``E(x) = -T logsumexp(f(x)/T)`` (Liu et al., NeurIPS 2020, Eq. 4).

    Low energy = in-distribution, so the energy itself is the OOD score (no
    negation). GReg (Sharifi et al.) uses the same score with T = 1.

    Args:
        temperature: T > 0 (the paper uses 1).
    """

    name = "energy"
    paper = "Liu et al., Energy-based Out-of-distribution Detection, NeurIPS 2020, Eq. 4"
    search_space: ClassVar = {"temperature": (0.5, 1.0, 2.0, 5.0, 10.0)}

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        check_temperature(self)

    def score(self, outputs: Outputs) -> torch.Tensor:
        return free_energy(score_dtype(outputs.logits), float(self.temperature))


class Entropy(Detector):
    """Shannon entropy of the softmax, ``H(p) = -Σ_i p_i log p_i``, higher = more OOD.

    Computed as ``-(softmax(z) * log_softmax(z)).sum()`` (free of ``0 log 0``)
    in float64, so that near-uniform predictions (an IsoMax model's, whose
    entropies all sit just below ``log K``) do not tie. ``entropic``
    (:class:`~timm_ood.detectors.entropic.EntropicScore`) is this detector
    under the IsoMax paper's name: the same number.
    """

    name = "entropy"
    paper = "Shannon entropy of the predictive distribution; IsoMax entropic score (Macêdo et al.) up to sign"

    def score(self, outputs: Outputs) -> torch.Tensor:
        log_p = torch.log_softmax(outputs.logits.to(torch.float64), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [MSP, TemperatureScaledMSP, MaxLogit, Energy, Entropy]
