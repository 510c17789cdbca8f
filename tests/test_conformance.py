"""The conformance kit (``timm_ood.testing``): every built-in passes it, broken detectors do not."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import tomllib
import torch

import timm_ood
import timm_ood.testing
from timm_ood import Detector, Need, Requirements
from timm_ood.detectors.base import score_dtype
from timm_ood.registry import AUTOLOAD_ENV
from timm_ood.testing import (
    ALL_CHECKS,
    DetectorCheckError,
    check_detector,
    detector_checks,
    parametrize_with_checks,
)

from .test_registry import install_distribution

REPOSITORY = Path(__file__).resolve().parents[1]
#: Built-ins that refuse the kit's plain models (mc-dropout needs dropout layers, deep-ensemble an
#: ensemble of models): tests/detectors/test_sampling.py runs the kit on such models instead.
OWN_MODELS = {"mc-dropout", "deep-ensemble"}
#: Built-ins that read a head installed by training.replace_head (BIN/BINC sigmoids, VIB/VIBY bottlenecks) and
#: refuse a linear head: tests/training/test_sigmoid_bottleneck.py runs the kit on models with those heads.
OWN_MODELS |= {"bin", "vib", "viby-1", "viby-2"}
BUILTINS = [
    name for name, distribution in timm_ood.list_detectors(with_distribution=True).items()
    if distribution.split()[0] == "timm-ood" and name not in OWN_MODELS
]

_MAP_IS_1X1 = ("the kit's 32 px images give this architecture a 1 x 1 final feature map, which is all rank 1: "
               "rankfeat refuses it with IncompatibleModelError; tests/detectors/test_shaping.py runs "
               "the kit on a ResNet with 2 x 2 maps")
_SCORING_CHECKS = ("check_declared_outputs_suffice", "check_score_shape_and_dtype", "check_scores_without_fit",
                   "check_higher_is_more_ood", "check_deterministic", "check_batch_size_invariance",
                   "check_follows_model_dtype", "check_follows_cuda", "check_save_load_round_trip",
                   "check_linear_classifier_declared")
_LAYERNORM_ASH_B = ("ash-b sets the kept pre-logits to their mean over all units, which the head's LayerNorm makes "
                    "nearly the same for every input: the score carries almost no information on this model")
#: Checks a built-in cannot pass on one of the kit's architectures, for a principled reason:
#: ``{(detector, architecture): {check: reason}}``, reported as skipped with the reason.
EXPECTED_FAILURES: dict[tuple[str, str], dict[str, str]] = {
    ("rankfeat", "test_resnet"): dict.fromkeys(_SCORING_CHECKS, _MAP_IS_1X1),
    ("rankfeat", "test_convnext"): dict.fromkeys(_SCORING_CHECKS, _MAP_IS_1X1),
    ("ash-b", "test_convnext"): {"check_higher_is_more_ood": _LAYERNORM_ASH_B},
    ("ash-b", "test_vit"): {"check_higher_is_more_ood": _LAYERNORM_ASH_B},
    ("dice", "test_vit"): {"check_higher_is_more_ood": (
        "dice keeps the weights with the largest contributions w * mean(h), a CNN's post-ReLU picture; on this "
        "ViT's signed (LayerNorm) pre-logits the sparsified head separates noise from digits at AUROC 0.59")},
    **{("openmax", architecture): {"check_higher_is_more_ood": (
        "openmax moves a share of each top activation to 'unknown'; the kit's model is trained with outlier "
        "exposure to give noise near-zero logits, so noise has nothing to move (P(unknown) ~ 1/(K+1)) while "
        "held-out digits beyond their class's Weibull tail (fitted on 256 images) move most of theirs: "
        "AUROC 0.42 (ResNet), 0.08 (ConvNeXt), 0.01 (ViT)")}
       for architecture in ("test_resnet", "test_convnext", "test_vit")},
}


def builtin_checks(architecture: str) -> pytest.MarkDecorator:
    """``parametrize_with_checks(BUILTINS, model=architecture)``, each detector's EXPECTED_FAILURES skipped."""
    params = [param for name in BUILTINS for param in parametrize_with_checks(
        [name], model=architecture, skip=EXPECTED_FAILURES.get((name, architecture))).args[1]]
    return pytest.mark.parametrize("check", params)


# -- every built-in detector, on three architectures ------------------------------------------------


@builtin_checks("test_resnet")
def test_builtin_detectors_on_resnet(check) -> None:
    check()


