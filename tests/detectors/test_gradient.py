"""``gradnorm`` against its paper's formula: one autograd backward per sample.

On a hand-made layer and on the conformance kit's models (``timm_ood.testing.conformance_model``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import timm_ood
from timm_ood.detectors.gradient import gradnorm_scores
from timm_ood.testing import conformance_model

from ._kit import sample


def autograd_gradnorm(weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's S(x) = ||d KL(u || softmax((W h + b) / T)) / dW||_1, one backward per sample."""
    scores = []
    for row in h:
        w = weight.detach().clone().requires_grad_(True)
        log_p = torch.log_softmax((w @ row + bias) / temperature, dim=0)
        uniform = torch.full_like(log_p, 1 / len(log_p))
        kl = (uniform * (uniform.log() - log_p)).sum()
        (grad,) = torch.autograd.grad(kl, w)
        scores.append(grad.abs().sum())
    return torch.stack(scores)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradnorm_closed_form_equals_per_sample_autograd_on_a_hand_made_layer(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 6, generator=generator, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    h = torch.randn(5, 6, generator=generator, dtype=torch.float64).relu()
    expected = autograd_gradnorm(weight, bias, h, temperature)
    torch.testing.assert_close(gradnorm_scores(F.linear(h, weight, bias), h, temperature), expected,
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("architecture", ["test_resnet", "test_vit"])
def test_gradnorm_scores_are_the_negated_gradient_norm_of_the_models_classifier(architecture: str) -> None:
    model = conformance_model(architecture)
    x = sample(model, 6)
    scores = timm_ood.wrap(model, "gradnorm", temperature=2.0).ood_score(x)
    with torch.no_grad():
        h = model.forward_head(model.forward_features(x), pre_logits=True)
    classifier = model.get_classifier()
    expected = autograd_gradnorm(classifier.weight, classifier.bias, h, 2.0)
    torch.testing.assert_close(scores.double(), -expected.double(), rtol=1e-5, atol=0)
