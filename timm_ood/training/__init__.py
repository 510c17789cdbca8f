"""Training: one loop for every method, its objectives, outlier sources and checkpoints.

::

    from timm_ood import training
    history = training.fit(model, train_data, epochs=5, optimizer="sgd", augment=True)
    training.save_checkpoint(model, "ckpt.safetensors")
"""

from __future__ import annotations

from .augment import random_crop_flip
from .checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .loop import EpochRecord, TrainingHistory, accuracy, fit, make_optimizer, make_schedule
from .objectives import Objective, OutlierObjective, SupervisedObjective, as_objective
from .outliers import CyclingOutliers, OutlierSource, as_outlier_source

__all__ = [
    "CyclingOutliers",
    "EpochRecord",
    "Objective",
    "OutlierObjective",
    "OutlierSource",
    "SupervisedObjective",
    "TrainingHistory",
    "accuracy",
    "as_objective",
    "as_outlier_source",
    "fit",
    "load_checkpoint",
    "make_optimizer",
    "make_schedule",
    "random_crop_flip",
    "read_checkpoint_metadata",
    "save_checkpoint",
]
