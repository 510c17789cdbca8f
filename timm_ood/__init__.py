"""timm-ood: out-of-distribution detection for any timm model, in one line.

::

    import timm, timm_ood
    model = timm_ood.wrap(timm.create_model("resnet18", num_classes=10), "odin")
    scores = model.ood_score(images)     # Tensor[B], higher = more out-of-distribution

Scores are higher for more out-of-distribution inputs, for every detector.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import metrics
from .detectors import create_detector, get_detector_class, list_detectors
from .detectors.base import Detector, Requirements
from .errors import (
    DuplicateNameError,
    FormatVersionError,
    HubUnavailableError,
    IncompatibleModelError,
    NotFittedError,
    PluginLoadWarning,
    TimmOODError,
    UnknownModelError,
    UnknownNameError,
    WeightsUnavailableError,
)
from .evaluation import evaluate, tune
from .hookspecs import hookimpl
from .model import OODModel, create_model, wrap
from .pretrained import from_pretrained
from .registry import register_plugin, reload_plugins
from .tap import Need, Outputs, Tap

try:
    __version__ = version("timm-ood")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = [
    "Detector",
    "DuplicateNameError",
    "FormatVersionError",
    "HubUnavailableError",
    "IncompatibleModelError",
    "Need",
    "NotFittedError",
    "OODModel",
    "Outputs",
    "PluginLoadWarning",
    "Requirements",
    "Tap",
    "TimmOODError",
    "UnknownModelError",
    "UnknownNameError",
    "WeightsUnavailableError",
    "__version__",
    "create_detector",
    "create_model",
    "evaluate",
    "from_pretrained",
    "get_detector_class",
    "hookimpl",
    "list_detectors",
    "metrics",
    "register_plugin",
    "reload_plugins",
    "tune",
    "wrap",
]
