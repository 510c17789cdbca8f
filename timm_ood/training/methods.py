"""The training-time methods, each as the head, objective and detector that make it.

One record per method of the seeds (and outlier exposure): the documentation's
method table is generated from :data:`METHODS`, and the loss defaults it shows
are read from the classes' signatures, so the table cannot drift from the code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from .bottleneck import VIBLoss, VIBYLoss
from .energy import EnergyLoss, GRegObjective
from .gan import JointConfidenceObjective
from .losses import ConfidenceLoss, IsoMaxLoss, OutlierExposureLoss
from .sigmoid_heads import BINCLoss, BINLoss

__all__ = ["METHODS", "TrainingMethod"]

#: keyword arguments that are objects or plumbing, not settings of the method
_NOT_SETTINGS = frozenset({"noise", "max_grad_norm", "generator", "discriminator"})


@dataclass(frozen=True)
class TrainingMethod:
    """How to train with one method and score with its detector.

    Attributes:
        name: the method's name.
        paper: the paper and equation.
        call: the code that trains with it (``train_data`` / ``aux_data`` are yours).
        head: the ``replace_head`` kind it needs, or None for the model's own linear classifier.
        objective: the loss or objective class whose keyword defaults the table shows (for
            the joint GAN, :class:`JointConfidenceObjective`, whose updates of the generator and the
            discriminator run inside ``training.fit`` before each classifier step).
        detectors: the detectors that score it.
        outliers: what OOD data it trains on ("none" without).
    """

    name: str
    paper: str
    call: str
    head: str | None
    objective: type
    detectors: tuple[str, ...]
    outliers: str = "none"

    def defaults(self) -> dict[str, object]:
        """The objective's keyword defaults, read from its signature."""
        parameters = inspect.signature(self.objective).parameters.values()
        return {p.name: p.default for p in parameters
                if p.default is not inspect.Parameter.empty and p.name not in _NOT_SETTINGS}


METHODS: tuple[TrainingMethod, ...] = (
    TrainingMethod(
        "IsoMax", "Macêdo et al., arXiv 1908.05569, Eq. 4-6",
        'replace_head(model, "isomax"); fit(model, train_data, loss=IsoMaxLoss())',
        "isomax", IsoMaxLoss, ("entropic",)),
    TrainingMethod(
        "Confidence loss", "Lee, Lee, Lee & Shin, ICLR 2018, Eq. 1",
        "fit(model, train_data, loss=ConfidenceLoss(), outliers=aux_data)",
        None, ConfidenceLoss, ("msp", "odin"), "auxiliary outliers"),
    TrainingMethod(
        "Joint confidence loss + GAN", "Lee et al., ICLR 2018, Eq. 4, Algorithm 1",
        "fit_joint_confidence(model, train_data, beta=1.0)",
        None, JointConfidenceObjective, ("msp", "odin"), "GAN samples"),
    TrainingMethod(
        "Outlier exposure", "Hendrycks, Mazeika & Dietterich, ICLR 2019, Eq. 1",
        "fit(model, train_data, loss=OutlierExposureLoss(), outliers=aux_data)",
        None, OutlierExposureLoss, ("msp",), "auxiliary outliers"),
    TrainingMethod(
        "Energy loss", "Liu, Wang, Owens & Li, NeurIPS 2020, Eq. 6",
        "fit(model, train_data, loss=EnergyLoss(), outliers=aux_data)",
        None, EnergyLoss, ("energy",), "auxiliary outliers"),
    TrainingMethod(
        "GReg", "Sharifi et al., Gradient-Regularized OOD Detection, ECCV 2024, Eq. 1-3",
        "fit(model, train_data, loss=GRegObjective(), outliers=aux_data)",
        None, GRegObjective, ("energy",), "auxiliary outliers"),
    TrainingMethod(
        "GReg+", "same, Sec. 4.2, Algorithm 1 (energy-based cluster sampling)",
        "fit(model, train_data, loss=GRegObjective(), outliers=EnergyClusterSampler(aux_data))",
        None, GRegObjective, ("energy",), "auxiliary outliers, chosen per step"),
    TrainingMethod(
        "BIN", "Sreeramdas & Sarawagi, Sec. 3, Eq. 3",
        'replace_head(model, "bin"); fit(model, train_data, loss=BINLoss())',
        "bin", BINLoss, ("bin",)),
    TrainingMethod(
        "BINC", "Sreeramdas & Sarawagi, Eq. 4 (MMCE of Kumar et al., ICML 2018)",
        'replace_head(model, "binc"); fit(model, train_data, loss=BINCLoss())',
        "binc", BINCLoss, ("bin", "msp")),
    TrainingMethod(
        "VIB", "Alemi et al. 2017; Sreeramdas & Sarawagi, Eq. 5",
        'replace_head(model, "vib"); fit(model, train_data, loss=VIBLoss())',
        "vib", VIBLoss, ("vib",)),
    TrainingMethod(
        "VIBY", "Sreeramdas & Sarawagi, Eq. 6-7",
        'replace_head(model, "viby"); fit(model, train_data, loss=VIBYLoss())',
        "viby", VIBYLoss, ("viby-1", "viby-2")),
)
