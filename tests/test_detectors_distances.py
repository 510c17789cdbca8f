"""Distance and density detectors on features: each score against a direct reimplementation of its paper.

The cross-checks fit and score through the public API (``wrap`` / ``fit`` /
``ood_score``) on a hand-made "model" whose input *is* its feature map, so the
features, logits and intermediate maps are tiny known tensors; the references
are written from the papers' formulas with NumPy / SciPy / scikit-learn, one
sample or class at a time where that is clearest. The fits stream in small
batches, so the merging of sufficient statistics is what is checked. The
conformance kit runs on every detector from ``tests/test_conformance.py``, and the
agreement with pytorch-ood where it defines the same score is checked in
``tests/test_pytorch_ood_agreement.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, weibull_min
from torch import nn

import timm_ood
from timm_ood.detectors import neighbours
from timm_ood.detectors.classifier_geometry import vim_principal_dim
from timm_ood.detectors.gram import _merge_two_smallest, _two_smallest
from timm_ood.detectors.neighbours import faiss_available
from timm_ood.detectors.prototypes import LIBMR_TRANSLATION, WeibullFit, fit_weibull
from timm_ood.distributed import all_gather_rows as gather_rows
from timm_ood.distributed import all_gather_stacked as gather_stacked
from timm_ood.fitting import fit_detectors
from timm_ood.testing import conformance_data, conformance_model

from ._distributed import GLOO_AVAILABLE, gloo_process_group, run_two_ranks
from ._models import batches, digits_split, noise_images

CLASSES, CHANNELS, SIDE = 3, 4, 2
CENTERS = torch.tensor([[2.0, 0, 0, 1], [0, 2.0, 0, -1], [0, 0, 2.0, 0.5]], dtype=torch.float64)


class FeatureModel(nn.Module):
    """A model with timm's contract whose input is its last feature map [B, C, 2, 2].

    ``forward_intermediates`` returns two maps: the input, and ``tanh(x) + x²``
    (any fixed nonlinear function will do). Pre-logits: the spatial mean; a
    linear classifier on top, close to the class centres of :func:`hand_made_data`
    so that most training samples are classified correctly.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.num_classes, self.num_features = CLASSES, CHANNELS
        self.fc = nn.Linear(CHANNELS, CLASSES).double()
        with torch.no_grad():
            self.fc.weight.copy_(CENTERS + 0.3 * torch.randn(CLASSES, CHANNELS, generator=generator, dtype=torch.float64))
            self.fc.bias.copy_(0.2 * torch.randn(CLASSES, generator=generator, dtype=torch.float64))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(x)

    def forward_intermediates(self, x, indices=None, intermediates_only=False, stop_early=False):
        maps = [x, torch.tanh(x) + x.square()]
        if indices is not None:
            maps = [maps[i] for i in indices]
        return maps if intermediates_only else (x, maps)


def hand_made_data(count: int = 36, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps of three well-separated classes (labels = the true class), float64."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    maps = CENTERS[labels][:, :, None, None] + 0.7 * torch.randn(count, CHANNELS, SIDE, SIDE, generator=generator,
                                                                 dtype=torch.float64)
    return maps, labels


def queries(count: int = 10, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(count, CHANNELS, SIDE, SIDE, generator=generator, dtype=torch.float64)


def fit(name: str, count: int = 36, batch_size: int = 5, **hyperparameters) -> timm_ood.OODModel:
    maps, labels = hand_made_data(count)
    ood = timm_ood.wrap(FeatureModel(), name, **hyperparameters)
    return ood.fit(batches(maps, labels, batch_size), progress=False)


def pooled(maps: torch.Tensor) -> np.ndarray:
    return maps.mean(dim=(2, 3)).numpy()


def logits_of(maps: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return FeatureModel()(maps).numpy()


def classifier() -> tuple[np.ndarray, np.ndarray]:
    fc = FeatureModel().fc
    return fc.weight.detach().numpy(), fc.bias.detach().numpy()


def scores_of(ood: timm_ood.OODModel, x: torch.Tensor) -> np.ndarray:
    return ood.ood_score(x).double().numpy()


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    from timm_ood.metrics import ood_metrics

    scores = torch.cat([in_scores.double().cpu(), out_scores.double().cpu()])
    return float(ood_metrics(scores, torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]))["auroc"])


# -- references, from the papers ----------------------------------------------------------------


