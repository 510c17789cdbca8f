"""``gmm``: the class-conditional Gaussian mixture against SciPy's densities, on the hand-made feature model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from ._feature_model import (
    CHANNELS,
    CLASSES,
    class_means_and_tied_covariance,
    fit,
    hand_made_data,
    pooled,
    queries,
    scores_of,
)


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
