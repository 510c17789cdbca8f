"""Training: one loop for every method, its objectives, losses, heads, outlier sources and checkpoints.

::

    from timm_ood import training
    history = training.fit(model, train_data, epochs=5, optimizer="sgd", augment=True)
    training.save_checkpoint(model, "ckpt.safetensors")

    training.replace_head(model, "isomax")                        # IsoMax prototypes
    training.fit(model, train_data, loss=training.IsoMaxLoss(entropic_scale=10.0), epochs=5)
    training.fit(model, train_data, loss=training.ConfidenceLoss(beta=1.0), outliers=aux_data, epochs=5)
    training.fit(model, train_data, loss=training.GRegObjective(),                     # GReg+
                 outliers=training.EnergyClusterSampler(aux_data), epochs=5)
    training.fit_joint_confidence(model, train_data, beta=1.0, epochs=5)   # Lee et al., Algorithm 1:
    training.fit(model, train_data, loss=training.JointConfidenceObjective(beta=1.0), epochs=5)  # with fit's defaults

Wherever data is taken (``train_data``, ``outliers``, ``eval_data``, the
sampler's candidates) it may be a Hugging Face dataset with ``image`` (and, for
in-distribution data, ``label``) columns, read with the model's own data config,
a DataLoader, or any iterable of ``(images, labels)`` batches.
"""

from __future__ import annotations

from .augment import random_crop_flip
from .bottleneck import GaussianBottleneckHead, VIBHead, VIBLoss, VIBYHead, VIBYLoss, gaussian_kl
from .checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .energy import (
    EnergyLoss,
    GRegObjective,
    GRegTerms,
    energy_input_gradient_norms,
    energy_margin_loss,
    energy_score,
)
from .energy_sampling import EnergyClusterSampler, SamplingTimings, cluster_energy_extremes, kmeans
from .gan import (
    DCGANDiscriminator,
    DCGANGenerator,
    JointConfidenceObjective,
    JointConfidenceRun,
    JointConfidenceTrainer,
    JointEpochRecord,
    fit_joint_confidence,
)
from .heads import IsoMaxHead, ReplacementHead, head_spec, replace_head
from .loop import EpochRecord, TrainingHistory, accuracy, fit, make_optimizer, make_schedule
from .losses import (
    ConfidenceLoss,
    IsoMaxLoss,
    OutlierExposureLoss,
    cross_entropy_to_uniform,
    kl_to_uniform,
)
from .objectives import Objective, OutlierObjective, SupervisedObjective, TrainingPlan, as_objective
from .outliers import CyclingOutliers, OutlierSource, as_outlier_source, outlier_batches
from .sigmoid_heads import (
    BINCHead,
    BINCLoss,
    BINHead,
    BINLoss,
    class_weighted_binary_cross_entropy,
    mmce_weighted,
)

__all__ = [
    "BINCHead",
    "BINCLoss",
    "BINHead",
    "BINLoss",
    "ConfidenceLoss",
    "CyclingOutliers",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "EnergyClusterSampler",
    "EnergyLoss",
    "EpochRecord",
    "GRegObjective",
    "GRegTerms",
    "GaussianBottleneckHead",
    "IsoMaxHead",
    "IsoMaxLoss",
    "JointConfidenceObjective",
    "JointConfidenceRun",
    "JointConfidenceTrainer",
    "JointEpochRecord",
    "Objective",
    "OutlierExposureLoss",
    "OutlierObjective",
    "OutlierSource",
    "ReplacementHead",
    "SamplingTimings",
    "SupervisedObjective",
    "TrainingHistory",
    "TrainingPlan",
    "VIBHead",
    "VIBLoss",
    "VIBYHead",
    "VIBYLoss",
    "accuracy",
    "as_objective",
    "as_outlier_source",
    "class_weighted_binary_cross_entropy",
    "cluster_energy_extremes",
    "cross_entropy_to_uniform",
    "energy_input_gradient_norms",
    "energy_margin_loss",
    "energy_score",
    "fit",
    "fit_joint_confidence",
    "gaussian_kl",
    "head_spec",
    "kl_to_uniform",
    "kmeans",
    "load_checkpoint",
    "make_optimizer",
    "make_schedule",
    "mmce_weighted",
    "outlier_batches",
    "random_crop_flip",
    "read_checkpoint_metadata",
    "replace_head",
    "save_checkpoint",
]
