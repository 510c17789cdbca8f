"""The pluggy registry with real entry points: installed plugin, broken plugin, duplicate name."""

from __future__ import annotations

import importlib
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import timm_ood
from timm_ood import DuplicateNameError, PluginLoadWarning, UnknownNameError
from timm_ood.registry import AUTOLOAD_ENV

from ._models import create

PLUGIN_SOURCE = '''
import torch
import timm_ood


class MaxProbabilityGap(timm_ood.Detector):
    """Negated gap between the two largest softmax probabilities."""

    name = "{detector_name}"

    def score(self, outputs):
        top2 = torch.softmax(outputs.logits.float(), dim=1).topk(2, dim=1).values
        return -(top2[:, 0] - top2[:, 1])


@timm_ood.hookimpl
def timm_ood_detectors():
    return [MaxProbabilityGap]
'''


def install_distribution(site: Path, distribution: str, module: str, source: str, version: str = "1.2.3") -> None:
    """Write a module and its ``.dist-info`` (with a ``timm_ood`` entry point) into ``site``."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[timm_ood]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A directory on sys.path where tests install distributions; plugins reload around the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("tests_plugin_")]:
        del sys.modules[name]
    monkeypatch.undo()
    importlib.invalidate_caches()
    timm_ood.reload_plugins()


def test_installed_plugin_is_discovered_with_its_distribution(site: Path) -> None:
    install_distribution(site, "timm-ood-gap", "tests_plugin_gap",
                         PLUGIN_SOURCE.format(detector_name="probability-gap"))
    timm_ood.reload_plugins()
    names = timm_ood.list_detectors(with_distribution=True)
    assert names["probability-gap"] == "timm-ood-gap 1.2.3"
    assert names["msp"].startswith("timm-ood ")
    model = timm_ood.wrap(create("test_resnet"), "probability-gap")
    import torch
    assert model.ood_score(torch.randn(3, 1, 32, 32)).shape == (3,)
    assert timm_ood.list_detectors("prob*") == ["probability-gap"]


def test_broken_plugin_warns_and_the_rest_works(site: Path) -> None:
    install_distribution(site, "timm-ood-broken", "tests_plugin_broken", "raise ImportError('missing dependency xyz')\n")
    with pytest.warns(PluginLoadWarning, match=r"tests_plugin_broken.*timm-ood-broken 1\.2\.3.*missing dependency xyz"):
        timm_ood.reload_plugins()
    assert "msp" in timm_ood.list_detectors()


def test_duplicate_name_names_both_distributions(site: Path) -> None:
    install_distribution(site, "timm-ood-clash", "tests_plugin_clash", PLUGIN_SOURCE.format(detector_name="msp"))
    timm_ood.reload_plugins()
    with pytest.raises(DuplicateNameError, match=r"'msp'.*timm-ood .*timm-ood-clash 1\.2\.3"):
        timm_ood.list_detectors()


def test_autoload_can_be_disabled(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_distribution(site, "timm-ood-gap", "tests_plugin_gap2",
                         PLUGIN_SOURCE.format(detector_name="probability-gap"))
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    timm_ood.reload_plugins()
    assert "probability-gap" not in timm_ood.list_detectors()
    assert "msp" in timm_ood.list_detectors()


def test_plugin_with_a_wrong_hook_signature_is_refused_whole(site: Path) -> None:
    source = """
    import timm_ood

    @timm_ood.hookimpl
    def timm_ood_detectors(unexpected_argument):
        return []
    """
    install_distribution(site, "timm-ood-badhook", "tests_plugin_badhook", source)
    with pytest.warns(PluginLoadWarning, match="tests_plugin_badhook"):
        timm_ood.reload_plugins()
    assert "tests_plugin_badhook" not in timm_ood.registry.get_plugin_registry().plugins()


def test_invalid_returned_objects_are_skipped_with_a_warning(site: Path) -> None:
    source = """
    import timm_ood

    class NoName(timm_ood.Detector):
        name = "Not A Valid Name"
        def score(self, outputs):
            return outputs.logits[:, 0]

    @timm_ood.hookimpl
    def timm_ood_detectors():
        return [object, NoName]
    """
    install_distribution(site, "timm-ood-invalid", "tests_plugin_invalid", source)
    timm_ood.reload_plugins()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = timm_ood.list_detectors()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert any("not a subclass of timm_ood.Detector" in m for m in messages)
    assert any("'Not A Valid Name' is not valid" in m for m in messages)
    assert "msp" in names


def test_runtime_registration(site: Path) -> None:
    namespace: dict = {}
    exec(PLUGIN_SOURCE.format(detector_name="runtime-gap"), namespace)  # a plugin defined in a notebook

    class Plugin:
        timm_ood_detectors = staticmethod(namespace["timm_ood_detectors"])

    timm_ood.register_plugin(Plugin(), name="notebook")
    assert timm_ood.list_detectors(with_distribution=True)["runtime-gap"] == "registered at run time"


def test_unknown_name_lists_known_names_and_the_closest() -> None:
    with pytest.raises(UnknownNameError) as error:
        timm_ood.create_detector("engery")
    message = str(error.value)
    assert "Did you mean 'energy'" in message
    assert "mahalanobis" in message and "odin" in message
    assert isinstance(error.value, KeyError)


def test_detectors_sources_and_benchmarks_share_one_registry_helper() -> None:
    from timm_ood import detectors
    from timm_ood.data import benchmarks, sources
    from timm_ood.registry import Kind

    kinds = {detectors.DETECTORS: "detector", sources.SOURCES: "source", benchmarks.BENCHMARKS: "benchmark"}
    for kind, word in kinds.items():
        assert type(kind) is Kind and kind.word == word and kind.hook_name == f"timm_ood_{word}s"
    assert detectors.list_detectors() == detectors.DETECTORS.names()
    assert sources.get_source("fashion-mnist") is sources.SOURCES.get("fashion-mnist")
    assert benchmarks.list_benchmarks("cifar*") == benchmarks.BENCHMARKS.objects("cifar*")
    with pytest.raises(UnknownNameError, match=r"unknown benchmark 'cifar'\. Did you mean 'cifar10'"):
        benchmarks.BENCHMARKS.get("cifar")


def test_builtin_plugins_come_from_the_packages_declarations() -> None:
    from timm_ood import data, detectors, registry

    declared = tuple(f"timm_ood.detectors.{m}" for m in detectors.BUILTIN_PLUGINS) + tuple(
        f"timm_ood.data.{m}" for m in data.BUILTIN_PLUGINS
    )
    assert registry.builtin_plugins() == declared == registry.BUILTIN_PLUGINS
    assert declared[0] == "timm_ood.detectors.logits" and declared[-3:] == (
        "timm_ood.data.offline", "timm_ood.data.hub_benchmarks", "timm_ood.data.openood")
    plugins = list(registry.PluginRegistry(autoload=False).plugins())
    assert plugins == list(declared)
