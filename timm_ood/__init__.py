"""timm-ood: out-of-distribution detection for any timm model, in one line.

::

    import timm, timm_ood
    model = timm_ood.wrap(timm.create_model("resnet18", num_classes=10), "odin")
    scores = model.ood_score(images)     # Tensor[B], higher = more out-of-distribution

Scores are higher for more out-of-distribution inputs, for every detector.
``timm_ood.data`` (sources, benchmarks, loaders for a model) and
``timm_ood.training`` (training-time methods) are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import metrics
from ._runtime import package_version as _package_version
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
from .registry import register_plugin, reload_plugins
from .tap import Need, Outputs, Tap

#: ``timm_ood.from_pretrained(repo_id_or_path, ...)``: :meth:`OODModel.from_pretrained`
from_pretrained = OODModel.from_pretrained

if TYPE_CHECKING:  # for type checkers and IDEs; at run time they are imported on first access
    from . import data, training

#: subpackages imported on first access (``timm_ood.data``, ``timm_ood.training``), as ``import timm_ood.data`` would
_LAZY_SUBPACKAGES = frozenset({"data", "training"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBPACKAGES:
        return import_module(f".{name}", __name__)  # import_module also sets it as an attribute of this module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBPACKAGES})


__version__ = _package_version()

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
    "data",
    "evaluate",
    "from_pretrained",
    "get_detector_class",
    "hookimpl",
    "list_detectors",
    "metrics",
    "register_plugin",
    "reload_plugins",
    "training",
    "tune",
    "wrap",
]
