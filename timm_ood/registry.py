"""Plugin discovery and the name registries built from it.

Modelled on pytest: one :class:`pluggy.PluginManager` holds the built-in
plugins (registered through the same hooks as everyone else), the plugins that
installed distributions declare in the ``timm_ood`` entry-point group, and any
plugin registered at run time with :func:`register_plugin`.

- Each entry point loads in its own ``try``; one that fails to import gives a
  :class:`~timm_ood.errors.PluginLoadWarning` naming the entry point and its
  distribution, and everything else still works.
- ``TIMM_OOD_DISABLE_PLUGIN_AUTOLOAD=1`` turns entry-point loading off.
- A name registered by two plugins is a :class:`~timm_ood.errors.DuplicateNameError`
  naming both distributions; an unknown name is an
  :class:`~timm_ood.errors.UnknownNameError` listing the known ones and the
  closest match.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import pluggy

from . import hookspecs
from .errors import DuplicateNameError, PluginLoadWarning, UnknownNameError

__all__ = [
    "AUTOLOAD_ENV",
    "BUILTIN_PACKAGES",
    "ENTRY_POINT_GROUP",
    "Kind",
    "PluginRegistry",
    "Registration",
    "builtin_plugins",
    "get_plugin_registry",
    "register_plugin",
    "reload_plugins",
]

ENTRY_POINT_GROUP = "timm_ood"
AUTOLOAD_ENV = "TIMM_OOD_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DISTRIBUTION = "timm-ood"

#: The packages that declare timm-ood's own plugins, in registration order. Each
#: names its plugin modules, next to their code, in a ``BUILTIN_PLUGINS`` tuple
#: (as pytest's ``default_plugins``); they implement the same hooks a
#: third-party plugin does and are registered before any entry point.
BUILTIN_PACKAGES: tuple[str, ...] = ("timm_ood.detectors", "timm_ood.data")


def builtin_plugins() -> tuple[str, ...]:
    """The built-in plugin modules, in registration order, from each package's ``BUILTIN_PLUGINS``.

    Read when a registry is built, not when this module is imported: the
    packages import this module, so importing them here would be a cycle.
    """
    modules: list[str] = []
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        modules.extend(f"{package_name}.{module}" for module in package.BUILTIN_PLUGINS)
    return tuple(modules)


def __getattr__(name: str) -> Any:
    if name == "BUILTIN_PLUGINS":  # kept for compatibility; assembled from the packages' declarations
        return builtin_plugins()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


NAME_PATTERN = re.compile(r"^[a-z0-9]+(?:[-_.][a-z0-9]+)*$")

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One registered name: the object, and which plugin and distribution gave it."""

    name: str
    obj: T
    plugin: str
    distribution: str


