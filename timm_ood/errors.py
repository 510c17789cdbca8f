"""Exceptions and warnings raised by timm-ood.

Every error says what was wrong and how to fix it. They derive from the
built-in exception a Python user would expect (``ValueError``, ``KeyError``,
``RuntimeError``) so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "DuplicateNameError",
    "FormatVersionError",
    "HubUnavailableError",
    "IncompatibleModelError",
    "NotFittedError",
    "PluginLoadWarning",
    "TimmOODError",
    "UnknownModelError",
    "UnknownNameError",
    "WeightsUnavailableError",
]


class TimmOODError(Exception):
    """Base class of every error raised by timm-ood."""


class UnknownNameError(TimmOODError, KeyError):
    """A registry lookup (detector, source, benchmark) found no such name."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        message = f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or '(none)'}."
        super().__init__(message)
        self.kind, self.name, self.known, self.close_matches = kind, name, known, close

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateNameError(TimmOODError, ValueError):
    """Two plugins registered the same name."""


class NotFittedError(TimmOODError, RuntimeError):
    """A detector that needs fitting was used before ``fit``."""


class IncompatibleModelError(TimmOODError, ValueError):
    """The model cannot give what a detector needs (no classifier, no features, ...)."""


class HubUnavailableError(TimmOODError, ConnectionError):
    """The Hugging Face hub cannot be reached (offline mode, no network) for what was asked of it.

    A dataset to load, model weights, a detector to download or upload: the
    message names what and how to do without the hub (a local copy).
    """


class FormatVersionError(TimmOODError, ValueError):
    """A saved folder or file was written in a format this timm-ood version does not read."""


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded; everything else still works."""


class UnknownModelError(TimmOODError, ValueError):
    """``timm.create_model`` does not know the model name or its pretrained tag."""


class WeightsUnavailableError(HubUnavailableError):
    """A model's pretrained weights are neither in the local cache nor reachable on the hub."""