def class_means_and_tied_covariance(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    means = np.stack([z[y == c].mean(0) for c in range(CLASSES)])
    centered = z - means[y]
    return means, centered.T @ centered / len(z)


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


@pytest.mark.parametrize("covariance", ["full", "tied"])
def test_gmm_is_the_negative_log_density_of_the_class_mixture(covariance: str) -> None:
    maps, labels = hand_made_data()
    z, y = pooled(maps), labels.numpy()
    means, tied = class_means_and_tied_covariance(z, y)
    x = pooled(queries())
    log_densities = []
    for c in range(CLASSES):
        sigma = np.cov(z[y == c].T, bias=True) if covariance == "full" else tied
        gaussian = multivariate_normal(means[c], sigma + 1e-3 * np.eye(CHANNELS))
        log_densities.append(np.log(np.mean(y == c)) + gaussian.logpdf(x))
    expected = -logsumexp(np.stack(log_densities, axis=1), axis=1)
    scores = scores_of(fit("gmm", covariance=covariance, regularization=1e-3), queries())
    np.testing.assert_allclose(scores, expected, rtol=1e-9)


@pytest.mark.parametrize("bank_dtype", ["float32", "float16"])
def test_knn_is_the_distance_to_the_kth_nearest_normalised_training_feature(
    bank_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(neighbours, "CHUNK_ELEMENTS", 40)  # 4 bank rows per chunk for 10 queries
    maps, _ = hand_made_data()
    bank = pooled(maps) / np.linalg.norm(pooled(maps), axis=1, keepdims=True)
    bank = bank.astype(bank_dtype).astype(np.float64)
    x = pooled(queries())
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.sort(np.linalg.norm(x[:, None] - bank[None], axis=2), axis=1)[:, 4]
    ood = fit("knn", k=5, bank_dtype=bank_dtype, backend="torch")
    assert ood.detector.bank.dtype == getattr(torch, bank_dtype) and ood.detector.bank.shape == (36, CHANNELS)
    np.testing.assert_allclose(scores_of(ood, queries()), expected, rtol=1e-12)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (the optional 'faiss' extra)")
@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_faiss_search_of_a_small_bank_gives_the_torch_scores(name: str) -> None:
    maps, labels = hand_made_data()  # 36 rows: one inverted list, searched whole; candidates re-ranked exactly
    model = FeatureModel().float()
    data = batches(maps.float(), labels, 5)
    with_torch = timm_ood.wrap(model, name, k=5, backend="torch").fit(data, progress=False)
    with_faiss = timm_ood.wrap(model, name, k=5, backend="faiss").fit(data, progress=False)
    x = queries().float()
    torch.testing.assert_close(with_faiss.ood_score(x), with_torch.ood_score(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_the_backend_auto_of_earlier_files_reads_as_the_exact_torch_search(name: str) -> None:
    assert timm_ood.create_detector(name).backend == "torch"
    assert timm_ood.create_detector(name, backend="auto").backend == "torch"


def test_nnguide_is_the_energy_times_the_mean_similarity_to_the_scaled_bank() -> None:
    maps, _ = hand_made_data()
    z, x = pooled(maps), pooled(queries())
    energy = logsumexp(logits_of(maps), axis=1)
    bank = (z / np.linalg.norm(z, axis=1, keepdims=True) * energy[:, None]).astype(np.float32)  # bank_dtype
    normalised = x / np.linalg.norm(x, axis=1, keepdims=True)
    guidance = np.sort(normalised @ bank.T, axis=1)[:, -5:].mean(1)
    expected = -logsumexp(logits_of(queries()), axis=1) * guidance
    np.testing.assert_allclose(scores_of(fit("nnguide", k=5, backend="torch"), queries()), expected, rtol=1e-12)


def test_vim_is_the_scaled_residual_minus_the_energy() -> None:
    maps, _ = hand_made_data()
    z, x = pooled(maps), pooled(queries())
    weight, bias = classifier()
    origin = -np.linalg.pinv(weight) @ bias
    eigenvalues, eigenvectors = np.linalg.eigh((z - origin).T @ (z - origin) / len(z))
    residual_space = eigenvectors[:, np.argsort(-eigenvalues)[2:]]
    alpha = logits_of(maps).max(1).mean() / np.linalg.norm((z - origin) @ residual_space, axis=1).mean()
    expected = alpha * np.linalg.norm((x - origin) @ residual_space, axis=1) - logsumexp(logits_of(queries()), axis=1)
    np.testing.assert_allclose(scores_of(fit("vim", principal_dim=2), queries()), expected, rtol=1e-9)


def test_vim_principal_dim_follows_the_authors_rule() -> None:
    assert vim_principal_dim(2048) == 1000 and vim_principal_dim(768) == 512 and vim_principal_dim(96) == 48
    assert vim_principal_dim(100, 0.25) == 25 and vim_principal_dim(100, 7) == 7
    with pytest.raises(ValueError, match="leave a residual"):
        vim_principal_dim(64, 64)


def test_a_second_pass_serves_only_the_detectors_that_declare_it() -> None:
    maps, labels = hand_made_data()
    tap = timm_ood.wrap(FeatureModel(), "msp").tap
    together = [timm_ood.create_detector(name) for name in ("rmd", "vim", "openmax")]
    seen = {name: 0 for name in ("rmd", "vim", "openmax")}
    for detector in together:
        update = detector.update_fit

        def counting(outputs, labels, update=update, name=detector.name):
            seen[name] += len(outputs)
            update(outputs, labels)

        detector.update_fit = counting
    fit_detectors(tap, together, batches(maps, labels, 5), progress=False)
    assert seen == {"rmd": 36, "vim": 72, "openmax": 72}
    for detector in together:
        alone = fit(detector.name).detector.fitted_state()
        for key, value in detector.fitted_state().items():
            torch.testing.assert_close(value, alone[key], rtol=0, atol=0, msg=f"{detector.name}.{key}")


def test_two_pass_fits_refuse_a_one_shot_iterator() -> None:
    maps, labels = hand_made_data()
    with pytest.raises(ValueError, match=r"read the fit data 2 times.*one-shot iterator"):
        timm_ood.wrap(FeatureModel(), "vim").fit(iter(batches(maps, labels, 5)), progress=False)


def test_fdbd_is_the_mean_boundary_distance_over_the_feature_spread() -> None:
    maps, _ = hand_made_data()
    z, x, logits = pooled(maps), pooled(queries()), logits_of(queries())
    weight, bias = classifier()
    expected = []
    for f, row in zip(x, logits, strict=True):
        top = row.argmax()
        distances = [abs((weight[top] - weight[c]) @ f + bias[top] - bias[c]) / np.linalg.norm(weight[top] - weight[c])
                     for c in range(CLASSES) if c != top]
        expected.append(-np.mean(distances) / np.linalg.norm(f - z.mean(0)))
    np.testing.assert_allclose(scores_of(fit("fdbd"), queries()), expected, rtol=1e-9)


def test_nci_is_the_alignment_with_the_predicted_weight_plus_the_norm_filter() -> None:
    maps, _ = hand_made_data()
    z, x, logits = pooled(maps), pooled(queries()), logits_of(queries())
    weight, _ = classifier()
    centered = x - z.mean(0)
    proximity = (weight[logits.argmax(1)] * centered).sum(1) / np.linalg.norm(centered, axis=1)
    expected = -(proximity + 0.3 * np.abs(x).sum(1))
    np.testing.assert_allclose(scores_of(fit("nci", alpha=0.3), queries()), expected, rtol=1e-9)


def test_she_is_the_inner_product_with_the_pattern_of_the_predicted_class() -> None:
    maps, labels = hand_made_data()
    z, y, predicted = pooled(maps), labels.numpy(), logits_of(maps).argmax(1)
    patterns = np.stack([z[(y == c) & (predicted == c)].mean(0) for c in range(CLASSES)])
    x = pooled(queries())
    expected = -(x * patterns[logits_of(queries()).argmax(1)]).sum(1)
    np.testing.assert_allclose(scores_of(fit("she"), queries()), expected, rtol=1e-12)


def test_the_weibull_fit_is_the_maximum_likelihood_fit() -> None:
    generator = np.random.default_rng(0)
    rows = [weibull_min.rvs(shape, scale=scale, size=12, random_state=generator)
            for shape, scale in ((0.7, 2.0), (3.0, 0.5), (40.0, 10.0))]
    rows.append(rows[2][:5] + LIBMR_TRANSLATION)  # a translated libMR tail, on a padded row
    samples = torch.ones(4, 12, dtype=torch.float64)
    valid = torch.zeros(4, 12, dtype=torch.bool)
    for i, row in enumerate(rows):
        samples[i, :len(row)], valid[i, :len(row)] = torch.from_numpy(row), True
    fitted = fit_weibull(samples, valid)
    for i, row in enumerate(rows):
        shape, _, scale = weibull_min.fit(row, floc=0)  # a numerical optimum, close to the exact one
        ours = float(fitted.shape[i]), float(fitted.scale[i])
        assert ours == pytest.approx((shape, scale), rel=1e-4)
        log_likelihood = weibull_min.logpdf(row, ours[0], scale=ours[1]).sum()
        assert log_likelihood >= weibull_min.logpdf(row, shape, scale=scale).sum() - 1e-9
    points = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    expected = weibull_min.cdf(points.numpy(), float(fitted.shape[0]), scale=float(fitted.scale[0]))
    np.testing.assert_allclose(WeibullFit(fitted.shape[:1], fitted.scale[:1]).cdf(points).numpy(), expected,
                               rtol=1e-12)


def weibull_mle(sample: np.ndarray) -> tuple[float, float]:
    """The exact two-parameter MLE: the root of the profile likelihood equation in κ (SciPy's root finder)."""
    logs = np.log(sample / sample.max())

    def equation(log_shape: float) -> float:
        weights = np.exp(np.exp(log_shape) * logs)
        return 1 / np.exp(log_shape) + logs.mean() - (weights * logs).sum() / weights.sum()

    shape = float(np.exp(brentq(equation, -20, 40, xtol=1e-14, rtol=1e-15)))
    return shape, float(sample.max() * np.mean((sample / sample.max()) ** shape) ** (1 / shape))


def test_openmax_is_algorithm_2_with_libmr_weibull_tails() -> None:
    maps, labels = hand_made_data()
    activations, y = logits_of(maps), labels.numpy()
    correct = activations.argmax(1) == y
    tail_size, alpha = 5, 2
    means, models = [], []
    for c in range(CLASSES):
        own = activations[correct & (y == c)]
        means.append(own.mean(0))
        distances = np.linalg.norm(own - means[c], axis=1) / 200 + [
            1 - a @ means[c] / np.linalg.norm(a) / np.linalg.norm(means[c]) for a in own]
        tail = np.sort(distances)[-tail_size:]
        shift = LIBMR_TRANSLATION - tail.min()
        models.append((shift, *weibull_mle(tail + shift)))
    expected = []
    for v in logits_of(queries()):
        revised, unknown = v.copy(), 0.0
        for rank, c in enumerate(np.argsort(-v)[:alpha], start=1):
            distance = np.linalg.norm(v - means[c]) / 200 + 1 - v @ means[c] / np.linalg.norm(v) / np.linalg.norm(means[c])
            shift, shape, scale = models[c]
            w = weibull_min.cdf(distance + shift, shape, scale=scale) * (alpha + 1 - rank) / alpha
            revised[c], unknown = v[c] * (1 - w), unknown + v[c] * w
        expected.append(unknown - logsumexp(np.r_[unknown, revised]))
    scores = scores_of(fit("openmax", tail_size=tail_size, alpha=alpha), queries())
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def gram_values(maps: torch.Tensor, max_power: int) -> np.ndarray:
    """Row sums of the full C x C Gram matrices, from the definition."""
    flat = maps.flatten(2).numpy()
    rows = []
    for power in range(1, max_power + 1):
        sums = np.stack([(f ** power @ (f ** power).T).sum(1) for f in flat])
        rows.append(np.sign(sums) * np.abs(sums) ** (1 / power))
    return np.concatenate(rows, axis=1)


def test_gram_order_statistics_stream_like_a_sort_of_everything() -> None:
    """Per class and column, the two smallest values (a repeated minimum counts twice), merged batch by batch."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (300, 7), generator=generator).to(torch.float64)  # many ties
    groups = torch.randint(0, 4, (300,), generator=generator)
    groups[groups == 3] = 2  # class 3 never occurs: +inf
    streamed = _merge_two_smallest(*[_two_smallest(values[i:i + 37], groups[i:i + 37], 4) for i in range(0, 300, 37)])
    for group in range(4):
        members = values[groups == group]
        expected = members.sort(dim=0).values[:2] if len(members) >= 2 else torch.full((2, 7), torch.inf)
        assert torch.equal(streamed[:, group], expected), group


def deviation(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    return float((np.maximum(low - values, 0) / np.abs(low) + np.maximum(values - high, 0) / np.abs(high)).sum())


def test_gram_deviations_normalised_by_the_leave_one_out_expected_deviation() -> None:
    maps, _ = hand_made_data()
    predicted = logits_of(maps).argmax(1)
    layers = [maps, torch.tanh(maps) + maps.square()]
    values = [gram_values(m, 3) for m in layers]
    bounds = [{c: (v[predicted == c].min(0), v[predicted == c].max(0)) for c in range(CLASSES)} for v in values]
    expected_deviation = []
    for v in values:  # each image against the bounds of the other images predicted as its class
        total = 0.0
        for i, c in enumerate(predicted):
            others = v[(predicted == c) & (np.arange(len(v)) != i)]
            total += deviation(v[i], others.min(0), others.max(0))
        expected_deviation.append(total / len(v))
    x = queries()
    x_values = [gram_values(m, 3) for m in (x, torch.tanh(x) + x.square())]
    expected = [sum(deviation(x_values[layer][i], *bounds[layer][c]) / expected_deviation[layer] for layer in range(2))
                for i, c in enumerate(logits_of(x).argmax(1))]
    ood = fit("gram", max_power=3)
    np.testing.assert_allclose(ood.detector.layer_normalisers.numpy(), expected_deviation, rtol=1e-9)
    np.testing.assert_allclose(scores_of(ood, x), expected, rtol=1e-9)
    held_out, _ = hand_made_data(12, seed=3)
    ood.fit_held_out([(held_out,)], progress=False)
    mean_deviation = [np.mean([deviation(gram_values(m, 3)[i], *bounds[layer][c]) for i, c in
                               enumerate(logits_of(held_out).argmax(1))]) for layer, m in
                      enumerate((held_out, torch.tanh(held_out) + held_out.square()))]
    np.testing.assert_allclose(ood.detector.layer_normalisers.numpy(), mean_deviation, rtol=1e-9)


# -- on a trained model (the conformance kit's, shared with tests/test_conformance.py) ------------


def kit_model_and_fit_data(architecture: str = "test_resnet") -> tuple[nn.Module, tuple]:
    model = conformance_model(architecture)
    return model, conformance_data(model).fit_batches


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


def test_held_out_steps_separate_held_out_digits_from_noise() -> None:
    model, fit_data = kit_model_and_fit_data()
    digits = digits_split()["test"][0]
    held_out, evaluation = (digits[:100], noise_images(100, seed=1)), (digits[100:300], noise_images(200, seed=2))
    for name in ("multi-mahalanobis", "gram"):
        ood = timm_ood.wrap(model, name).fit(fit_data, progress=False)
        before = ood.detector.fitted_state()
        ood.fit_held_out([held_out[0]], [held_out[1]], progress=False)  # gram reads only the ID set
        changed = {key for key, value in ood.detector.fitted_state().items() if not torch.equal(value, before[key])}
        assert changed == ({"layer_weights", "weights_bias"} if name == "multi-mahalanobis" else {"layer_normalisers"})
        assert auroc(ood.ood_score(evaluation[0]), ood.ood_score(evaluation[1])) > 0.9, name


# -- torch.distributed: the gathered statistics equal one process's on the union ------------------


DISTRIBUTED = ("knn", "gram", "openmax", "vim")


def distributed_worker(rank: int, init_file: str, results_dir: str) -> None:
    with gloo_process_group(rank, init_file):
        assert gather_stacked(torch.tensor([rank, 10 + rank])).tolist() == [[0, 10], [1, 11]]
        assert gather_rows(torch.full((rank + 1, 2), rank)).tolist() == [[0, 0], [1, 1], [1, 1]]
        maps, labels = hand_made_data()
        states = {}
        for name in DISTRIBUTED:  # the driver gives each rank every other batch: unequal shards
            ood = timm_ood.wrap(FeatureModel(), name).fit(batches(maps, labels, 6), progress=False)
            states[name] = ood.detector.fitted_state()
        torch.save(states, Path(results_dir) / f"rank{rank}.pt")


@pytest.mark.skipif(not GLOO_AVAILABLE, reason="gloo backend unavailable")
def test_distributed_fits_equal_one_process_on_the_union(tmp_path: Path) -> None:
    run_two_ranks(distributed_worker, tmp_path)
    for name in DISTRIBUTED:
        expected = fit(name, batch_size=6).detector.fitted_state()
        for rank in range(2):
            state = torch.load(tmp_path / f"rank{rank}.pt")[name]
            assert set(state) == set(expected), name
            if name == "knn":  # the bank gathered in rank order holds the rows in another order
                state["bank"], expected["bank"] = torch.unique(state["bank"], dim=0), torch.unique(expected["bank"], dim=0)
            if name == "vim":  # eigenvectors are defined up to sign: compare the projector
                state["residual_basis"] = state["residual_basis"] @ state["residual_basis"].T
                expected["residual_basis"] = expected["residual_basis"] @ expected["residual_basis"].T
            for key, tensor in expected.items():
                torch.testing.assert_close(state[key], tensor, rtol=1e-9, atol=1e-12, msg=f"{name}.{key}")
