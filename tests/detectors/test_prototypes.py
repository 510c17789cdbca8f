"""``she`` and ``openmax`` (with its Weibull fit) against their papers, on the hand-made feature model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import logsumexp
from scipy.stats import weibull_min

from timm_ood.detectors.prototypes import LIBMR_TRANSLATION, WeibullFit, fit_weibull

from ._feature_model import CLASSES, fit, hand_made_data, logits_of, pooled, queries, scores_of


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
