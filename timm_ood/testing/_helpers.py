"""What the checks share: the detector under check with its model and data, and scoring helpers."""

from __future__ import annotations

import copy
import inspect
import json
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
from torch import nn

from .._runtime import eval_mode, model_device
from ..detectors import detector_registrations, get_detector_class
from ..detectors.base import Detector, Requirements
from ..errors import NotFittedError
from ..hookspecs import hookimpl
from ..model import OODModel, wrap
from ..registry import Registration, get_plugin_registry
from .task import DEFAULT_ARCHITECTURE, _shared_model, conformance_data

#: A detector to check: a Detector class, an instance (its hyperparameters are used) or a registered name.
DetectorUnderTest = Detector | type[Detector] | str
#: A model to check on: a timm architecture name, a model, or None for :data:`DEFAULT_ARCHITECTURE`.
ModelSpec = str | nn.Module | None


class _Failed(Exception):
    """Raised inside a check; :class:`DetectorCheck` turns it into a :class:`DetectorCheckError`."""

    def __init__(self, observed: str, fix: str) -> None:
        super().__init__(observed)
        self.observed, self.fix = observed, fix


def _fail(observed: str, fix: str) -> NoReturn:
    raise _Failed(observed, fix)


# -- what one check works on -------------------------------------------------------------------------


_NO_DEFAULT = object()


def _describe(cls: type[Detector], hyperparameters: Mapping[str, Any]) -> str:
    """``odin(temperature=10)``: the name and the hyperparameters that differ from the defaults."""
    defaults = _defaults(cls)
    changed = {k: v for k, v in hyperparameters.items() if not _same_value(defaults.get(k, _NO_DEFAULT), v)}
    arguments = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    return (cls.name or cls.__name__) + (f"({arguments})" if arguments else "")


def _defaults(cls: type[Detector]) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _detector_class(spec: DetectorUnderTest) -> type[Detector]:
    if isinstance(spec, Detector):
        return type(spec)
    if isinstance(spec, type) and issubclass(spec, Detector):
        return spec
    if isinstance(spec, str):
        return get_detector_class(spec)
    raise TypeError(f"expected a Detector class, instance or registered name, got {spec!r}")


def _hyperparameters_of(spec: DetectorUnderTest, hyperparameters: Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(spec, Detector):
        if hyperparameters:
            raise TypeError("pass hyperparameters either in the detector instance or as hyperparameters=, not both")
        return spec.hyperparameters()
    return dict(hyperparameters or {})


#: One fitted detector per model, detector class and hyperparameters, shared by the checks.
_FITS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Detector]] = weakref.WeakKeyDictionary()


class _Subject:
    """The detector under check, the model and the data, with helpers the checks share."""

    def __init__(self, cls: type[Detector], hyperparameters: dict[str, Any], model: nn.Module) -> None:
        self.cls, self.hyperparameters, self.model = cls, hyperparameters, model
        self.data = conformance_data(model)
        self.prototype = self.new()

    def new(self) -> Detector:
        """A fresh, unfitted detector with the hyperparameters under check."""
        return self.cls(**self.hyperparameters)

    @property
    def requirements(self) -> Requirements:
        return self.prototype.requirements

    def wrap(self, model: nn.Module | None = None) -> OODModel:
        return wrap(self.model if model is None else model, self.new())

    def fit(self, model: nn.Module | None = None) -> OODModel:
        """A fresh detector fitted now on the kit's digits (a no-op without fit), wrapped."""
        return self.wrap(model).fit(self.data.fit_batches, progress=False)

    def fitted(self, around: nn.Module | None = None) -> OODModel:
        """A copy of this process's one fit of the detector on the model, wrapped around ``around``.

        Checks that only need a fitted detector share one fit (the slow part for
        scikit-learn-style detectors); checks about fitting call :meth:`fit`.
        """
        fits = _FITS.setdefault(self.model, {})
        key = (self.cls, repr(sorted(self.hyperparameters.items())))
        if key not in fits:
            fits[key] = self.fit().detector
        try:
            detector = copy.deepcopy(fits[key])
        except Exception:  # state that cannot be copied (an external index): fit again
            return self.fit(around)
        return wrap(self.model if around is None else around, detector)

    def sample(self, count: int = 12) -> torch.Tensor:
        return self.data.mixed(count)


