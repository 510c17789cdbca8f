"""Fitted detector state in safetensors (``timm_ood.serialization``): a file scores as the detector it was saved from.

Tensors plus string metadata (the detector's name, its hyperparameters, the
calibrated threshold as an extra tensor), never pickle.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import timm_ood
from timm_ood.serialization import load_detector, save_detector

from ._models import batches, digits_split, trained


def test_fit_save_load_gives_identical_scores(tmp_path) -> None:
    images, labels = digits_split()["train"]
    model = timm_ood.wrap(trained("test_resnet"), "mahalanobis").fit(batches(images, labels), progress=False)
    model.calibrate(batches(*digits_split()["test"]), tpr=0.9)
    path = tmp_path / "mahalanobis.safetensors"
    model.save_detector(path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["timm_ood.detector"] == "mahalanobis"
        assert "precision" in handle.keys()  # noqa: SIM118
    fresh = timm_ood.wrap(trained("test_resnet"), "msp").load_detector(path)
    assert fresh.detector.name == "mahalanobis" and fresh.detector.is_fitted
    x = digits_split()["test"][0]
    torch.testing.assert_close(fresh.ood_score(x), model.ood_score(x), rtol=0, atol=0)
    assert float(fresh.threshold) == float(model.threshold)
    torch.testing.assert_close(fresh.predict(x), model.predict(x))


def test_saved_hyperparameters_round_trip(tmp_path) -> None:
    images, labels = digits_split()["train"]
    model = timm_ood.wrap(trained("test_resnet"), "mahalanobis", epsilon=0.001).fit(batches(images, labels), progress=False)
    model.save_detector(tmp_path / "m.safetensors")
    loaded = timm_ood.wrap(trained("test_resnet"), "energy").load_detector(tmp_path / "m.safetensors")
    assert loaded.detector.epsilon == 0.001
    x = digits_split()["test"][0][:16]
    torch.testing.assert_close(loaded.ood_score(x), model.ood_score(x))


def test_save_detector_and_load_detector_round_trip_the_state_extras_and_metadata(tmp_path) -> None:
    images, labels = digits_split()["train"]
    ood = timm_ood.wrap(trained("test_resnet"), "mahalanobis", epsilon=0.001)
    detector = ood.fit(batches(images[:300], labels[:300]), progress=False).detector
    path = tmp_path / "detector.safetensors"
    save_detector(detector, path, extra_tensors={"threshold": torch.tensor(1.5)}, extra_metadata={"note": "kept"})
    loaded, extras, metadata = load_detector(path)
    assert type(loaded) is type(detector) and loaded.is_fitted and loaded.epsilon == 0.001
    assert list(extras) == ["threshold"] and float(extras["threshold"]) == 1.5
    assert metadata["timm_ood.detector"] == "mahalanobis" and metadata["note"] == "kept"
    assert loaded.model_fingerprint == detector.model_fingerprint is not None
    state, loaded_state = detector.fitted_state(), loaded.fitted_state()
    assert list(loaded_state) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key


def test_an_unfitted_detector_loads_unfitted_with_its_hyperparameters(tmp_path) -> None:
    save_detector(timm_ood.create_detector("odin", temperature=10.0, epsilon=0.002), tmp_path / "odin.safetensors")
    loaded, extras, _ = load_detector(tmp_path / "odin.safetensors")
    assert loaded.name == "odin" and not loaded.is_fitted and extras == {}
    assert (loaded.temperature, loaded.epsilon) == (10.0, 0.002)


def test_a_file_that_is_not_a_detector_file_is_refused(tmp_path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="is not a timm-ood detector file"):
        load_detector(path)
