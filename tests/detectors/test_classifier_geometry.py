"""``vim``, ``fdbd`` and ``nci``: scores from the classifier's geometry against their papers' formulas.

On the hand-made feature model (``tests/detectors/_feature_model.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from timm_ood.detectors.classifier_geometry import vim_principal_dim

from ._feature_model import (
    CLASSES,
    classifier,
    fit,
    hand_made_data,
    logits_of,
    pooled,
    queries,
    scores_of,
)


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
