"""The detector conformance kit: check that a detector keeps timm-ood's contract.

Modelled on scikit-learn's ``check_estimator``: one generator of named checks,
each testing one property on small seeded data and saying how to fix the
detector when it fails; which checks run follows from what the detector
declares (its :class:`~timm_ood.Requirements`). Plugin authors run it in their
own tests::

    from timm_ood.testing import check_detector, parametrize_with_checks

    check_detector(MyDetector)                       # raises DetectorCheckError on the first failure

    @parametrize_with_checks([MyDetector, MyDetector(k=5)])
    def test_conformance(check):                     # one pytest test per check
        check()

The checks run on a tiny timm ``test_*`` model that the kit trains in a second
or two on scikit-learn's digits (cached per process), with uniform-noise
images as the easy out-of-distribution case: the model is trained with
outlier exposure on other noise images (Hendrycks, Mazeika & Dietterich,
ICLR 2019), so that noise is out-of-distribution both for its predictions and
for its features. The default architecture is ``test_convnext``; pass
``model="test_resnet"`` (any timm architecture name) to check on another, or
a model of your own trained on the kit's task as :func:`conformance_model`
trains one. Nothing here imports pytest except :func:`parametrize_with_checks`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ._runtime import eval_mode, model_device
from .detectors import detector_registrations, get_detector_class
from .detectors.base import Detector, Requirements
from .errors import IncompatibleModelError, NotFittedError
from .hookspecs import hookimpl
from .model import OODModel, wrap
from .model_info import data_config
from .registry import Registration, get_plugin_registry
from .registry import check_name as validate_name
from .tap import Need

__all__ = [
    "ALL_CHECKS",
    "DEFAULT_ARCHITECTURE",
    "MIN_SEPARATION_AUROC",
    "ConformanceData",
    "DetectorCheck",
    "DetectorCheckError",
    "check_detector",
    "conformance_data",
    "conformance_model",
    "detector_checks",
    "parametrize_with_checks",
]

DetectorSpec = Detector | type[Detector] | str
ModelSpec = str | nn.Module | None

#: The timm architecture the checks run on unless told otherwise.
DEFAULT_ARCHITECTURE = "test_convnext"
#: ``check_higher_is_more_ood`` fails below this AUROC of held-out digits vs uniform noise;
#: a detector with the wrong sign scores about ``1 - AUROC``, far below it.
MIN_SEPARATION_AUROC = 0.6

_IMAGE_SIZE = 32
_MEAN, _STD = 0.3, 0.4  # normalisation of the kit's 1-channel digits
_NUM_CLASSES = 10
_TRAIN_POOL = 1400  # digits the model trains on and detectors fit on; the rest is held out
_FIT_IMAGES, _FIT_BATCH = 256, 128
_EVAL_IMAGES = 64
_TRAIN_STEPS, _TRAIN_BATCH, _EXPOSURE_BATCH = 40, 24, 12
_EXPOSURE_WEIGHT = 0.5
_SEED = 0


class DetectorCheckError(AssertionError):
    """A detector failed a conformance check.

    Attributes:
        check: the check's name (``"check_higher_is_more_ood"``).
        detector: the detector, as named in messages (``"odin(temperature=10)"``).
        observed: what the check saw.
        fix: how to make the detector pass.
    """

    def __init__(self, check: str, detector: str, observed: str, fix: str) -> None:
        super().__init__(f"{check} failed for detector {detector}: {observed}. How to fix: {fix}")
        self.check, self.detector, self.observed, self.fix = check, detector, observed, fix


class _Failed(Exception):
    """Raised inside a check; :class:`DetectorCheck` turns it into a :class:`DetectorCheckError`."""

    def __init__(self, observed: str, fix: str) -> None:
        super().__init__(observed)
        self.observed, self.fix = observed, fix


def _fail(observed: str, fix: str) -> NoReturn:
    raise _Failed(observed, fix)


# -- the conformance task: digits in, uniform noise out ------------------------------------------


@dataclass(frozen=True)
class ConformanceData:
    """The kit's data for one model's input format, normalised as the model expects.

    Attributes:
        fit_batches: in-distribution training batches ``(images, labels)`` to fit detectors on.
        in_distribution: held-out digits [N, C, H, W].
        out_of_distribution: uniform-noise images [N, C, H, W], the easy OOD case.
    """

    fit_batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    in_distribution: torch.Tensor
    out_of_distribution: torch.Tensor

    def mixed(self, count: int) -> torch.Tensor:
        """``count`` images, half held-out digits and half noise, for invariance checks."""
        half = count // 2
        return torch.cat([self.in_distribution[:count - half], self.out_of_distribution[:half]])


@functools.cache
def _digit_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as [N, 1, 8, 8] pixels in [0, 1] and labels, in a seeded order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(_SEED))
    pixels = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16
    return pixels[order], torch.tensor(bunch.target)[order]


def _noise_pixels(count: int, channels: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.rand(count, channels, *size, generator=torch.Generator().manual_seed(seed))


class _InputFormat:
    """Turns [0, 1] pixels into a model's inputs: its size, channels and normalisation."""

    def __init__(self, input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.channels, self.size = input_size[0], tuple(input_size[1:])
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != self.size:
            pixels = F.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False)
        pixels = pixels.expand(-1, self.channels, -1, -1)
        return (pixels - self.mean) / self.std

    def noise(self, count: int, seed: int) -> torch.Tensor:
        return self(_noise_pixels(count, self.channels, self.size, seed))


