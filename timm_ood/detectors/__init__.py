"""Detectors and their registry.

Every detector, built-in or from a plugin, is registered through the
``timm_ood_detectors`` hook (see :mod:`timm_ood.hookspecs`); these functions read
the registry that the hook fills.
"""

from __future__ import annotations

from typing import Any

from ..registry import Kind, Registration
from .base import Detector, Requirements

__all__ = [
    "Detector",
    "Requirements",
    "create_detector",
    "detector_registrations",
    "get_detector_class",
    "list_detectors",
]

#: The built-in detector modules, registered as plugins in this order (see
#: :func:`timm_ood.registry.builtin_plugins`).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "logits",
    "odin",
    "mahalanobis",
    "entropic",
    "gradient",
    "sampling",
    "posterior",
    "temperature_scaling",
    "shaping",
    "gaussian",
    "neighbours",
    "classifier_geometry",
    "prototypes",
    "gram",
    "training_heads",
)

DETECTORS: Kind[type[Detector]] = Kind.of_subclasses("timm_ood_detectors", "detector", Detector, "timm_ood.Detector")


def detector_registrations() -> dict[str, Registration[type[Detector]]]:
    """Every registered detector by name, with the plugin and distribution it came from."""
    return DETECTORS.registrations()


def list_detectors(pattern: str | None = None, *, with_distribution: bool = False) -> list[str] | dict[str, str]:
    """Registered detector names, built-in and third-party, in registration order.

    Args:
        pattern: shell-style wildcard filter, as ``timm.list_models`` (``"ash-*"``).
        with_distribution: return ``{name: "distribution version"}`` instead,
            saying which installed package provides each name.
    """
    if with_distribution:
        return {name: registration.distribution for name, registration in DETECTORS.matching(pattern).items()}
    return DETECTORS.names(pattern)


def get_detector_class(name: str) -> type[Detector]:
    """The detector class registered under ``name``.

    Raises:
        UnknownNameError: no such detector (the message lists the known ones).
    """
    return DETECTORS.get(name)


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