@builtin_checks("test_convnext")
def test_builtin_detectors_on_convnext(check) -> None:
    check()


@builtin_checks("test_vit")
def test_builtin_detectors_on_vit(check) -> None:
    check()


def test_builtins_are_the_core_detectors() -> None:
    assert {"msp", "energy", "odin", "mahalanobis"} <= set(BUILTINS)
    assert all(timm_ood.list_detectors(with_distribution=True)[name].startswith("timm-ood ") for name in BUILTINS)


# -- two valid detectors, and broken variants of them ------------------------------------------------


class LogitMargin(Detector):
    """Negated gap between the two largest logits: a valid detector without fit."""

    name = "test-logit-margin"

    def score(self, outputs):
        top2 = score_dtype(outputs.logits).topk(2, dim=1).values
        return top2[:, 1] - top2[:, 0]


class FeatureDistance(Detector):
    """Euclidean distance of the pre-logits to their mean on the fit data: a valid fitted detector."""

    name = "test-feature-distance"
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), fit=True)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", None)
        self._sum: torch.Tensor | None = None
        self._count = 0

    def vectors(self, outputs) -> torch.Tensor:
        return outputs.pre_logits.flatten(1)

    def reset_fit(self, tap) -> None:
        self._sum, self._count = None, 0

    def update_fit(self, outputs, labels) -> None:
        vectors = self.vectors(outputs).double()
        self._sum = vectors.sum(0) if self._sum is None else self._sum + vectors.sum(0)
        self._count += len(vectors)

    def finish_fit(self) -> None:
        self.mean = self._sum / self._count

    def center(self) -> torch.Tensor:
        return self.mean

    def score(self, outputs):
        vectors = score_dtype(self.vectors(outputs))
        return torch.linalg.vector_norm(vectors - self.center().to(vectors), dim=1)


def pooled(maps: torch.Tensor) -> torch.Tensor:
    """Feature maps [B, C, H, W] or tokens [B, N, D] averaged into vectors [B, C]."""
    return maps.flatten(2).mean(2) if maps.ndim == 4 else maps.mean(1)


class FeatureMapDistance(FeatureDistance):
    """The same on the globally pooled feature maps (or tokens): a detector reading ``features``."""

    name = "test-feature-map-distance"
    requirements = Requirements(outputs=frozenset({Need.FEATURES}), fit=True)

    def vectors(self, outputs) -> torch.Tensor:
        return pooled(outputs.features)


class IntermediateDistance(FeatureDistance):
    """The same on every pooled intermediate feature map, concatenated: reads ``intermediates``."""

    name = "test-intermediate-distance"
    requirements = Requirements(outputs=frozenset({Need.INTERMEDIATES}), fit=True)

    def vectors(self, outputs) -> torch.Tensor:
        return torch.cat([pooled(maps) for maps in outputs.intermediates], dim=1)


class ClippedEnergy(Detector):
    """Energy of the classifier applied to clipped pre-logits (ReAct-style): reads the linear classifier."""

    name = "test-clipped-energy"
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), linear_classifier=True)

    def __init__(self, clip: float = 10.0) -> None:
        super().__init__()
        self.clip = clip

    def score(self, outputs):
        weight, bias = outputs.tap.linear_classifier(self.name)
        features = score_dtype(outputs.pre_logits).clamp_max(self.clip)
        return -torch.logsumexp(torch.nn.functional.linear(features, weight.to(features), bias.to(features)), dim=1)


class WrongSign(LogitMargin):
    name = "broken-wrong-sign"

    def score(self, outputs):
        return -super().score(outputs)


class BatchDependent(LogitMargin):
    name = "broken-batch-dependent"

    def score(self, outputs):  # meant to centre each row (dim=1), centres each class over the batch
        logits = score_dtype(outputs.logits)
        top2 = (logits - logits.mean(dim=0, keepdim=True)).topk(2, dim=1).values
        return top2[:, 1] - top2[:, 0]


class StateNotRoundTripping(FeatureDistance):
    name = "broken-round-trip"

    def finish_fit(self) -> None:
        super().finish_fit()
        self._shift = self.mean.std()  # read by score() but not a buffer: lost by save/load

    def center(self) -> torch.Tensor:
        return self.mean + getattr(self, "_shift", 0.0)


