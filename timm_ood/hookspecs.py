"""The hook contract between timm-ood and its plugins.

A plugin is any module or object with functions marked ``@timm_ood.hookimpl``
whose names are the hooks below. Built-in detectors are plugins too: they are
registered through exactly these hooks (see ``timm_ood.registry``), and a
third-party package adds its own by naming a module in the ``timm_ood``
entry-point group of its ``pyproject.toml``::

    [project.entry-points.timm_ood]
    my_detectors = "my_package.detectors"

Signatures and documentation only; no behaviour lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .data.benchmarks import BenchmarkSpec
    from .data.sources import SourceSpec
    from .detectors.base import Detector

PROJECT_NAME = "timm_ood"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def timm_ood_detectors() -> Sequence[type[Detector]]:
    """Return the detector classes this plugin provides.

    Each class subclasses :class:`timm_ood.Detector` and sets a unique
    ``name`` (lower case, words joined by ``-``). Classes are registered under
    that name; a name that another plugin already registers is an error
    naming both distributions.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


@hookspec
def timm_ood_sources() -> Sequence[SourceSpec]:
    """Return the image sources this plugin provides.

    Each :class:`timm_ood.data.SourceSpec` has a unique ``name`` and a
    ``load(split, **params)`` returning a ``datasets.Dataset`` (or
    ``IterableDataset``) with an ``image`` column (``datasets.Image``) and an
    integer ``label`` column, -1 for every example of an OOD set. Its
    ``description``, ``provenance`` and ``licence`` are shown to users. A name
    that another plugin already registers is an error naming both distributions.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


@hookspec
def timm_ood_benchmarks() -> Sequence[BenchmarkSpec]:
    """Return the benchmarks this plugin provides.

    Each :class:`timm_ood.data.BenchmarkSpec` has a unique ``name`` and names,
    by registered source name, its ID train and test splits and its OOD sets;
    :func:`timm_ood.data.load_benchmark` loads them and holds out the tuning
    images. A name that another plugin already registers is an error naming
    both distributions.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations
