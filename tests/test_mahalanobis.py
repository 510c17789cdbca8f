"""Mahalanobis (Lee et al. 2018) as the model of a fitted detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.covariance import EmpiricalCovariance

import timm_ood
from timm_ood import NotFittedError

from ._models import batches, digits_split, trained


def features_of(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True).double().numpy()


def test_unfitted_detector_says_to_fit() -> None:
    model = timm_ood.wrap(trained("test_resnet"), "mahalanobis")
    with pytest.raises(NotFittedError, match=r"not fitted: call model\.fit"):
        model.ood_score(digits_split()["test"][0][:2])


def test_scores_match_a_direct_computation_with_sklearn() -> None:
    base = trained("test_convnext")
    images, labels = digits_split()["train"]
    model = timm_ood.wrap(base, "mahalanobis").fit(batches(images, labels, 64), progress=False)
    features = features_of(base, images)
    means = np.stack([features[labels.numpy() == c].mean(0) for c in range(10)])
    centered = features - means[labels.numpy()]
    precision = EmpiricalCovariance(assume_centered=True).fit(centered).precision_
    test_images = digits_split()["test"][0]
    test_features = features_of(base, test_images)
    differences = test_features[:, None, :] - means[None]
    expected = np.einsum("bkd,de,bke->bk", differences, precision, differences).min(1)
    np.testing.assert_allclose(model.ood_score(test_images).double().numpy(), expected, rtol=2e-4)


def test_streamed_fit_does_not_depend_on_batch_size() -> None:
    images, labels = digits_split()["train"]
    small = timm_ood.wrap(trained("test_resnet"), "mahalanobis").fit(batches(images, labels, 7), progress=False)
    large = timm_ood.wrap(trained("test_resnet"), "mahalanobis").fit(batches(images, labels, 700), progress=False)
    # features of one image differ in the last float32 digits between batch sizes; the
    # statistics agree to that precision, and the (ill-conditioned) precision matrix to the scores'
    torch.testing.assert_close(small.detector.class_means, large.detector.class_means, rtol=1e-5, atol=1e-6)
    x = digits_split()["test"][0]
    torch.testing.assert_close(small.ood_score(x), large.ood_score(x), rtol=1e-3, atol=1e-3)


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


def test_input_preprocessing_moves_inputs_towards_their_closest_class() -> None:
    images, labels = digits_split()["train"]
    plain = timm_ood.wrap(trained("test_resnet"), "mahalanobis").fit(batches(images, labels), progress=False)
    preprocessed = timm_ood.wrap(trained("test_resnet"), "mahalanobis", epsilon=0.002)
    preprocessed.detector.load_fitted_state(plain.detector.fitted_state())
    x = digits_split()["test"][0][:64]
    assert (preprocessed.ood_score(x) < plain.ood_score(x)).float().mean() > 0.9


def test_ood_labels_in_fit_data_are_refused() -> None:
    images, _ = digits_split()["train"]
    model = timm_ood.wrap(trained("test_resnet"), "mahalanobis")
    with pytest.raises(ValueError, match="in-distribution training data only"):
        model.fit([(images[:10], torch.full((10,), -1))])
    with pytest.raises(ValueError, match="labels"):
        model.fit([images[:10]])


def test_classes_missing_from_the_fit_data_are_left_out() -> None:
    images, labels = digits_split()["train"]
    keep = labels < 5
    model = timm_ood.wrap(trained("test_resnet"), "mahalanobis").fit([(images[keep], labels[keep])], progress=False)
    assert model.detector.class_ids.tolist() == [0, 1, 2, 3, 4]
    assert model.detector.class_means.shape[0] == 5
