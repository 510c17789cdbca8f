"""``temperature-scaling``: the fitted temperature minimises the NLL of all the fit logits (SciPy's minimiser)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

import timm_ood

from ._hand_model import CLASSES, LOGIT_MODEL, LOGITS, fit, scores


def labelled_logits(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    logits = 3 * torch.randn(rows, CLASSES, generator=generator, dtype=torch.float64)
    logits[torch.arange(rows), labels] += 4
    return logits, labels


def test_temperature_scaling_minimises_the_nll_of_all_the_fit_logits() -> None:
    logits, labels = labelled_logits(600, seed=1)
    detector = fit(timm_ood.create_detector("temperature-scaling"), LOGIT_MODEL,
                   [(logits[i:i + 64], labels[i:i + 64]) for i in range(0, 600, 64)])

    def nll(temperature: float) -> float:
        z = logits.numpy() / temperature
        return float((logsumexp(z, axis=1) - z[np.arange(600), labels.numpy()]).sum())

    best = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-10}).x
    assert float(detector.fitted_temperature) == pytest.approx(best, rel=1e-5)
    z = LOGITS.numpy() / float(detector.fitted_temperature)
    np.testing.assert_allclose(scores(detector, LOGIT_MODEL, LOGITS),
                               logsumexp(z, axis=1) - z.max(axis=1), rtol=1e-12)


def test_temperature_scaling_warns_when_the_optimum_is_off_the_grid() -> None:
    labels = torch.arange(60) % CLASSES
    separable = torch.nn.functional.one_hot(labels, CLASSES).double() * 5  # all right by a margin: T -> 0
    for logits, temperature in ((separable, 1 / 64), (-separable, 64)):  # all wrong: T -> infinity
        with pytest.warns(RuntimeWarning, match="lies outside"):
            detector = fit(timm_ood.create_detector("temperature-scaling"), LOGIT_MODEL, [(logits, labels)])
        assert float(detector.fitted_temperature) == temperature
    with pytest.raises(ValueError, match="class indices in"):
        fit(timm_ood.create_detector("temperature-scaling"), LOGIT_MODEL, [(logits, labels - 1)])
