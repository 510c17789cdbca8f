"""The conformance checks, cheapest first, each with when it applies.

Each check takes the detector under check (a ``_Subject``) and raises
``_Failed`` with what it observed and how to fix the detector;
:class:`~timm_ood.testing.DetectorCheck` turns that into a
:class:`~timm_ood.testing.DetectorCheckError`.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .._runtime import model_device
from ..detectors import detector_registrations
from ..detectors.base import Detector, Requirements
from ..errors import IncompatibleModelError, NotFittedError
from ..model import wrap
from ..model_info import timm_api
from ..registry import check_name as validate_name
from ..tap import Need
from ._helpers import (
    _RENAME,
    _UNDECLARED_OUTPUT,
    _auroc,
    _defaults,
    _fail,
    _json,
    _largest_difference,
    _name_taken,
    _raw_scores,
    _registered,
    _same_value,
    _scores,
    _Subject,
    _tolerance,
)

__all__ = ["ALL_CHECKS", "MIN_SEPARATION_AUROC"]

#: ``check_higher_is_more_ood`` fails below this AUROC of held-out digits vs uniform noise;
#: a detector with the wrong sign scores about ``1 - AUROC``, far below it.
MIN_SEPARATION_AUROC = 0.6

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
def check_name_is_valid_and_unique(subject: _Subject) -> None:
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
    classifier = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        return None
    model = copy.deepcopy(model)
    copied = timm_api(model).get_classifier()
    name = next(name for name, module in model.named_modules() if module is copied)
    width = classifier.in_features  # the copy's sizes and device are the original's
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