def _resolve_model(model: ModelSpec) -> tuple[nn.Module, str]:
    if model is None or isinstance(model, str):
        architecture = model or DEFAULT_ARCHITECTURE
        return _shared_model(architecture), architecture
    if isinstance(model, nn.Module):
        return model, type(model).__name__
    raise TypeError(f"model must be a timm architecture name or an nn.Module, got {model!r}")


@contextmanager
def _registered(cls: type[Detector]) -> Iterator[None]:
    """``cls`` registered under its name for the block (saving and loading go by name).

    A detector that is not registered yet (during development) is registered
    through a temporary plugin and unregistered afterwards.
    """
    registration = detector_registrations().get(cls.name)
    if registration is not None:
        if registration.obj is not cls:
            _fail(_name_taken(cls, registration), _RENAME)
        yield
        return
    registry = get_plugin_registry()
    plugin_name = registry.register(_TemporaryPlugin(cls), f"timm_ood.testing[{cls.__module__}.{cls.__qualname__}]")
    try:
        yield
    finally:
        registry.unregister(plugin_name)


class _TemporaryPlugin:
    def __init__(self, cls: type[Detector]) -> None:
        self._cls = cls

    @hookimpl
    def timm_ood_detectors(self) -> list[type[Detector]]:
        return [self._cls]


_RENAME = (
    "choose a name no other installed detector uses: two plugins registering one name are a "
    "DuplicateNameError for every user who installs both"
)


def _name_taken(cls: type[Detector], registration: Registration[type[Detector]]) -> str:
    other = registration.obj
    return (
        f"the name {cls.name!r} is already registered by plugin {registration.plugin!r} from "
        f"{registration.distribution} for {other.__module__}.{other.__qualname__}"
    )


# -- helpers for the checks ----------------------------------------------------------------------------


def _scores(ood: OODModel, images: torch.Tensor) -> torch.Tensor:
    return ood.ood_score(images).detach()


def _raw_scores(ood: OODModel, images: torch.Tensor) -> Any:
    """What ``Detector.score`` returns, before ``forward`` checks it (same grad mode as ``ood_score``)."""
    detector = ood.detector
    grad_mode = torch.no_grad() if detector.requirements.input_gradients else torch.inference_mode()
    with eval_mode(ood.model, detector), grad_mode:
        return detector.score(ood.tap(images.to(model_device(ood.model)), detector.requirements.outputs))


def _spread(scores: torch.Tensor) -> float:
    scores = scores.double()
    return float(scores.max() - scores.min())


def _tolerance(reference: torch.Tensor, of_spread: float, of_scale: float) -> float:
    """An absolute tolerance relative to how much the scores vary, and to their magnitude."""
    return of_spread * _spread(reference) + of_scale * float(reference.double().abs().max()) + 1e-12


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    difference = (a.double().cpu() - b.double().cpu()).abs()
    index = int(difference.argmax())
    return float(difference[index]), index


def _auroc(in_distribution: torch.Tensor, out_of_distribution: torch.Tensor) -> float:
    """P(OOD score > ID score), ties counted half (the Mann-Whitney statistic)."""
    difference = out_of_distribution.double().cpu()[:, None] - in_distribution.double().cpu()[None, :]
    return float(((difference > 0).double() + 0.5 * (difference == 0).double()).mean())


def _json(hyperparameters: Mapping[str, Any]) -> str:
    return json.dumps(dict(hyperparameters), sort_keys=True)


def _same_value(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # arrays and tensors compare element-wise
        return False


_UNDECLARED_OUTPUT = "the tap did not compute"
_GRADIENT_ERRORS = ("does not require grad", "Inference tensors", "inference_mode", "grad_fn")


def _fix_for(error: Exception) -> str:
    """A fix for an exception a detector raised during a check, from what it says."""
    message = str(error)
    if _UNDECLARED_OUTPUT in message:
        return ("declare every output the detector reads: Requirements(outputs=...) for score(), "
                "fit_outputs=... for update_fit(); the tap computes nothing else")
    if any(pattern in message for pattern in _GRADIENT_ERRORS):
        return ("a detector that runs its own backward passes must declare "
                "Requirements(input_gradients=True); scoring otherwise runs under torch.inference_mode()")
    if isinstance(error, NotFittedError):
        return "the detector must be usable once fit() has run (fit_detectors sets is_fitted after finish_fit)"
    return "see the exception chained above (raised by the detector)"


