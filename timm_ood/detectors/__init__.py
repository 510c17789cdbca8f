"""Detectors and their registry.

Every detector, built-in or from a plugin, is registered through the
``timm_ood_detectors`` hook (see :mod:`timm_ood.hookspecs`); these functions read
the registry that the hook fills.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registration, check_name, filter_names, get_plugin_registry
from .base import Detector, Requirements

__all__ = [
    "Detector",
    "Requirements",
    "create_detector",
    "detector_registrations",
    "get_detector_class",
    "list_detectors",
]

_KIND = "detector"


def _registered_name(obj: object) -> str:
    if not (isinstance(obj, type) and issubclass(obj, Detector)):
        raise TypeError(f"{obj!r} is not a subclass of timm_ood.Detector")
    return check_name(obj.name, _KIND)


def detector_registrations() -> dict[str, Registration[type[Detector]]]:
    """Every registered detector by name, with the plugin and distribution it came from."""
    return get_plugin_registry().collect("timm_ood_detectors", _KIND, _registered_name)


def list_detectors(pattern: str | None = None, *, with_distribution: bool = False) -> list[str] | dict[str, str]:
    """Registered detector names, built-in and third-party, in registration order.

    Args:
        pattern: shell-style wildcard filter, as ``timm.list_models`` (``"ash-*"``).
        with_distribution: return ``{name: "distribution version"}`` instead,
            saying which installed package provides each name.
    """
    registrations = detector_registrations()
    names = filter_names(list(registrations), pattern)
    if with_distribution:
        return {name: registrations[name].distribution for name in names}
    return names


def get_detector_class(name: str) -> type[Detector]:
    """The detector class registered under ``name``.

    Raises:
        UnknownNameError: no such detector (the message lists the known ones).
    """
    registrations = detector_registrations()
    return get_plugin_registry().lookup(registrations, _KIND, name).obj


def create_detector(name: str, **hyperparameters: Any) -> Detector:
    """A new detector by registered name, e.g. ``create_detector("odin", temperature=100)``.

    Raises:
        UnknownNameError: no such detector.
        TypeError: a hyperparameter the detector does not have (the message
            lists the ones it has).
    """
    cls = get_detector_class(name)
    unknown = sorted(set(hyperparameters) - set(cls.hyperparameter_names()))
    if unknown:
        raise TypeError(
            f"detector {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; its "
            f"hyperparameters are: {', '.join(cls.hyperparameter_names()) or '(none)'}"
        )
    return cls(**hyperparameters)