class ScoresUnfitted(FeatureDistance):
    name = "broken-unfitted"

    def __init__(self) -> None:
        super().__init__()
        self.is_fitted = True
        self.mean = torch.zeros(1)


class StateInPlainAttribute(FeatureDistance):
    name = "broken-plain-attribute"

    def finish_fit(self) -> None:
        super().finish_fit()
        self.fitted_mean = self.mean.clone()


class NonTensorState(FeatureDistance):
    name = "broken-non-tensor-state"

    def fitted_state(self):
        return {"mean": self.mean.tolist()}


class UndeclaredNeed(LogitMargin):
    name = "broken-undeclared-need"

    def score(self, outputs):
        return super().score(outputs) + 0 * outputs.pre_logits.sum(1)


class UndeclaredLabels(FeatureDistance):
    name = "broken-undeclared-labels"

    def update_fit(self, outputs, labels) -> None:
        if labels is None:
            raise ValueError("needs labels")
        super().update_fit(outputs, labels)


class UndeclaredLinearClassifier(LogitMargin):
    name = "broken-undeclared-linear"

    def score(self, outputs):
        weight, _ = outputs.tap.linear_classifier(self.name)
        return super().score(outputs) + 0 * weight.sum()


class FixedFloat32(LogitMargin):
    name = "broken-float32"

    def score(self, outputs):
        return super().score(outputs).float()


class SqueezedShape(LogitMargin):
    name = "broken-squeeze"

    def score(self, outputs):
        return super().score(outputs)[:, None].squeeze()


class HalfPrecision(LogitMargin):
    name = "broken-half"

    def score(self, outputs):
        return super().score(outputs).half()


class UnseededFit(FeatureDistance):
    name = "broken-unseeded"

    def finish_fit(self) -> None:
        super().finish_fit()
        self.mean = self.mean + torch.randn(self.mean.shape, dtype=self.mean.dtype)


class FitChangesHyperparameter(FeatureDistance):
    name = "broken-fit-hyperparameter"

    def __init__(self, shrinkage: float = 0.0) -> None:
        super().__init__()
        self.shrinkage = shrinkage

    def finish_fit(self) -> None:
        super().finish_fit()
        self.shrinkage = 0.5


class NonJsonHyperparameter(LogitMargin):
    name = "broken-json"

    def __init__(self, classes: frozenset = frozenset({1, 2})) -> None:
        super().__init__()
        self.classes = classes


class VariadicInit(LogitMargin):
    name = "broken-variadic"

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options


class UnstoredHyperparameter(LogitMargin):
    name = "broken-unstored"

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self._k = k


class InvalidName(LogitMargin):
    name = "Broken Name"


class TakenName(LogitMargin):
    name = "msp"


class UnknownSearchSpace(LogitMargin):
    name = "broken-search-space"
    search_space: ClassVar = {"no_such_hyperparameter": (1, 2)}


class UndeclaredGradients(LogitMargin):
    name = "broken-undeclared-gradients"

    def score(self, outputs):
        x = outputs.inputs.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(outputs.tap.logits(x).sum(), x)
        return super().score(outputs) + 0 * grad.sum()


BROKEN = [
    (WrongSign, "check_higher_is_more_ood", r"AUROC .* is 0\.\d+ .*return the negation"),
    (BatchDependent, "check_batch_size_invariance", r"in a batch of 12 but .* when scoring"),
    (StateNotRoundTripping, "check_save_load_round_trip", r"scores differ after save and load .*does not round-trip"),
    (ScoresUnfitted, "check_unfitted_raises", r"it scored without being fitted.*never set it in __init__"),
    (StateInPlainAttribute, "check_fitted_state_in_buffers", r"plain attributes \['fitted_mean'\].*register_buffer"),
    (NonTensorState, "check_state_is_tensors", r"holds non-tensors \{'mean': 'list'\}"),
    (UndeclaredNeed, "check_declared_outputs_suffice", r"during score it read an output it did not declare.*pre_logits"),
    (UndeclaredLabels, "check_fit_without_labels", r"unlabelled batches raised ValueError: needs labels.*fit_labels=True"),
    (UndeclaredLinearClassifier, "check_linear_classifier_declared", r"MLP classifier.*linear_classifier=True"),
    (FixedFloat32, "check_follows_model_dtype", r"scores are torch\.float32 for a torch\.float64 model"),
    (SqueezedShape, "check_score_shape_and_dtype", r"shape \(\) for a batch of 1.*squeeze"),
    (HalfPrecision, "check_score_shape_and_dtype", r"dtype torch\.float16"),
    (UnseededFit, "check_deterministic", r"two fits on the same data give scores differing.*random_state"),
    (FitChangesHyperparameter, "check_fit_keeps_hyperparameters", r"fit changed the hyperparameters"),
    (NonJsonHyperparameter, "check_hyperparameters_are_json", r"not JSON-serialisable"),
    (VariadicInit, "check_init_stores_hyperparameters", r"takes \*options.*explicit keyword argument"),
    (UnstoredHyperparameter, "check_init_stores_hyperparameters", r"'k' is not stored as an attribute.*self\.k = k"),
    (InvalidName, "check_name_is_valid_and_unique", r"'Broken Name' is not valid"),
    (TakenName, "check_name_is_valid_and_unique", r"'msp' is already registered by plugin .* from timm-ood .*choose a name"),
    (UnknownSearchSpace, "check_declarations", r"search_space names \['no_such_hyperparameter'\]"),
    (UndeclaredGradients, "check_score_shape_and_dtype", r"raised RuntimeError.*input_gradients=True"),
]


