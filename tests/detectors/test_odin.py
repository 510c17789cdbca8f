"""ODIN exactly as methods/odin.md: sign, temperature, pixel-unit epsilon; and its grid of hyperparameters.

The grid (``odin_grid_scores``, what ODIN's tuning protocol runs): the clever
grid equals the naive loop over every (T, epsilon).
"""

from __future__ import annotations

import pytest
import torch

import timm_ood
from timm_ood.detectors.odin import (
    EPSILON_GRID,
    naive_odin_grid_scores,
    odin_gradient_sign,
    odin_grid_scores,
)
from timm_ood.tap import Tap

from .._models import DIGITS_STD, digits_split, trained


def test_grid_is_the_papers() -> None:
    assert len(EPSILON_GRID) == 21 and EPSILON_GRID[0] == 0 and EPSILON_GRID[-1] == 0.004
    assert timm_ood.get_detector_class("odin").search_space["temperature"] == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@pytest.mark.parametrize("architecture", ["test_resnet", "test_vit"])
def test_odin_at_t1_eps0_is_msp(architecture: str) -> None:
    model = trained(architecture)
    x = digits_split()["test"][0][:32]
    odin = timm_ood.wrap(model, "odin", temperature=1, epsilon=0).ood_score(x)
    msp = timm_ood.wrap(model, "msp").ood_score(x)
    torch.testing.assert_close(odin, msp, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_perturbation_raises_the_predicted_class_softmax(temperature: float) -> None:
    model = trained("test_resnet")
    tap = timm_ood.wrap(model, "odin").tap
    x = digits_split()["test"][0][:64]
    with torch.no_grad():
        logits = model(x)
    predicted = logits.argmax(1)
    sign = odin_gradient_sign(tap, x, temperature)
    perturbed = x - 0.002 * sign / DIGITS_STD
    with torch.no_grad():
        before = torch.softmax(logits.double() / temperature, 1).gather(1, predicted[:, None])
        after = torch.softmax(model(perturbed).double() / temperature, 1).gather(1, predicted[:, None])
    assert (after > before).float().mean() > 0.9  # the step goes against the cross-entropy gradient


def test_step_is_epsilon_pixels_divided_by_the_models_std() -> None:
    model = trained("test_resnet")
    stem = model.get_submodule(model.pretrained_cfg["first_conv"])
    seen: list[torch.Tensor] = []
    handle = stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = digits_split()["test"][0][:4]
    wrapped = timm_ood.wrap(model, "odin", temperature=1000, epsilon=0.004)
    wrapped.ood_score(x)
    handle.remove()
    perturbed = seen[-1]  # forward, backward, forward on the perturbed input
    step = (perturbed - x).abs()
    nonzero = step[step > 0]
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, 0.004 / DIGITS_STD))
    assert (step > 0).float().mean() > 0.5
    # an explicit std overrides the model's
    seen.clear()
    handle = stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    timm_ood.wrap(model, "odin", temperature=1000, epsilon=0.004, std=(0.5,)).ood_score(x)
    handle.remove()
    step = (seen[-1] - x).abs()
    torch.testing.assert_close(step[step > 0], torch.full_like(step[step > 0], 0.008))


def test_odin_scores_do_not_depend_on_the_batch() -> None:
    model = timm_ood.wrap(trained("test_resnet"), "odin", temperature=1000, epsilon=0.0014)
    x = digits_split()["test"][0][:16]
    whole = model.ood_score(x)
    parts = torch.cat([model.ood_score(x[:1]), model.ood_score(x[1:9]), model.ood_score(x[9:])])
    torch.testing.assert_close(whole, parts, rtol=1e-7, atol=1e-9)


def test_odin_rejects_invalid_hyperparameters() -> None:
    with pytest.raises(ValueError, match="temperature"):
        timm_ood.create_detector("odin", temperature=0)
    with pytest.raises(ValueError, match="epsilon"):
        timm_ood.create_detector("odin", epsilon=-0.1)
    with pytest.raises(TypeError, match="hyperparameters are: temperature, epsilon, std"):
        timm_ood.create_detector("odin", eps=0.1)


# -- the grid of (T, epsilon) ------------------------------------------------------------------------


GRID_TEMPERATURES, GRID_EPSILONS = [1, 10, 500, 1000], [0, 0.0006, 0.004]


def classifier_rows(model: torch.nn.Module) -> list[int]:
    """Records how many images each forward carries, at the classifier."""
    rows: list[int] = []
    model.get_classifier().register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    return rows


@pytest.mark.parametrize("architecture", ["test_resnet", "test_vit"])
def test_clever_odin_grid_equals_the_naive_loop_exactly(architecture: str) -> None:
    """Without sign reuse every forward is a full-batch one: bit for bit the naive loop's scores."""
    tap = Tap(trained(architecture))
    x = digits_split()["test"][0][:24]
    with torch.no_grad():
        naive = naive_odin_grid_scores(tap, x, GRID_TEMPERATURES, GRID_EPSILONS)
    clever = odin_grid_scores(tap, x, GRID_TEMPERATURES, GRID_EPSILONS, reuse_repeated_signs=False)
    assert torch.equal(clever, naive)


@pytest.mark.parametrize("architecture", ["test_resnet", "test_vit"])
def test_repeated_signs_skip_forwards_and_keep_the_scores(architecture: str) -> None:
    """Images whose sign map repeats at the next T are not forwarded again; in float64 (where batch size
    changes nothing measurable) the scores still equal the naive loop's, in float32 to its rounding."""
    model = trained(architecture)
    rows = classifier_rows(model)
    tap = Tap(model)
    x = digits_split()["test"][0][:24]
    odin_grid_scores(tap, x, GRID_TEMPERATURES, GRID_EPSILONS, reuse_repeated_signs=False)
    full_rows = sum(rows)
    rows.clear()
    reused = odin_grid_scores(tap, x, GRID_TEMPERATURES, GRID_EPSILONS)
    assert full_rows == 24 * (1 + 2 * len(GRID_TEMPERATURES))
    assert sum(rows) < 0.9 * full_rows  # 172 and 178 of 216 rows on these models
    with torch.no_grad():
        naive = naive_odin_grid_scores(tap, x, GRID_TEMPERATURES, GRID_EPSILONS)
    torch.testing.assert_close(reused, naive, rtol=1e-5, atol=1e-6)

    double = Tap(trained(architecture).double())
    reused = odin_grid_scores(double, x.double(), GRID_TEMPERATURES, GRID_EPSILONS)
    with torch.no_grad():
        naive = naive_odin_grid_scores(double, x.double(), GRID_TEMPERATURES, GRID_EPSILONS)
    torch.testing.assert_close(reused, naive, rtol=0, atol=1e-12)


def test_odin_grid_without_perturbation_is_temperature_scaling() -> None:
    tap = Tap(trained("test_resnet"))
    x = digits_split()["test"][0][:24]
    scores = odin_grid_scores(tap, x, [1, 1000], [0])
    with torch.no_grad():
        logits = tap.logits(x).double()
    expected = torch.stack([-(logits / t).log_softmax(dim=1).max(dim=1).values for t in (1, 1000)])
    torch.testing.assert_close(scores[:, 0], expected)
