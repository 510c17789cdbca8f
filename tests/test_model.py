"""The one-line wrapper on real (briefly trained) ResNet, ConvNeXt and ViT models."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

import timm_ood
from timm_ood import NotFittedError

from ._models import ARCHITECTURES, batches, create, digits_split, trained

BUILTIN = ("msp", "temperature", "odin", "maxlogit", "energy", "entropy", "mahalanobis")


def fitted(name: str, detector: str, **kwargs) -> timm_ood.OODModel:
    model = timm_ood.wrap(trained(name), detector, **kwargs)
    return model.fit(batches(*digits_split()["train"]), progress=False)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("detector", BUILTIN)
def test_every_detector_on_every_architecture(architecture: str, detector: str) -> None:
    model = fitted(architecture, detector)
    test_images = digits_split()["test"][0][:64]
    scores = model.ood_score(test_images)
    assert scores.shape == (64,)
    assert scores.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(scores).all()
    # batch size 1 and halves give the same scores as the whole batch
    one = torch.cat([model.ood_score(test_images[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(one, scores[:4], rtol=1e-4, atol=1e-5)
    halves = torch.cat([model.ood_score(test_images[:32]), model.ood_score(test_images[32:])])
    torch.testing.assert_close(halves, scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("detector", ["msp", "energy", "mahalanobis", "odin"])
def test_higher_scores_mean_more_ood(architecture: str, detector: str) -> None:
    # digits rotated by 180 degrees: a near-OOD set every detector separates imperfectly
    kwargs = {"temperature": 10.0, "epsilon": 0.002} if detector == "odin" else {}
    model = fitted(architecture, detector, **kwargs)
    id_images = digits_split()["test"][0]
    id_scores = model.ood_score(id_images)
    ood_scores = model.ood_score(id_images.flip(2, 3))
    labels = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))])
    auroc = roc_auc_score(labels.numpy(), torch.cat([id_scores, ood_scores]).double().numpy())
    assert 0.6 < auroc < 1.0, f"{detector} on {architecture}: AUROC {auroc:.3f} (higher must mean more OOD)"


def test_forward_and_attributes_are_the_timm_model() -> None:
    base = trained("test_resnet")
    model = timm_ood.wrap(base, "energy")
    x = digits_split()["test"][0][:8]
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    assert model.num_classes == 10
    assert model.pretrained_cfg is base.pretrained_cfg
    assert model.forward_features.__self__ is base
    assert isinstance(model, nn.Module) and model.model is base


def test_scoring_uses_eval_mode_and_restores_the_mode() -> None:
    model = fitted("test_resnet", "msp")
    x = digits_split()["test"][0][:16]
    reference = model.ood_score(x)
    model.train()
    torch.testing.assert_close(model.ood_score(x), reference)
    assert model.model.training and all(m.training for m in model.model.modules())


def test_create_model_in_one_call() -> None:
    model = timm_ood.create_model("test_convnext", detector="energy", num_classes=5, in_chans=1)
    assert isinstance(model, timm_ood.OODModel)
    assert model.detector.name == "energy" and model.num_classes == 5
    assert model.ood_score(torch.randn(2, 1, 32, 32)).shape == (2,)
    odin = timm_ood.create_model("test_resnet", "odin", {"temperature": 10, "epsilon": 0.001}, num_classes=3)
    assert odin.detector.temperature == 10 and odin.detector.epsilon == 0.001


@pytest.mark.parametrize("detector", ["energy", "mahalanobis"])
def test_to_dtype_moves_model_and_fitted_state(detector: str) -> None:
    model = fitted("test_resnet", detector).to(torch.float64)
    x = digits_split()["test"][0][:8].double()
    scores = model.ood_score(x)
    assert scores.dtype == torch.float64
    assert all(b.dtype == torch.float64 for b in model.detector.fitted_state().values() if b.is_floating_point())
    reference = fitted("test_resnet", detector).ood_score(x.float())
    torch.testing.assert_close(scores.float(), reference.float(), rtol=1e-3, atol=1e-3)


def test_calibrate_and_predict() -> None:
    model = fitted("test_resnet", "energy")
    test_images = digits_split()["test"][0]
    with pytest.raises(NotFittedError, match="calibrate"):
        model.predict(test_images[:4])
    threshold = model.calibrate(batches(test_images, torch.zeros(len(test_images))), tpr=0.95)
    flagged = model.predict(test_images)
    assert flagged.dtype == torch.bool
    assert abs(flagged.float().mean().item() - 0.05) < 0.01  # accepts 95% of the calibration data
    scores = model.ood_score(test_images)
    assert (scores <= threshold).float().mean() >= 0.95
    assert model.predict(test_images.flip(2, 3)).float().mean() > 2 * flagged.float().mean()


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.randn(2, 3, 32, 32), ValueError, "1-channel"),
        (torch.randn(1, 32, 32), ValueError, "unsqueeze"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), TypeError, "float"),
        (torch.randn(0, 1, 32, 32), ValueError, "empty"),
    ],
)
def test_bad_images_get_clear_errors(images, error, message) -> None:
    model = timm_ood.wrap(create("test_resnet"), "msp")
    with pytest.raises(error, match=message):
        model.ood_score(images)


def test_nan_inputs_are_an_error_not_a_score() -> None:
    model = timm_ood.wrap(create("test_resnet"), "msp")
    x = torch.randn(3, 1, 32, 32)
    x[1] = float("nan")
    with pytest.raises(ValueError, match="NaN scores for 1 of 3"):
        model.ood_score(x)


def test_fit_with_no_batches_is_an_error() -> None:
    model = timm_ood.wrap(create("test_resnet"), "mahalanobis")
    with pytest.raises(ValueError, match="no batches"):
        model.fit([])
    with pytest.raises(TypeError, match="DataLoader"):
        model.fit(torch.randn(4, 1, 32, 32))


def test_fit_reads_dict_batches_as_from_hugging_face() -> None:
    images, labels = digits_split()["train"]
    model = timm_ood.wrap(trained("test_resnet"), "mahalanobis")
    model.fit([{"image": images[:700], "label": labels[:700]}, {"image": images[700:], "label": labels[700:]}])
    reference = fitted("test_resnet", "mahalanobis")
    x = digits_split()["test"][0][:8]
    torch.testing.assert_close(model.ood_score(x), reference.ood_score(x), rtol=1e-4, atol=1e-4)