def run_check(detector, name: str, model=None) -> None:
    (check,) = [check for check in detector_checks(detector, model=model) if check.name == name]
    check()


@pytest.mark.parametrize(("detector", "check_name", "message"), BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_broken_detector_is_caught_with_a_message_naming_the_failure(detector, check_name, message) -> None:
    with pytest.raises(DetectorCheckError) as caught:
        run_check(detector, check_name)
    error = caught.value
    assert isinstance(error, AssertionError)
    assert error.check == check_name and error.detector.startswith(detector.name)
    text = str(error)
    assert text.startswith(f"{check_name} failed for detector {detector.name} on test_convnext: ")
    assert "How to fix: " in text and error.fix
    assert re.search(message, text, re.DOTALL), text


@pytest.mark.parametrize(
    ("detector", "first_failure"),
    [(WrongSign, "check_higher_is_more_ood"), (BatchDependent, "check_batch_size_invariance"),
     (StateNotRoundTripping, "check_save_load_round_trip")],
)
def test_check_detector_stops_at_the_first_failure(detector, first_failure) -> None:
    with pytest.raises(DetectorCheckError) as caught:
        check_detector(detector)
    assert caught.value.check == first_failure


@pytest.mark.parametrize(
    "detector", [LogitMargin, FeatureDistance, FeatureMapDistance, IntermediateDistance, ClippedEnergy]
)
def test_valid_unregistered_detectors_pass_and_are_not_left_registered(detector) -> None:
    ran = check_detector(detector)
    assert "check_save_load_round_trip" in ran
    assert detector.name not in timm_ood.list_detectors()


# -- the kit's interface ---------------------------------------------------------------------------


def test_checks_are_selected_from_the_declared_requirements() -> None:
    logit = [check.name for check in detector_checks("msp")]
    fitted = [check.name for check in detector_checks("mahalanobis")]
    assert "check_scores_without_fit" in logit and "check_unfitted_raises" not in logit
    assert "check_unfitted_raises" in fitted and "check_scores_without_fit" not in fitted
    assert "check_fit_without_labels" not in fitted  # mahalanobis fits on labels
    assert "check_fit_without_labels" in [check.name for check in detector_checks(FeatureDistance)]
    assert ("check_follows_cuda" in logit) == torch.cuda.is_available()
    assert set(logit) | set(fitted) <= set(ALL_CHECKS)


def test_checks_name_the_detector_and_its_hyperparameters() -> None:
    checks = list(detector_checks("odin", hyperparameters={"temperature": 10.0, "epsilon": 0.0014}))
    assert str(checks[0]) == "odin(temperature=10.0)-check_name_is_valid_and_unique"
    assert checks[0].description == "The name is valid and, when registered, resolves to this class."
    instance = timm_ood.create_detector("odin", temperature=10.0)
    assert [str(c) for c in detector_checks(instance)] == [str(c) for c in checks]
    with pytest.raises(TypeError, match="not both"):
        list(detector_checks(instance, hyperparameters={"temperature": 1.0}))


def test_skip_removes_checks_and_rejects_unknown_names() -> None:
    ran = check_detector("energy", skip={"check_higher_is_more_ood": "a reason", "check_deterministic": "another"})
    assert "check_higher_is_more_ood" not in ran and "check_deterministic" not in ran
    assert "check_batch_size_invariance" in ran
    with pytest.raises(ValueError, match=r"check_higher_is_more_odd.*check_name_is_valid_and_unique"):
        check_detector("energy", skip={"check_higher_is_more_odd": "typo"})


def test_parametrize_marks_skipped_checks_with_the_reason() -> None:
    mark = parametrize_with_checks(["msp"], skip={"check_deterministic": "because"})
    assert mark.args[0] == "check"
    params = {param.id: param for param in mark.args[1]}
    assert params["msp-check_deterministic"].marks[0].kwargs["reason"] == "because"
    assert not params["msp-check_name_is_valid_and_unique"].marks


def test_a_model_of_ones_own_can_be_checked() -> None:
    own = timm_ood.testing.conformance_model("test_resnet")
    assert "check_higher_is_more_ood" in check_detector("energy", model=own)
    with pytest.raises(DetectorCheckError, match="for detector broken-wrong-sign on ResNet: "):
        run_check(WrongSign, "check_higher_is_more_ood", model=own)


def test_the_device_check_moves_the_state_and_the_scores() -> None:
    """``check_follows_cuda`` runs only with a GPU; its device path, exercised on the CPU."""
    model = timm_ood.testing.conformance_model()
    subject = timm_ood.testing._helpers._Subject(FeatureDistance, {}, model)
    timm_ood.testing.checks._check_follows(subject, {"device": "cpu"}, "'cpu'")


def test_the_conformance_model_is_seeded_and_leaves_the_callers_generator_alone() -> None:
    state = torch.random.get_rng_state()
    retrained = timm_ood.testing.task._trained_state.__wrapped__("test_vit")
    assert torch.equal(torch.random.get_rng_state(), state)
    cached = timm_ood.testing.conformance_model("test_vit").state_dict()
    assert all(torch.equal(retrained[name], cached[name]) for name in retrained)


def test_the_kit_does_not_import_pytest_at_module_level() -> None:
    package = timm_ood.testing
    modules = [package, *(importlib.import_module(f"{package.__name__}.{info.name}")
                          for info in pkgutil.iter_modules(package.__path__))]
    assert len(modules) > 1  # the package and its modules
    for module in modules:
        tree = ast.parse(inspect.getsource(module))
        imported = {alias.name for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
                    for alias in node.names} | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert "pytest" not in imported, module.__name__


# -- the plugin author's guide (plugins/README.md) works as written ---------------------------------


def guide_files() -> dict[str, str]:
    """The files the guide shows, each fenced block preceded by ``<!-- file: PATH -->``."""
    text = (REPOSITORY / "plugins" / "README.md").read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, re.DOTALL)
    return dict(blocks)