def _distribution_label(dist: importlib.metadata.Distribution | None) -> str:
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def _own_version() -> str:
    try:
        return importlib.metadata.version(BUILTIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "(source tree)"


class PluginRegistry:
    """The plugin manager plus the registries (detectors, ...) collected from its hooks."""

    def __init__(self, autoload: bool | None = None) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self._distribution_of: dict[str, str] = {}
        self._collected: dict[str, dict[str, Registration[Any]]] = {}
        self._lock = threading.RLock()
        builtin = f"{BUILTIN_DISTRIBUTION} {_own_version()}"
        for module_name in builtin_plugins():
            self.register(importlib.import_module(module_name), module_name, builtin)
        if autoload is None:
            autoload = not os.environ.get(AUTOLOAD_ENV)
        if autoload:
            self.load_entry_points()

    # -- plugins -----------------------------------------------------------
    def register(self, plugin: object, name: str | None = None, distribution: str | None = None) -> str:
        """Register a plugin object (module, class or instance with hook implementations).

        pluggy verifies every hook implementation against the specs before the
        plugin is added, so a plugin with a wrong signature is refused whole.
        """
        with self._lock:
            plugin_name = self.manager.register(plugin, name=name)
            if plugin_name is None:
                raise ValueError(f"plugin {name!r} is blocked and cannot be registered")
            self._distribution_of[plugin_name] = distribution or "registered at run time"
            self._collected.clear()
            return plugin_name

    def unregister(self, name: str) -> None:
        """Remove a plugin registered under ``name``."""
        with self._lock:
            self.manager.unregister(name=name)
            self._distribution_of.pop(name, None)
            self._collected.clear()

    def _entry_points(self) -> Iterator[importlib.metadata.EntryPoint]:
        seen: set[tuple[str, str]] = set()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            key = (entry_point.name, entry_point.value)
            if key not in seen:  # the same distribution found twice on sys.path
                seen.add(key)
                yield entry_point

    def load_entry_points(self) -> None:
        """Load every plugin of the ``timm_ood`` entry-point group, each in its own ``try``."""
        for entry_point in self._entry_points():
            distribution = _distribution_label(getattr(entry_point, "dist", None))
            if self.manager.has_plugin(entry_point.name):
                warnings.warn(
                    f"timm-ood skipped plugin {entry_point.name!r} ({entry_point.value}) from "
                    f"{distribution}: a plugin of that name is already registered by "
                    f"{self._distribution_of.get(entry_point.name)}. Rename one entry point.",
                    PluginLoadWarning,
                    stacklevel=3,
                )
                continue
            try:
                plugin = entry_point.load()
                self.register(plugin, entry_point.name, distribution)
            except Exception as error:
                warnings.warn(
                    f"timm-ood could not load plugin {entry_point.name!r} ({entry_point.value}) "
                    f"from {distribution}: {type(error).__name__}: {error}. Its detectors are "
                    f"unavailable; everything else works. Set {AUTOLOAD_ENV}=1 to skip plugins.",
                    PluginLoadWarning,
                    stacklevel=3,
                )

    def plugins(self) -> dict[str, str]:
        """Registered plugin names and the distribution each came from."""
        return {name: self._distribution_of.get(name, "?") for name, _ in self.manager.list_name_plugin()}

    # -- registries ---------------------------------------------------------
    def collect(self, hook_name: str, kind: str, name_of: Callable[[Any], str]) -> dict[str, Registration[Any]]:
        """Call one registration hook on every plugin and index what they return by name.

        Args:
            hook_name: the hook to call (e.g. ``"timm_ood_detectors"``).
            kind: what the objects are, for messages (``"detector"``).
            name_of: returns the registered name of one returned object, or
                raises ``TypeError``/``ValueError`` saying why it is invalid.

        Raises:
            DuplicateNameError: two plugins returned objects with one name.
        """
        with self._lock:
            if hook_name in self._collected:
                return self._collected[hook_name]
            registrations: dict[str, Registration[Any]] = {}
            hook = getattr(self.manager.hook, hook_name)
            # get_hookimpls() is in registration order: built-ins first in listings.
            for impl in hook.get_hookimpls():
                distribution = self._distribution_of.get(impl.plugin_name, "?")
                try:
                    returned = list(impl.function() or ())
                except Exception as error:
                    warnings.warn(
                        f"plugin {impl.plugin_name!r} from {distribution} failed in {hook_name}(): "
                        f"{type(error).__name__}: {error}. Its {kind}s are unavailable.",
                        PluginLoadWarning,
                        stacklevel=3,
                    )
                    continue
                for obj in returned:
                    try:
                        name = name_of(obj)
                    except (TypeError, ValueError) as error:
                        warnings.warn(
                            f"plugin {impl.plugin_name!r} from {distribution} returned an invalid "
                            f"{kind} from {hook_name}(): {error}. It was skipped.",
                            PluginLoadWarning,
                            stacklevel=3,
                        )
                        continue
                    if name in registrations:
                        first = registrations[name]
                        raise DuplicateNameError(
                            f"{kind} name {name!r} is registered twice: by plugin {first.plugin!r} "
                            f"from {first.distribution} and by plugin {impl.plugin_name!r} from "
                            f"{distribution}. Uninstall one of the two distributions, or set "
                            f"{AUTOLOAD_ENV}=1 and register the plugin you want with "
                            "timm_ood.register_plugin()."
                        )
                    registrations[name] = Registration(name, obj, impl.plugin_name, distribution)
            self._collected[hook_name] = registrations
            return registrations

    def lookup(self, registrations: dict[str, Registration[T]], kind: str, name: str) -> Registration[T]:
        """The registration of ``name``, or an error listing the known names."""
        try:
            return registrations[name]
        except KeyError:
            raise UnknownNameError(kind, name, registrations) from None


def filter_names(names: list[str], pattern: str | None) -> list[str]:
    """Names matching a shell-style wildcard pattern (all when ``pattern`` is None)."""
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def check_name(name: object, kind: str) -> str:
    """Validate a registered name: lower case words joined by ``-``, ``_`` or ``.``."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"{kind} name {name!r} is not valid: use lower-case letters and digits, words "
            "joined by '-' (e.g. 'my-detector')"
        )
    return name


class Kind(Generic[T]):
    """One kind of registered object (detectors, sources, benchmarks): its hook, its word, its type.

    Each package builds one and reads its registry through it, e.g.
    ``SOURCES = Kind.of_instances("timm_ood_sources", "source", SourceSpec, "timm_ood.data.SourceSpec")``.
    Every call reads the current process-wide registry, so it sees
    :func:`reload_plugins` and :func:`register_plugin`.
    """

    def __init__(self, hook_name: str, word: str, is_valid: Callable[[object], bool], expected: str) -> None:
        """
        Args:
            hook_name: the registration hook (``"timm_ood_detectors"``).
            word: what the objects are, for messages (``"detector"``).
            is_valid: whether a returned object is of this kind.
            expected: what a valid object is, for messages (``"a subclass of timm_ood.Detector"``).
        """
        self.hook_name = hook_name
        self.word = word
        self._is_valid = is_valid
        self._expected = expected

    @classmethod
    def of_instances(cls, hook_name: str, word: str, holds: type[U], label: str) -> Kind[U]:
        """A kind whose plugins return instances of ``holds`` (``label``: its public name)."""
        return Kind(hook_name, word, lambda obj: isinstance(obj, holds), f"a {label}")

    @classmethod
    def of_subclasses(cls, hook_name: str, word: str, holds: type[Any], label: str) -> Kind[type[Any]]:
        """A kind whose plugins return subclasses of ``holds`` (``label``: its public name).

        ``holds`` may be abstract (``Detector``), which a ``type[U]`` parameter refuses to type checkers;
        annotate the kind instead: ``DETECTORS: Kind[type[Detector]] = Kind.of_subclasses(...)``.
        """
        return Kind(
            hook_name, word, lambda obj: isinstance(obj, type) and issubclass(obj, holds), f"a subclass of {label}"
        )

    def __repr__(self) -> str:
        return f"Kind({self.hook_name!r}, {self.word!r})"

    def _name_of(self, obj: object) -> str:
        if not self._is_valid(obj):
            raise TypeError(f"{obj!r} is not {self._expected}")
        return check_name(cast(Any, obj).name, self.word)

    def registrations(self) -> dict[str, Registration[T]]:
        """Every registered object by name, with the plugin and distribution it came from."""
        return get_plugin_registry().collect(self.hook_name, self.word, self._name_of)

    def matching(self, pattern: str | None = None) -> dict[str, Registration[T]]:
        """The registrations whose names match a shell-style wildcard (all when None), in registration order."""
        registrations = self.registrations()
        return {name: registrations[name] for name in filter_names(list(registrations), pattern)}

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names matching ``pattern``, in registration order."""
        return filter_names(list(self.registrations()), pattern)

    def objects(self, pattern: str | None = None) -> dict[str, T]:
        """``{name: object}`` for the names matching ``pattern``, in registration order."""
        return {name: registration.obj for name, registration in self.matching(pattern).items()}

    def registration(self, name: str) -> Registration[T]:
        """The registration of ``name``.

        Raises:
            UnknownNameError: no such name (the message lists the known ones and the closest).
        """
        return get_plugin_registry().lookup(self.registrations(), self.word, name)

    def get(self, name: str) -> T:
        """The object registered under ``name``; :class:`UnknownNameError` when there is none."""
        return self.registration(name).obj


_registry: PluginRegistry | None = None
_registry_lock = threading.Lock()


def get_plugin_registry() -> PluginRegistry:
    """The process-wide plugin registry, built (and entry points loaded) on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = PluginRegistry()
        return _registry


def reload_plugins(autoload: bool | None = None) -> PluginRegistry:
    """Forget every plugin and discover them again (after a ``pip install``, or in tests).

    Plugins registered with :func:`register_plugin` are dropped.
    """
    global _registry
    with _registry_lock:
        _registry = PluginRegistry(autoload=autoload)
        return _registry


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object at run time, as a notebook or a test would.

    Args:
        plugin: a module, class or object with ``@timm_ood.hookimpl`` functions.
        name: the plugin's name; defaults to pluggy's canonical name.

    Returns:
        The name the plugin was registered under.
    """
    return get_plugin_registry().register(plugin, name)
