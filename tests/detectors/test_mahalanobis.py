"""Mahalanobis (Lee et al. 2018) and its relatives in ``timm_ood.detectors.mahalanobis``.

``mahalanobis`` as the model of a fitted detector on the trained test models;
``mahalanobis-odin`` (the paper's input preprocessing) on the conformance
kit's models; ``rmd`` and ``multi-mahalanobis`` against direct
reimplementations of their papers on the hand-made feature model
(``tests/detectors/_feature_model.py``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

import timm_ood
from timm_ood import NotFittedError
from timm_ood.detectors.mahalanobis import MAHALANOBIS_EPSILON_GRID
from timm_ood.testing import conformance_model

from .._models import batches, digits_split, trained
from ._feature_model import (
    class_means_and_tied_covariance,
    fit,
    hand_made_data,
    pooled,
    queries,
    scores_of,
)
from ._kit import fit_batches, kit_model_and_fit_data, sample


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


# -- mahalanobis-odin -----------------------------------------------------------------------------------


def test_mahalanobis_odin_equals_the_papers_preprocessed_distance_computed_directly() -> None:
    model = conformance_model("test_resnet").double()
    batches = [(images.double(), labels) for images, labels in fit_batches(model)]
    ood = timm_ood.wrap(model, "mahalanobis-odin").fit(batches, progress=False)
    x = sample(model).double()

    def pre_logits(inputs: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(inputs), pre_logits=True)

    with torch.no_grad():
        features = torch.cat([pre_logits(images) for images, _ in batches]).numpy()
    labels = torch.cat([labels for _, labels in batches]).numpy()
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centered = features - means[np.searchsorted(classes, labels)]
    covariance = centered.T @ centered / len(features)
    precision = torch.from_numpy(np.linalg.pinv(covariance, rcond=len(covariance) * np.finfo(float).eps,
                                                hermitian=True))
    means = torch.from_numpy(means)

    def distances(inputs: torch.Tensor) -> torch.Tensor:  # (f - mu_c)^T P (f - mu_c), [B, C]
        differences = pre_logits(inputs)[:, None, :] - means[None]
        return torch.einsum("bcd,de,bce->bc", differences, precision, differences)

    leaf = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(distances(leaf).min(dim=1).values.sum(), leaf)
    std = torch.tensor(model.pretrained_cfg["std"], dtype=torch.float64).view(-1, 1, 1)
    perturbed = x - 0.0014 * gradient.sign() / std  # Eq. 3: x + eps sign(grad M(x)), in pixel units
    with torch.no_grad():
        expected = distances(perturbed).min(dim=1).values
    torch.testing.assert_close(ood.ood_score(x), expected, rtol=1e-6, atol=0)


def test_mahalanobis_odin_shares_mahalanobis_and_has_the_papers_grid() -> None:
    model = conformance_model("test_convnext")
    odin = timm_ood.wrap(model, "mahalanobis-odin", epsilon=0.002).fit(fit_batches(model), progress=False)
    plain = timm_ood.wrap(model, "mahalanobis", epsilon=0.002).fit(fit_batches(model), progress=False)
    x = sample(model)
    torch.testing.assert_close(odin.ood_score(x), plain.ood_score(x), rtol=0, atol=0)
    cls = timm_ood.get_detector_class("mahalanobis-odin")
    assert cls.search_space["epsilon"] == MAHALANOBIS_EPSILON_GRID == (0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)
    assert cls().epsilon == 0.0014 and cls().requirements.input_gradients
    with pytest.raises(ValueError, match="'mahalanobis' detector"):
        timm_ood.create_detector("mahalanobis-odin", epsilon=0.0)


# -- rmd and multi-mahalanobis on the hand-made feature model -----------------------------------------


def closest_mahalanobis(z: np.ndarray, means: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    precision = np.linalg.pinv(covariance)
    return np.array([min((f - m) @ precision @ (f - m) for m in means) for f in z])


def test_rmd_is_the_class_distance_minus_the_background_distance() -> None:
    maps, labels = hand_made_data()
    z, y = pooled(maps), labels.numpy()
    means, covariance = class_means_and_tied_covariance(z, y)
    background = np.cov(z.T, bias=True)
    x = pooled(queries())
    centered = x - z.mean(0)
    expected = closest_mahalanobis(x, means, covariance) - np.einsum(
        "bd,de,be->b", centered, np.linalg.pinv(background), centered)
    np.testing.assert_allclose(scores_of(fit("rmd"), queries()), expected, rtol=1e-9, atol=1e-9)


def test_multi_mahalanobis_weights_each_layer_by_its_mean_training_distance() -> None:
    maps, labels = hand_made_data()
    y = labels.numpy()
    layers = [maps, torch.tanh(maps) + maps.square()]
    x = queries()
    x_layers = [x, torch.tanh(x) + x.square()]
    expected = np.zeros(len(x))
    for train, test in zip(layers, x_layers, strict=True):
        means, covariance = class_means_and_tied_covariance(pooled(train), y)
        rank = np.linalg.matrix_rank(covariance)
        expected += closest_mahalanobis(pooled(test), means, covariance) / rank
    np.testing.assert_allclose(scores_of(fit("multi-mahalanobis"), x), expected, rtol=1e-9)
    only_second = fit("multi-mahalanobis", layers=[-1])
    assert only_second.detector.layer_indices.tolist() == [1]


def test_multi_mahalanobis_held_out_step_is_the_logistic_regression_of_the_layer_distances() -> None:
    from sklearn.linear_model import LogisticRegressionCV  # what the authors' code fits
    from sklearn.model_selection import StratifiedKFold

    ood = fit("multi-mahalanobis")
    id_maps, _ = hand_made_data(40, seed=5)
    ood_maps = 1.4 * hand_made_data(40, seed=6)[0]  # overlapping with the in-distribution set: a well-posed fit
    detector = ood.detector
    distances = [detector.layer_distances(ood.tap(m, detector.requirements.outputs)).numpy()
                 for m in (id_maps, ood_maps)]
    ood.fit_held_out([(id_maps[:20],), (id_maps[20:],)], [(ood_maps,)], progress=False)
    inputs = np.concatenate(distances)
    targets = np.r_[np.zeros(40), np.ones(40)]
    order = np.lexsort((*inputs.T[::-1], targets))  # the canonical order the detector fits in
    inputs, targets = inputs[order], targets[order]
    mean, scale = inputs.mean(0), inputs.std(0, ddof=1)
    with warnings.catch_warnings():  # scikit-learn >= 1.9 announces changes of defaults
        warnings.simplefilter("ignore", FutureWarning)
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
        regression = LogisticRegressionCV(cv=folds).fit((inputs - mean) / scale, targets)
    expected = regression.decision_function((distances[1] - mean) / scale)  # log-odds of OOD
    np.testing.assert_allclose(scores_of(ood, ood_maps), expected, rtol=1e-3, atol=1e-3)  # solver tolerance


def test_multi_mahalanobis_preprocessing_moves_each_layer_towards_its_closest_class() -> None:
    model, fit_data = kit_model_and_fit_data()
    plain = timm_ood.wrap(model, "multi-mahalanobis").fit(fit_data, progress=False)
    preprocessed = timm_ood.wrap(model, "multi-mahalanobis", epsilon=0.002)
    preprocessed.detector.load_fitted_state(plain.detector.fitted_state())
    x = digits_split()["test"][0][:16]
    with torch.no_grad():
        before = plain.detector.layer_distances(plain.tap(x, plain.detector.requirements.outputs))
        after = preprocessed.detector.layer_distances(preprocessed.tap(x, frozenset()))
    assert (after < before).double().mean() > 0.8
    assert preprocessed.ood_score(x).shape == (16,)