@pytest.fixture
def guide_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The guide's example plugin, installed as a distribution with its entry point."""
    files = guide_files()
    project = tomllib.loads(files["pyproject.toml"])["project"]
    ((entry_name, module),) = project["entry-points"]["timm_ood"].items()
    assert entry_name == module
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    install_distribution(tmp_path, project["name"], module, files[f"{module}.py"], project["version"])
    importlib.invalidate_caches()
    timm_ood.reload_plugins()
    yield project, module, files
    sys.modules.pop(module, None)
    monkeypatch.undo()
    importlib.invalidate_caches()
    timm_ood.reload_plugins()


def test_the_guides_example_plugin_installs_and_passes_the_kit(guide_plugin, tmp_path: Path) -> None:
    project, module, files = guide_plugin
    plugin_lines = len(files["pyproject.toml"].splitlines()) + len(files[f"{module}.py"].splitlines())
    assert plugin_lines < 40
    registered = timm_ood.list_detectors(with_distribution=True)
    (name,) = [n for n, distribution in registered.items() if distribution == f"{project['name']} {project['version']}"]
    scores = timm_ood.wrap(timm_ood.testing.conformance_model(), name).ood_score(torch.randn(3, 1, 32, 32))
    assert scores.shape == (3,)
    test_file = next(path for path in files if path.startswith("tests/"))
    namespace: dict = {}
    exec(compile(textwrap.dedent(files[test_file]), test_file, "exec"), namespace)
    tests = [f for key, f in namespace.items() if key.startswith("test_") and callable(f)]
    (parametrize,) = [mark for test in tests for mark in getattr(test, "pytestmark", [])]
    for check in parametrize.args[1]:
        tests[0](*check.values)
