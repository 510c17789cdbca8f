"""A fitted detector refuses a model it was not fitted for (timm_ood.fingerprint).

Every mismatch shows its message: another class count, feature width,
architecture or classifier; files, ``load_state_dict`` and scoring after the
weights changed. Moving the same weights (``.double()``, ``.half()``) passes.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import timm_ood
from timm_ood import IncompatibleModelError
from timm_ood.fingerprint import PRECISIONS, ModelFingerprint, model_fingerprint

from ._models import batches, create, digits_split, trained

FIT = batches(*digits_split()["train"])
X = digits_split()["test"][0][:16]


def fitted(architecture: str = "test_resnet", detector: str = "mahalanobis", data=FIT) -> timm_ood.OODModel:
    return timm_ood.wrap(trained(architecture), detector).fit(data, progress=False)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> str:
    """A Mahalanobis detector fitted on the trained test_resnet, saved."""
    path = str(tmp_path_factory.mktemp("fingerprint") / "mahalanobis.safetensors")
    fitted().save_detector(path)
    return path


def other_classifier(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.get_classifier().weight.mul_(1.01)
    return model


# -- what is recorded ---------------------------------------------------------------------------------


def test_a_fit_records_the_model_and_the_file_carries_it(resnet_file) -> None:
    ood = fitted()
    recorded = ood.detector.model_fingerprint
    assert (recorded.architecture, recorded.num_classes, recorded.num_features, recorded.in_chans) == (
        "test_resnet", 10, ood.model.num_features, 1)
    assert set(recorded.classifier) == set(recorded.weights) == set(PRECISIONS)
    assert recorded == model_fingerprint(trained("test_resnet"), precisions=PRECISIONS)
    with safe_open(resnet_file, framework="pt") as handle:
        metadata = handle.metadata()
        assert "_model_fingerprint" not in handle.keys()  # noqa: SIM118 -- metadata only: older readers load it
    assert ModelFingerprint.from_json(metadata["timm_ood.model_fingerprint"]) == recorded
    assert ModelFingerprint.from_tensor(recorded.to_tensor()) == recorded


def test_detectors_without_a_fit_record_nothing() -> None:
    ood = timm_ood.wrap(trained("test_resnet"), "energy").fit(FIT, progress=False)
    assert ood.detector.model_fingerprint is None
    assert "_model_fingerprint" not in ood.detector.state_dict()


@pytest.mark.parametrize("architecture", ["test_resnet", "test_convnext", "test_vit"])
def test_round_trip_on_the_same_model_loads_and_scores_identically(architecture, tmp_path, recwarn) -> None:
    ood = fitted(architecture)
    ood.save_detector(tmp_path / "d.safetensors")
    loaded = timm_ood.wrap(trained(architecture), "msp").load_detector(tmp_path / "d.safetensors")
    assert loaded.detector.model_fingerprint == ood.detector.model_fingerprint
    assert torch.equal(loaded.ood_score(X), ood.ood_score(X))
    assert not [w for w in recwarn if "fingerprint" in str(w.message) or "fitted on" in str(w.message)]


# -- load_detector: each mismatch ------------------------------------------------------------------------


def test_other_number_of_classes_is_refused(resnet_file) -> None:
    model = timm_ood.wrap(create("test_resnet", num_classes=5), "msp")
    with pytest.raises(IncompatibleModelError, match=(
            r"detector 'mahalanobis' was fitted on test_resnet with 10 classes and \d+-wide features; this "
            r"model is test_resnet with 5 classes and \d+-wide features \(the number of classes differs\).*"
            r"Fit it again on this model with model\.fit\(id_train_loader\).*or load the file into the model "
            r"it was fitted on\.$")):
        model.load_detector(resnet_file)
    with pytest.raises(IncompatibleModelError, match="number of classes differs"):
        model.load_detector(resnet_file, strict=False)  # shapes differ: no escape hatch


def test_other_feature_width_is_refused(tmp_path) -> None:
    fitted("test_vit").save_detector(tmp_path / "vit.safetensors")
    narrow = timm_ood.wrap(create("test_vit", embed_dim=32), "msp")
    with pytest.raises(IncompatibleModelError, match=(
            r"fitted on test_vit with 10 classes and 64-wide features; this model is test_vit with 10 "
            r"classes and 32-wide features \(the feature width differs\)")):
        narrow.load_detector(tmp_path / "vit.safetensors")


@pytest.mark.parametrize("architecture", ["test_convnext", "test_vit"])
def test_other_architecture_is_refused(resnet_file, architecture) -> None:
    with pytest.raises(IncompatibleModelError, match=(
            rf"fitted on test_resnet with 10 classes and \d+-wide features; this model is {architecture} "
            r"with 10 classes and \d+-wide features \(the architecture and the feature width differ\)")):
        timm_ood.wrap(trained(architecture), "msp").load_detector(resnet_file)


def test_other_input_channels_are_named(resnet_file) -> None:
    with pytest.raises(IncompatibleModelError, match=(
            r"fitted on test_resnet with 10 classes, \d+-wide features and 1 input channel; this model is "
            r"test_resnet with 10 classes, \d+-wide features and 3 input channels \(the input channels differ\)")):
        rgb = timm.create_model("test_resnet", num_classes=10, in_chans=3)
        timm_ood.wrap(rgb, "msp").load_detector(resnet_file)


def test_other_classifier_weights_are_refused_and_strict_false_only_warns(resnet_file) -> None:
    untrained = create("test_resnet")
    with pytest.raises(IncompatibleModelError, match=(
            r"fitted on test_resnet with 10 classes and \d+-wide features, the same architecture as this model, "
            r"but its classifier weights differ \(digest [0-9a-f]{16} at fit, [0-9a-f]{16} now\).*"
            r"model\.fit\(id_train_loader\).*load_detector\(path, strict=False\), which only warns")):
        timm_ood.wrap(untrained, "msp").load_detector(resnet_file)
    with pytest.warns(UserWarning, match=r"classifier weights differ.*Loaded anyway \(strict=False\)"):
        loaded = timm_ood.wrap(untrained, "msp").load_detector(resnet_file, strict=False)
    assert loaded.ood_score(X).shape == (16,)  # accepted: scoring does not raise again


def test_other_backbone_weights_with_the_same_classifier_are_refused(resnet_file) -> None:
    model = trained("test_resnet")
    with torch.no_grad():
        next(iter(model.parameters())).mul_(1.01)  # the stem, not the classifier
    with pytest.raises(IncompatibleModelError, match=(
            r"the same architecture and classifier as this model, but its other weights differ "
            r"\(whole-model digest [0-9a-f]{16} at fit, [0-9a-f]{16} now\)")):
        timm_ood.wrap(model, "msp").load_detector(resnet_file)


def test_a_file_without_fingerprint_warns_that_it_cannot_be_checked(resnet_file, tmp_path) -> None:
    with safe_open(resnet_file, framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "timm_ood.model_fingerprint"}
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(resnet_file), old, metadata=metadata)
    with pytest.warns(UserWarning, match=r"without a model fingerprint.*cannot be checked against this model"):
        loaded = timm_ood.wrap(trained("test_resnet"), "msp").load_detector(old)
    assert loaded.detector.model_fingerprint is None
    assert torch.equal(loaded.ood_score(X), fitted().ood_score(X))


def test_a_malformed_fingerprint_is_a_clear_error(resnet_file, tmp_path) -> None:
    with safe_open(resnet_file, framework="pt") as handle:
        metadata = {**handle.metadata(), "timm_ood.model_fingerprint": json.dumps({"architecture": "x"})}
    path = str(tmp_path / "bad.safetensors")
    save_file(load_file(resnet_file), path, metadata=metadata)
    with pytest.raises(ValueError, match="malformed model fingerprint"):
        timm_ood.wrap(trained("test_resnet"), "msp").load_detector(path)


# -- scoring after the model changed -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_moving_the_same_weights_keeps_scoring(dtype) -> None:
    ood = fitted()
    reference = ood.ood_score(X)
    ood.to(dtype)
    assert ood.ood_score(X.to(dtype)).shape == reference.shape
    ood.float()  # the weights went through ``dtype`` and back (rounded): still the same model
    assert torch.isfinite(ood.ood_score(X)).all()


def test_scoring_after_the_classifier_changed_raises_until_refit() -> None:
    ood = fitted()
    ood.ood_score(X)
    other_classifier(ood.model)
    with pytest.raises(IncompatibleModelError, match=(
            r"classifier weights differ \(digest [0-9a-f]{16} at fit, [0-9a-f]{16} now\).*Fit it again on the "
            r"model as it is now with model\.fit\(id_train_loader\), or restore the weights it was fitted on\. "
            r"If the change keeps the fitted state valid, accept it with model\.detector\.accept_model")):
        ood.ood_score(X)
    ood.fit(FIT, progress=False)
    ood.ood_score(X)


def test_loading_other_weights_into_the_model_is_caught_and_restoring_them_passes() -> None:
    ood = fitted()
    original = copy.deepcopy(ood.model.state_dict())
    ood.model.load_state_dict(create("test_resnet").state_dict())
    with pytest.raises(IncompatibleModelError, match="classifier weights differ"):
        ood.ood_score(X)
    ood.model.load_state_dict(original)
    ood.ood_score(X)


def test_accept_model_is_the_score_time_escape_hatch() -> None:
    ood = fitted()
    other_classifier(ood.model)
    ood.detector.accept_model(ood.model)
    ood.ood_score(X)
    ood.to(torch.float64)  # the accepted weights, moved
    ood.ood_score(X.double())


def test_a_detector_fitted_on_one_model_refuses_to_score_with_another() -> None:
    detector = fitted("test_resnet").detector
    with pytest.raises(IncompatibleModelError, match=r"fitted on test_resnet.*this model is test_resnet"):
        timm_ood.wrap(create("test_resnet", num_classes=5), detector).ood_score(X)


def test_the_score_time_check_is_cheap_when_nothing_changed(monkeypatch) -> None:
    ood = fitted()
    ood.ood_score(X)
    calls = []
    import timm_ood.detectors.base as base

    monkeypatch.setattr(base, "model_fingerprint", lambda *a, **k: calls.append(1))
    for _ in range(3):
        ood.ood_score(X)
    assert calls == []


# -- load_state_dict -------------------------------------------------------------------------------------


def test_state_dict_round_trips_through_safetensors(tmp_path) -> None:
    ood = fitted()
    save_file(ood.state_dict(), str(tmp_path / "ood.safetensors"))
    fresh = timm_ood.wrap(trained("test_resnet"), "mahalanobis")
    fresh.load_state_dict(load_file(str(tmp_path / "ood.safetensors")))
    assert fresh.detector.is_fitted
    assert fresh.detector.model_fingerprint == ood.detector.model_fingerprint
    assert torch.equal(fresh.ood_score(X), ood.ood_score(X))


def test_detector_state_dict_into_another_model_is_refused_at_load_or_score() -> None:
    state = fitted("test_resnet").detector.state_dict()
    convnext = fitted("test_convnext")
    with pytest.raises(IncompatibleModelError, match=(
            r"detector 'mahalanobis' cannot load its fitted state 'class_means': it has shape \(10, \d+\) in the "
            r"loaded state but \(10, \d+\) in this detector.*\(the loaded state was fitted on test_resnet with "
            r".*; this detector was fitted on test_convnext with .*\)\. Fit the detector again on this model "
            r"with model\.fit\(id_train_loader\)")):
        convnext.detector.load_state_dict(state)
    untrained = timm_ood.wrap(create("test_resnet"), "mahalanobis")
    untrained.detector.load_state_dict(state)  # an unfitted detector takes it; scoring then refuses
    with pytest.raises(IncompatibleModelError, match="classifier weights differ"):
        untrained.ood_score(X)


def test_ood_model_load_state_dict_checks_the_detector_against_the_model() -> None:
    detector_state = {k: v for k, v in fitted().state_dict().items() if k.startswith("detector.")}
    untrained = timm_ood.wrap(create("test_resnet"), "mahalanobis")
    mixed = {**untrained.state_dict(), **detector_state}
    with pytest.raises(IncompatibleModelError, match=(
            r"classifier weights differ.*Fit the detector again on this model with model\.fit\(id_train_loader\), "
            r"or load the state into the model it was fitted on\. To use it anyway, load it with "
            r"load_state_dict\(state_dict, strict=False\), which only warns\.$")):
        untrained.load_state_dict(mixed)
    with pytest.warns(UserWarning, match=r"classifier weights differ.*Loaded anyway \(strict=False\)"):
        untrained.load_state_dict(mixed, strict=False)
    matching = timm_ood.wrap(trained("test_resnet"), "mahalanobis")
    matching.load_state_dict({**matching.state_dict(), **detector_state})
    assert torch.equal(matching.ood_score(X), fitted().ood_score(X))


def test_an_old_state_dict_without_fingerprint_warns() -> None:
    state = {k: v for k, v in fitted().state_dict().items() if "_model_fingerprint" not in k}
    fresh = timm_ood.wrap(trained("test_resnet"), "mahalanobis")
    with pytest.warns(UserWarning, match="without a model fingerprint"):
        fresh.load_state_dict(state)
    assert fresh.detector.is_fitted and fresh.detector.model_fingerprint is None


def test_a_state_of_the_same_model_with_other_data_sizes_loads() -> None:
    small = fitted(detector="knn", data=FIT[:2])
    large = fitted(detector="knn", data=FIT[:4])
    assert small.detector.bank.shape != large.detector.bank.shape
    small.detector.load_state_dict(large.detector.state_dict())
    assert torch.equal(small.ood_score(X), large.ood_score(X))
