"""``gen``, ``kl-matching`` and ``weighted-energy``: scores of the posterior against their papers' formulas.

On the hand-made model whose inputs are its logits (``tests/detectors/_hand_model.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

import timm_ood
from timm_ood import IncompatibleModelError
from timm_ood.tap import Tap

from ._hand_model import CLASSES, LOGIT_MODEL, LOGITS, fit, scores


@pytest.mark.parametrize(("gamma", "top_classes"), [(0.1, 100), (0.5, 2), (2.0, 1)])
def test_gen_is_the_papers_generalized_entropy(gamma: float, top_classes: int) -> None:
    p = -np.sort(-softmax(LOGITS.numpy(), axis=1), axis=1)[:, :top_classes]
    expected = (p**gamma * (1 - p) ** gamma).sum(axis=1)
    detector = timm_ood.create_detector("gen", gamma=gamma, top_classes=top_classes)
    np.testing.assert_allclose(scores(detector, LOGIT_MODEL, LOGITS), expected, rtol=1e-12)


def test_gen_keeps_saturated_inputs_apart() -> None:
    """1 - p of a saturated top class is 0 in float64 when formed by subtraction, not here."""
    logits = torch.tensor([[40.0, 0.0, 0.0], [41.0, 0.0, 0.0]], dtype=torch.float64)
    top = 1 - softmax(logits.numpy(), axis=1)[:, 0]
    assert (top == 0).all()
    gen = scores(timm_ood.create_detector("gen"), LOGIT_MODEL, logits)
    assert gen[0] > gen[1] > 0


def test_kl_matching_is_the_divergence_to_the_closest_typical_posterior() -> None:
    fit_logits = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 2.5, 0.5], [1.0, 3.0, 0.0],
                               [0.0, 4.0, 1.0]], dtype=torch.float64)
    detector = fit(timm_ood.create_detector("kl-matching"), LOGIT_MODEL,
                   [(fit_logits[:2], None), (fit_logits[2:], None)])
    posteriors = softmax(fit_logits.numpy(), axis=1)
    predicted = posteriors.argmax(axis=1)
    typical = np.stack([posteriors[predicted == k].mean(axis=0) for k in (0, 1)])  # class 2 is never predicted
    p = softmax(LOGITS.numpy(), axis=1)
    expected = (p[:, None, :] * np.log(p[:, None, :] / typical[None])).sum(axis=2).min(axis=1)
    np.testing.assert_allclose(scores(detector, LOGIT_MODEL, LOGITS), expected, rtol=1e-12)
    assert detector.typical_log_posteriors.shape == (2, CLASSES)


def test_weighted_energy_weights_the_partition_function() -> None:
    weights = [0.5, -1.0, 2.0]  # a negative learnt weight counts as 0, as in the VOS code
    expected = -np.log((np.maximum(weights, 0) * np.exp(LOGITS.numpy())).sum(axis=1))
    weighted = timm_ood.create_detector("weighted-energy", weights=weights)
    np.testing.assert_allclose(scores(weighted, LOGIT_MODEL, LOGITS), expected, rtol=1e-12)
    unweighted = scores(timm_ood.create_detector("weighted-energy"), LOGIT_MODEL, LOGITS)
    np.testing.assert_allclose(unweighted, scores(timm_ood.create_detector("energy"), LOGIT_MODEL, LOGITS))
    with pytest.raises(IncompatibleModelError, match="has 2 class weights, but the model has 3 classes"):
        timm_ood.create_detector("weighted-energy", weights=[1.0, 1.0]).check_model(Tap(LOGIT_MODEL))
    with pytest.raises(ValueError, match="at least one class weight must be positive"):
        timm_ood.create_detector("weighted-energy", weights=[0.0, -1.0, 0.0])