def _input_format_key(model: nn.Module) -> tuple:
    try:
        config = data_config(model)
    except IncompatibleModelError as error:
        raise TypeError(
            f"the conformance kit cannot tell what images {type(model).__name__} takes ({error}); pass "
            "a timm architecture name as model=, or a timm model with a pretrained_cfg"
        ) from error
    return tuple(config["input_size"]), tuple(config["mean"]), tuple(config["std"])


@functools.cache
def _conformance_data(key: tuple) -> ConformanceData:
    to_inputs = _InputFormat(*key)
    pixels, labels = _digit_pixels()
    fit_images, fit_labels = to_inputs(pixels[:_FIT_IMAGES]), labels[:_FIT_IMAGES]
    batches = tuple(
        (fit_images[i:i + _FIT_BATCH], fit_labels[i:i + _FIT_BATCH]) for i in range(0, _FIT_IMAGES, _FIT_BATCH)
    )
    held_out = to_inputs(pixels[_TRAIN_POOL:_TRAIN_POOL + _EVAL_IMAGES])
    return ConformanceData(batches, held_out, to_inputs.noise(_EVAL_IMAGES, seed=_SEED + 1))


def conformance_data(model: nn.Module) -> ConformanceData:
    """The kit's digits and noise in ``model``'s input format (size, channels, normalisation).

    Raises:
        TypeError: the model carries no timm data config to read its input format from.
    """
    return _conformance_data(_input_format_key(model))


def _create_model(architecture: str) -> nn.Module:
    import timm

    overlay = {"input_size": (1, _IMAGE_SIZE, _IMAGE_SIZE), "mean": (_MEAN,), "std": (_STD,), "crop_pct": 1.0}
    fixed_size = getattr(timm.models.get_pretrained_cfg(architecture), "fixed_input_size", False)
    size = {"img_size": _IMAGE_SIZE} if fixed_size else {}  # ViTs are built for one input size
    return timm.create_model(architecture, num_classes=_NUM_CLASSES, in_chans=1,
                             pretrained_cfg_overlay=overlay, **size)


def _train(model: nn.Module) -> None:
    """Cross-entropy on digits plus outlier exposure: uniform predictions on noise images."""
    to_inputs = _InputFormat(*_input_format_key(model))
    pixels, labels = _digit_pixels()
    images, labels = to_inputs(pixels[:_TRAIN_POOL]), labels[:_TRAIN_POOL]
    generator = torch.Generator().manual_seed(_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(_TRAIN_STEPS):
        index = torch.randint(0, len(images), (_TRAIN_BATCH,), generator=generator)
        noise = to_inputs.noise(_EXPOSURE_BATCH, seed=_SEED + 1000 + step)
        logits = model(torch.cat([images[index], noise]))
        exposure = -logits[_TRAIN_BATCH:].log_softmax(dim=1).mean()
        loss = F.cross_entropy(logits[:_TRAIN_BATCH], labels[index]) + _EXPOSURE_WEIGHT * exposure
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@functools.cache
def _trained_state(architecture: str) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = _create_model(architecture)
        _train(model)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def conformance_model(architecture: str = DEFAULT_ARCHITECTURE) -> nn.Module:
    """A fresh copy of the kit's model: ``architecture`` (a timm name) trained on the kit's digits.

    1-channel 32x32 inputs, 10 classes, in eval mode. Trained once per process
    (a second or two for timm's ``test_*`` architectures) with a fixed seed;
    the caller's random number generators are left as they were.
    """
    model = _create_model(architecture)
    model.load_state_dict(_trained_state(architecture))
    return model.eval()


@functools.cache
def _shared_model(architecture: str) -> nn.Module:
    """One model per architecture and process, shared by the checks: they never modify it."""
    return conformance_model(architecture)


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


def _detector_class(spec: DetectorSpec) -> type[Detector]:
    if isinstance(spec, Detector):
        return type(spec)
    if isinstance(spec, type) and issubclass(spec, Detector):
        return spec
    if isinstance(spec, str):
        return get_detector_class(spec)
    raise TypeError(f"expected a Detector class, instance or registered name, got {spec!r}")


def _hyperparameters_of(spec: DetectorSpec, hyperparameters: Mapping[str, Any] | None) -> dict[str, Any]:
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


# -- the checks ---------------------------------------------------------------------------------------

CheckFunction = Callable[[_Subject], None]
Applies = Callable[[Requirements], bool]

#: Every check, cheapest first, with when it applies.
_CHECKS: list[tuple[CheckFunction, Applies]] = []


def _check(applies: Applies = lambda requirements: True) -> Callable[[CheckFunction], CheckFunction]:
    def register(function: CheckFunction) -> CheckFunction:
        _CHECKS.append((function, applies))
        return function

    return register


def _needs_fit(requirements: Requirements) -> bool:
    return requirements.fit


@_check()
def check_name(subject: _Subject) -> None:
    """The name is valid and, when registered, resolves to this class."""
    cls = subject.cls
    try:
        validate_name(cls.name, "detector")
    except ValueError as error:
        _fail(str(error), "set the class attribute name = 'my-detector' (lower case, words joined by '-')")
    registration = detector_registrations().get(cls.name)
    if registration is not None and registration.obj is not cls:
        _fail(_name_taken(cls, registration), _RENAME)


@_check()
def check_init_stores_hyperparameters(subject: _Subject) -> None:
    """``__init__`` takes explicit keyword arguments with defaults and stores each unchanged."""
    parameters = list(inspect.signature(subject.cls.__init__).parameters.values())[1:]
    variadic = [p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic:
        _fail(f"__init__ takes *{', *'.join(variadic)}, which hyperparameters() cannot list",
              "list every hyperparameter as an explicit keyword argument with a default")
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty]
    if required:
        _fail(f"__init__ arguments {', '.join(required)} have no default",
              "give every hyperparameter a default: create_detector(name) builds the detector without arguments")
    expected = {**_defaults(subject.cls), **subject.hyperparameters}
    detector = subject.new()
    for name, value in expected.items():
        if not hasattr(detector, name):
            _fail(f"__init__ argument {name!r} is not stored as an attribute",
                  f"assign self.{name} = {name} in __init__ (hyperparameters are read back by name)")
        if not _same_value(getattr(detector, name), value):
            _fail(f"__init__ changed hyperparameter {name!r}: passed {value!r}, stored {getattr(detector, name)!r}",
                  "store hyperparameters exactly as given; validate them in check_hyperparameters() "
                  "and derive other values where they are used")


@_check()
def check_hyperparameters_are_json(subject: _Subject) -> None:
    """Hyperparameters survive JSON, as ``save_detector`` / ``load_detector`` store them."""
    hyperparameters = subject.prototype.hyperparameters()
    try:
        text = _json(hyperparameters)
    except (TypeError, ValueError) as error:
        _fail(f"hyperparameters {hyperparameters!r} are not JSON-serialisable ({error})",
              "use numbers, strings, booleans, None, lists and dicts as hyperparameter values")
    rebuilt = subject.cls(**json.loads(text)).hyperparameters()
    if _json(rebuilt) != text:
        _fail(f"rebuilt from JSON the detector has hyperparameters {rebuilt!r}, not {hyperparameters!r}",
              "store hyperparameters exactly as given to __init__")


@_check()
def check_set_hyperparameters(subject: _Subject) -> None:
    """Unknown names raise TypeError; known ones set in place; a fit hyperparameter unfits."""
    detector = subject.new()
    unknown = "no_such_hyperparameter"
    try:
        detector.set_hyperparameters(**{unknown: 1})
    except TypeError as error:
        if unknown not in str(error):
            _fail(f"the TypeError for an unknown hyperparameter does not name it: {error}",
                  "keep Detector.set_hyperparameters, which names the unknown and the known hyperparameters")
    else:
        _fail("set_hyperparameters(no_such_hyperparameter=1) raised nothing",
              "keep Detector.set_hyperparameters, which raises TypeError for names __init__ does not take")
    if detector.set_hyperparameters(**detector.hyperparameters()) is not detector:
        _fail("set_hyperparameters() did not return the detector", "return self, for chaining")
    fit_names = sorted(subject.prototype.fit_hyperparameters)
    if subject.requirements.fit and fit_names:
        fitted = subject.fitted().detector
        fitted.set_hyperparameters(**{fit_names[0]: getattr(fitted, fit_names[0])})
        if fitted.is_fitted:
            _fail(f"setting fit hyperparameter {fit_names[0]!r} left the detector fitted",
                  "keep Detector.set_hyperparameters, which unfits the detector when a fit hyperparameter changes")


@_check()
def check_declarations(subject: _Subject) -> None:
    """``requirements``, ``search_space`` and ``fit_hyperparameters`` are well-formed and consistent."""
    requirements, cls = subject.requirements, subject.cls
    if not isinstance(requirements, Requirements):
        _fail(f"requirements is {requirements!r}", "declare requirements = timm_ood.Requirements(...)")
    for needs in (requirements.outputs, requirements.outputs_for_fit):
        if not all(isinstance(need, Need) for need in needs):
            _fail(f"requirements list {sorted(map(str, needs))}, not timm_ood.Need members",
                  "list outputs as frozenset({Need.LOGITS, ...})")
    if (requirements.fit_labels or requirements.fit_outputs is not None) and not requirements.fit:
        _fail("requirements declare fit_labels or fit_outputs but not fit=True",
              "declare Requirements(fit=True, ...) for a detector that is fitted")
    names = set(cls.hyperparameter_names())
    for attribute in ("search_space", "fit_hyperparameters"):
        unknown = sorted(set(getattr(cls, attribute)) - names)
        if unknown:
            _fail(f"{attribute} names {unknown}, which are not __init__ arguments ({sorted(names)})",
                  f"list only hyperparameters in {attribute}")
    for name, candidates in cls.search_space.items():
        for value in candidates:
            try:
                cls(**{**subject.hyperparameters, name: value})
            except Exception as error:
                _fail(f"search_space value {name}={value!r} is refused: {type(error).__name__}: {error}",
                      "list only valid values in search_space")


@_check()
def check_declared_outputs_suffice(subject: _Subject) -> None:
    """Fit and score read only the outputs declared in ``requirements``."""
    ood = subject.wrap()
    phase, declared = "fit", subject.requirements.outputs_for_fit
    try:
        ood.fit(subject.data.fit_batches, progress=False)
        phase, declared = "score", subject.requirements.outputs
        _scores(ood, subject.sample())
    except RuntimeError as error:
        if _UNDECLARED_OUTPUT not in str(error):
            raise
        where = "fit_outputs (or outputs)" if phase == "fit" else "outputs"
        _fail(f"during {phase} it read an output it did not declare (declared: "
              f"{sorted(need.value for need in declared) or 'nothing'}): {error}",
              f"add the need to Requirements.{where}")


@_check()
def check_score_shape_and_dtype(subject: _Subject) -> None:
    """``score`` returns a finite floating tensor [B] (float32 or wider) on the model's device."""
    ood = subject.fitted()
    device = model_device(ood.model)
    for batch in (5, 1):
        scores = _raw_scores(ood, subject.sample(batch))
        if not isinstance(scores, torch.Tensor):
            _fail(f"score() returned {type(scores).__name__}", "return a torch.Tensor of shape [B]")
        if tuple(scores.shape) != (batch,):
            _fail(f"score() returned shape {tuple(scores.shape)} for a batch of {batch}",
                  "return one score per input, shape [B] (beware .squeeze() on a batch of 1)")
        if not scores.is_floating_point() or torch.finfo(scores.dtype).bits < 32:
            _fail(f"score() returned dtype {scores.dtype}",
                  "return float32 or float64 scores (timm_ood.detectors.base.score_dtype)")
        if scores.device != device:
            _fail(f"score() returned scores on {scores.device} for a model on {device}",
                  "compute scores where the outputs are; never hard-code a device")
        if not torch.isfinite(scores).all():
            _fail(f"score() returned non-finite scores {scores.tolist()} for ordinary images",
                  "guard divisions and logarithms (clamp, logsumexp)")


@_check(_needs_fit)
def check_unfitted_raises(subject: _Subject) -> None:
    """Scoring before ``fit`` raises NotFittedError (detectors declaring ``fit=True``)."""
    try:
        _scores(subject.wrap(), subject.sample())
    except NotFittedError:
        return
    except Exception as error:
        _fail(f"scoring before fit raised {type(error).__name__}: {error}, not NotFittedError",
              "keep Detector.forward / check_fitted, which raise NotFittedError while is_fitted is False")
    _fail("it scored without being fitted",
          "leave is_fitted False until fit: fit_detectors sets it after finish_fit; never set it in __init__")


@_check(lambda requirements: not requirements.fit)
def check_scores_without_fit(subject: _Subject) -> None:
    """A detector that declares no fit scores straight away."""
    try:
        _scores(subject.wrap(), subject.sample())
    except Exception as error:
        _fail(f"scoring without fit raised {type(error).__name__}: {error}",
              "declare Requirements(fit=True) if the detector needs in-distribution data first")


@_check(lambda requirements: requirements.fit and not requirements.fit_labels)
def check_fit_without_labels(subject: _Subject) -> None:
    """A detector that does not declare ``fit_labels`` fits on unlabelled batches."""
    unlabelled = [images for images, _ in subject.data.fit_batches]
    try:
        ood = subject.wrap().fit(unlabelled, progress=False)
    except Exception as error:
        _fail(f"fitting on unlabelled batches raised {type(error).__name__}: {error}",
              "declare Requirements(fit_labels=True) if the fit uses class labels")
    _scores(ood, subject.sample())


@_check(_needs_fit)
def check_fit_keeps_hyperparameters(subject: _Subject) -> None:
    """``fit`` leaves the hyperparameters as they were."""
    ood = subject.wrap()
    before = _json(ood.detector.hyperparameters())
    ood.fit(subject.data.fit_batches, progress=False)
    after = _json(ood.detector.hyperparameters())
    if before != after:
        _fail(f"fit changed the hyperparameters from {before} to {after}",
              "keep what fit learns in buffers, under names that are not hyperparameters")


def _public_attributes(detector: Detector) -> dict[str, Any]:
    return {k: v for k, v in vars(detector).items() if not k.startswith("_") and k not in ("training", "is_fitted")}


@_check(_needs_fit)
def check_fitted_state_in_buffers(subject: _Subject) -> None:
    """What ``fit`` learns lives in buffers (saved, moved with ``.to()``), not in plain attributes."""
    ood = subject.wrap()
    before = _public_attributes(ood.detector)
    ood.fit(subject.data.fit_batches, progress=False)
    hyperparameters = set(subject.cls.hyperparameter_names())
    changed = sorted(
        name for name, value in _public_attributes(ood.detector).items()
        if name not in hyperparameters and (name not in before or before[name] is not value)
    )
    if changed:
        _fail(f"fit set the plain attributes {changed}, which save_detector does not save",
              "register fitted state with self.register_buffer(name, None) in __init__ and assign tensors "
              "to it in finish_fit; keep scratch state under a leading underscore")


@_check()
def check_state_is_tensors(subject: _Subject) -> None:
    """``fitted_state()`` maps names to tensors (no pickle), and is not empty after a fit."""
    detector = subject.fitted().detector
    state = detector.fitted_state()
    if not isinstance(state, Mapping):
        _fail(f"fitted_state() returned {type(state).__name__}", "keep Detector.fitted_state (buffers by name)")
    wrong = {name: type(value).__name__ for name, value in state.items() if not isinstance(value, torch.Tensor)}
    if wrong:
        _fail(f"fitted_state() holds non-tensors {wrong}",
              "keep fitted state in tensors; serialise other objects into a uint8 tensor with a safe format")
    if subject.requirements.fit and not state:
        _fail("the fitted detector has no state to save",
              "register what fit learns as buffers (self.register_buffer) so save_detector can store it")


@_check()
def check_higher_is_more_ood(subject: _Subject) -> None:
    """Uniform noise scores higher than held-out digits (AUROC >= MIN_SEPARATION_AUROC)."""
    ood = subject.fitted()
    auroc = _auroc(_scores(ood, subject.data.in_distribution), _scores(ood, subject.data.out_of_distribution))
    if auroc < MIN_SEPARATION_AUROC:
        skip = ("if the sign is right, the method cannot tell this model's noise from its digits: "
                "skip the check with that reason (skip={'check_higher_is_more_ood': ...})")
        hint = ("scores rank digits as more out-of-distribution than noise: return the negation of a score "
                f"that is higher for in-distribution inputs (a confidence, likelihood or similarity); {skip}"
                if auroc < 1 - MIN_SEPARATION_AUROC else
                f"check the score's sign and that it reads what it declares; {skip}")
        _fail(f"AUROC of held-out digits vs uniform noise is {auroc:.3f} (< {MIN_SEPARATION_AUROC}); "
              "higher scores must mean more out-of-distribution", hint)


@_check()
def check_deterministic(subject: _Subject) -> None:
    """The same batch gives the same scores twice, and two fits on the same data agree."""
    images = subject.sample()
    first = subject.fitted()
    scores, again = _scores(first, images), _scores(first, images)
    if not torch.equal(scores, again):
        difference, index = _largest_difference(scores, again)
        _fail(f"scoring one batch twice changed score {index} by {difference:.3g}",
              "score deterministically: no sampling, dropout or state updates in score()")
    second = _scores(subject.fit(), images)
    if not torch.equal(scores, second):
        difference, index = _largest_difference(scores, second)
        _fail(f"two fits on the same data give scores differing by {difference:.3g} (input {index})",
              "seed every random choice of the fit from a hyperparameter (e.g. random_state=0)")


@_check()
def check_batch_size_invariance(subject: _Subject) -> None:
    """Scores of a batch equal the scores of its halves and of each input alone."""
    ood = subject.fitted()
    images = subject.sample(12)
    whole = _scores(ood, images)
    tolerance = _tolerance(whole, of_spread=1e-4, of_scale=1e-6)
    halves = torch.cat([_scores(ood, images[:6]), _scores(ood, images[6:])])
    singles = torch.cat([_scores(ood, images[i:i + 1]) for i in range(len(images))])
    for split, scores in (("its two halves", halves), ("one image at a time", singles)):
        difference, index = _largest_difference(whole, scores)
        if difference > tolerance:
            _fail(f"score {index} is {float(whole[index]):.8g} in a batch of 12 but {float(scores[index]):.8g} "
                  f"when scoring {split} (tolerance {tolerance:.3g})",
                  "score every input independently: no batch statistics (means, ranks, normalisation over "
                  "the batch) and the model in eval mode")


def _check_follows(subject: _Subject, to: Mapping[str, Any], what: str) -> None:
    """Fit on the model as it is, move the wrapped model, and compare state and scores."""
    images = subject.sample()
    ood = subject.fitted(around=copy.deepcopy(subject.model))
    reference = _scores(ood, images)
    ood.to(**to)
    device, dtype = to.get("device"), to.get("dtype")
    for name, tensor in ood.detector.fitted_state().items():
        if device is not None and tensor.device.type != torch.device(device).type:
            _fail(f"buffer {name!r} stayed on {tensor.device} after model.to({what})",
                  "keep fitted state in buffers: .to() moves buffers with the model")
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            _fail(f"buffer {name!r} stayed {tensor.dtype} after model.to({what})",
                  "keep fitted state in buffers: .to() converts floating buffers with the model")
    moved = _scores(ood, images.to(**to))
    if device is not None and moved.device.type != torch.device(device).type:
        _fail(f"scores are on {moved.device} for a model on {device}", "compute scores where the outputs are")
    if dtype is not None and moved.dtype != torch.promote_types(dtype, torch.float32):
        _fail(f"scores are {moved.dtype} for a {dtype} model",
              "return scores in the model's dtype, at least float32 (timm_ood.detectors.base.score_dtype)")
    tolerance = _tolerance(reference, of_spread=1e-2, of_scale=1e-5)
    difference, index = _largest_difference(reference, moved)
    if difference > tolerance:
        _fail(f"after model.to({what}) score {index} moved from {float(reference[index]):.8g} to "
              f"{float(moved[index]):.8g} (tolerance {tolerance:.3g})",
              "compute with the state's and the inputs' device and dtype; never cast to a fixed dtype")


@_check()
def check_follows_model_dtype(subject: _Subject) -> None:
    """After ``model.to(torch.float64)`` the fitted state and the scores are float64, and agree."""
    _check_follows(subject, {"dtype": torch.float64}, "torch.float64")


@_check(lambda requirements: torch.cuda.is_available())
def check_follows_cuda(subject: _Subject) -> None:
    """After ``model.to("cuda")`` the fitted state and the scores are on the GPU, and agree."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    try:
        _check_follows(subject, {"device": "cuda"}, "'cuda'")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@_check()
def check_save_load_round_trip(subject: _Subject) -> None:
    """``save_detector`` then ``load_detector`` (safetensors, no pickle) gives identical scores."""
    ood = subject.fitted()
    images = subject.sample()
    expected = _scores(ood, images)
    with tempfile.TemporaryDirectory() as directory, _registered(subject.cls):
        path = os.path.join(directory, "detector.safetensors")
        ood.save_detector(path)
        with safe_open(path, framework="pt") as handle:
            saved = set(handle.keys())
        loaded = wrap(subject.model, subject.new()).load_detector(path)
    detector, state = loaded.detector, ood.detector.fitted_state()
    if type(detector) is not subject.cls or _json(detector.hyperparameters()) != _json(ood.detector.hyperparameters()):
        _fail(f"the file loads as {type(detector).__name__}{detector.hyperparameters()}",
              "register the detector under its own name with JSON-serialisable hyperparameters")
    missing = sorted(set(state) - saved)
    if missing:
        _fail(f"the saved file lacks fitted state {missing}", "keep Detector.fitted_state (every buffer that is set)")
    restored = detector.fitted_state()
    changed = sorted(name for name in state if name not in restored or not torch.equal(restored[name], state[name]))
    if changed:
        _fail(f"state {changed} differs after loading", "keep Detector.load_fitted_state, or restore every buffer")
    scores = _scores(loaded, images)
    if not torch.equal(scores, expected):
        difference, index = _largest_difference(expected, scores)
        _fail(f"scores differ after save and load by up to {difference:.3g} (input {index}): state that "
              "does not round-trip",
              "keep everything score() reads in buffers (or rebuild it from them in load_fitted_state)")


def _mlp_head(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose linear classifier is replaced by a two-layer MLP (None without one)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        return None
    model = copy.deepcopy(model)
    classifier = model.get_classifier()
    name = next(name for name, module in model.named_modules() if module is classifier)
    width = classifier.in_features
    with torch.random.fork_rng(devices=[]):  # the same head whatever ran before (test order under xdist)
        torch.manual_seed(0)
        head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classifier.out_features))
    model.set_submodule(name, head.to(classifier.weight.device))
    return model.eval()


@_check()
def check_linear_classifier_declared(subject: _Subject) -> None:
    """Only detectors declaring ``linear_classifier`` need one: others work with an MLP head."""
    model = _mlp_head(subject.model)
    if model is None:
        return
    if subject.requirements.linear_classifier:
        try:
            subject.wrap(model)
        except IncompatibleModelError:
            return
        _fail("wrap() accepted a model whose classifier is an MLP although the detector needs a linear one",
              "keep Detector.check_model, which refuses such models when requirements.linear_classifier is set")
    try:
        ood = subject.fit(model)
        _scores(ood, subject.sample())
    except IncompatibleModelError as error:
        _fail(f"with an MLP classifier it raised IncompatibleModelError: {error}",
              "declare Requirements(linear_classifier=True) if the detector reads the classifier's weight")


def _applicable_checks(requirements: Requirements) -> Iterator[CheckFunction]:
    """The checks for a detector with these requirements (and this machine), cheapest first."""
    return (function for function, applies in _CHECKS if applies(requirements))


#: The names of every check of the kit, applicable or not.
ALL_CHECKS: tuple[str, ...] = tuple(function.__name__ for function, _ in _CHECKS)


# -- running checks --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DetectorCheck:
    """One conformance check bound to a detector and a model; call it to run it.

    Attributes:
        name: the check's name (``"check_batch_size_invariance"``).
        detector: the detector as named in messages and test ids.
        description: what the check tests, in one line.
    """

    name: str
    detector: str
    description: str
    _function: CheckFunction = field(repr=False)
    _cls: type[Detector] = field(repr=False)
    _hyperparameters: dict[str, Any] = field(repr=False)
    _model: ModelSpec = field(repr=False)

    def __call__(self) -> None:
        """Run the check.

        Raises:
            DetectorCheckError: the detector fails it; the message names the
                check, the detector, what was observed and how to fix it.
        """
        model, model_name = _resolve_model(self._model)
        label = f"{self.detector} on {model_name}"
        try:
            self._function(_Subject(self._cls, self._hyperparameters, model))
        except _Failed as failure:
            raise DetectorCheckError(self.name, label, failure.observed, failure.fix) from None
        except DetectorCheckError:
            raise
        except Exception as error:
            raise DetectorCheckError(
                self.name, label, f"the detector raised {type(error).__name__}: {error}", _fix_for(error)
            ) from error

    def __str__(self) -> str:
        return f"{self.detector}-{self.name}"


def _check_skip(skip: Mapping[str, str] | None) -> dict[str, str]:
    skip = dict(skip or {})
    unknown = sorted(set(skip) - set(ALL_CHECKS))
    if unknown:
        raise ValueError(f"skip names unknown checks {unknown}; the checks are: {', '.join(ALL_CHECKS)}")
    return skip


def detector_checks(
    detector: DetectorSpec,
    *,
    model: ModelSpec = None,
    hyperparameters: Mapping[str, Any] | None = None,
    skip: Mapping[str, str] | None = None,
) -> Iterator[DetectorCheck]:
    """The checks that apply to ``detector``, as callables, selected from its declared requirements.

    Args:
        detector: a Detector class, an instance (its hyperparameters are
            used; it is never fitted or modified), or a registered name.
        model: a timm architecture name the kit builds and trains on its
            digits (default :data:`DEFAULT_ARCHITECTURE`), built when a check
            first runs; or a model of your own taking the kit's images (read
            from its timm data config). Logit detectors separate the kit's
            noise from digits only on a model trained with the noise as
            outlier exposure, as :func:`conformance_model` trains one.
        hyperparameters: for a class or a name, the hyperparameters to check with.
        skip: ``{check_name: reason}`` for checks not to yield.

    Yields:
        :class:`DetectorCheck` objects; ``str(check)`` is a test id.

    Raises:
        ValueError: ``skip`` names a check that does not exist.
    """
    skip = _check_skip(skip)
    cls = _detector_class(detector)
    values = _hyperparameters_of(detector, hyperparameters)
    label = _describe(cls, values)
    requirements = cls(**values).requirements
    for function in _applicable_checks(requirements):
        if function.__name__ not in skip:
            description = (function.__doc__ or "").strip().splitlines()[0]
            yield DetectorCheck(function.__name__, label, description, function, cls, values, model)


def check_detector(
    detector: DetectorSpec,
    *,
    model: ModelSpec = None,
    hyperparameters: Mapping[str, Any] | None = None,
    skip: Mapping[str, str] | None = None,
) -> list[str]:
    """Run every applicable conformance check on ``detector``; raise on the first failure.

    ::

        check_detector(MyDetector)
        check_detector("odin", hyperparameters={"temperature": 10}, model="test_vit")

    Args:
        detector: a Detector class, an instance, or a registered name.
        model: a timm architecture name (default :data:`DEFAULT_ARCHITECTURE`)
            or a model, as for :func:`detector_checks`.
        hyperparameters: for a class or a name, the hyperparameters to check with.
        skip: ``{check_name: reason}`` for checks the detector is known to
            fail, with the reason (as scikit-learn's ``expected_failed_checks``).

    Returns:
        The names of the checks that ran, in order.

    Raises:
        DetectorCheckError: a check failed (an ``AssertionError``).
    """
    checks = list(detector_checks(detector, model=model, hyperparameters=hyperparameters, skip=skip))
    for check in checks:
        check()
    return [check.name for check in checks]


def parametrize_with_checks(
    detectors: Sequence[DetectorSpec], *, model: ModelSpec = None, skip: Mapping[str, str] | None = None
):
    """A ``pytest.mark.parametrize`` over every check of every detector, with readable ids.

    ::

        @parametrize_with_checks([MyDetector, MyDetector(k=5)])
        def test_conformance(check):
            check()

    Args:
        detectors: Detector classes, instances (for other hyperparameters) or registered names.
        model: as for :func:`check_detector`.
        skip: ``{check_name: reason}``: those checks are reported as skipped, with the reason.

    Returns:
        The parametrize mark, over an argument named ``check``.
    """
    import pytest

    skip = _check_skip(skip)
    params = []
    for detector in detectors:
        for check in detector_checks(detector, model=model):
            marks = [pytest.mark.skip(reason=skip[check.name])] if check.name in skip else []
            params.append(pytest.param(check, id=str(check), marks=marks))
    return pytest.mark.parametrize("check", params)
