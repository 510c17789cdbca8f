"""Lee et al.'s confidence loss and outlier exposure: hand computations and a short training run."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_ood
from timm_ood import training
from timm_ood.data import photos
from timm_ood.metrics import ood_metrics

from .._models import DIGITS_MEAN, DIGITS_STD, IMAGE_SIZE, batches, create, digits_split


def _softmax(row: list[float]) -> list[float]:
    normaliser = sum(math.exp(z) for z in row)
    return [math.exp(z) / normaliser for z in row]


def test_kl_to_uniform_by_hand_and_its_direction() -> None:
    logits = torch.tensor([[0.0, math.log(2.0)]])  # p = (1/3, 2/3)
    kl_u_p = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))  # KL(U || p): Lee et al. Eq. 1
    kl_p_u = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)  # the other direction
    assert float(training.kl_to_uniform(logits)) == pytest.approx(kl_u_p, rel=1e-6)
    assert abs(kl_u_p - kl_p_u) > 1e-3  # the directions differ, so the test tells them apart
    assert float(training.cross_entropy_to_uniform(logits)) == pytest.approx(kl_u_p + math.log(2), rel=1e-6)
    assert float(training.kl_to_uniform(torch.zeros(2, 5)).abs().max()) < 1e-6  # uniform: KL 0


def test_confidence_loss_by_hand_per_sample_reduction() -> None:
    logits_in = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1])
    logits_out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 0.0]])
    beta, k = 0.7, 4
    ce = sum(-math.log(_softmax(row)[t]) for row, t in zip(logits_in.tolist(), targets.tolist(), strict=True)) / 2
    kls = [sum((1 / k) * math.log((1 / k) / p) for p in _softmax(row)) for row in logits_out.tolist()]
    loss = training.ConfidenceLoss(beta=beta)(logits_in, targets, logits_out)
    assert float(loss) == pytest.approx(ce + beta * sum(kls) / 2, rel=1e-6)  # KL summed over classes, mean over samples
    per_element = ce + beta * sum(kls) / (2 * k)  # what an element-wise mean would give: beta silently / K
    assert abs(float(loss) - per_element) > 0.1
    uniform = torch.full_like(logits_out, 1 / k)
    batchmean = F.kl_div(logits_out.log_softmax(1), uniform, reduction="batchmean")  # KL(U || p) in torch's API
    torch.testing.assert_close(loss, F.cross_entropy(logits_in, targets) + beta * batchmean)


def test_outlier_exposure_by_hand_and_against_the_confidence_loss() -> None:
    torch.manual_seed(0)
    logits_in, targets, logits_out = torch.randn(3, 5), torch.tensor([4, 0, 2]), torch.randn(6, 5)
    ce = F.cross_entropy(logits_in, targets)
    to_uniform = sum(-sum(math.log(p) for p in _softmax(row)) / 5 for row in logits_out.tolist()) / 6
    loss = training.OutlierExposureLoss()(logits_in, targets, logits_out)  # lam = 0.5, the paper's
    assert float(loss) == pytest.approx(float(ce) + 0.5 * to_uniform, rel=1e-6)
    confidence = training.ConfidenceLoss(beta=0.5)(logits_in, targets, logits_out)
    assert float(loss - confidence) == pytest.approx(0.5 * math.log(5), rel=1e-5)  # a constant apart: same gradients


def test_two_batch_losses_refuse_bad_outlier_batches() -> None:
    for loss in (training.ConfidenceLoss(), training.OutlierExposureLoss()):
        with pytest.raises(ValueError, match="non-empty"):
            loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(0, 3))
        with pytest.raises(ValueError, match="classes"):
            loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="beta"):
        training.ConfidenceLoss(beta=-1)
    with pytest.raises(ValueError, match="lam"):
        training.OutlierExposureLoss(lam=-0.1)


# -- a short seeded run: the confidence loss with seen outliers against cross-entropy + MSP ---------------
def _photo_crops(names: tuple[str, ...], count: int, seed: int) -> torch.Tensor:
    """Random crops of real photos at the digits' size and normalisation."""
    crops = photos.random_crops(names, count, IMAGE_SIZE, np.random.default_rng(seed))
    return (torch.tensor(crops, dtype=torch.float32)[:, None] / 255 - DIGITS_MEAN) / DIGITS_STD


@functools.cache
def _trained(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = create("test_resnet")
    images, labels = digits_split()["train"]
    loss = outliers = None
    if method == "confidence":
        # seen outliers: the auxiliary photos, disjoint from the test photos below
        aux = _photo_crops(photos.AUXILIARY_PHOTOS, len(images), seed=0)
        outliers, loss = batches(aux, torch.full((len(aux),), -1), 64), training.ConfidenceLoss(beta=1.0)
    training.fit(model, batches(images, labels, 64), loss=loss, outliers=outliers, epochs=3, optimizer="adam",
                 lr=1e-3, weight_decay=0.0, seed=0, progress=False)
    return model


@pytest.mark.slow
def test_confidence_loss_beats_cross_entropy_on_unseen_photos() -> None:
    """Lee et al.'s claim on unseen outliers: the asserted gap (0.15 AUROC) is far inside the measured one.

    Measured over 5 seeds (this one, seed 0, and 1-4 for the initial weights and the run): MSP AUROC on the
    unseen test photos 0.34 to 0.63 with cross-entropy (0.46 ± 0.11, sd) and 0.955 to 0.982 with the
    confidence loss (0.970 ± 0.010); the gap per seed 0.34 to 0.64, so 0.15 is more than 1.5 sds of the
    gap below its smallest value. Accuracy 0.83 to 0.93 (both losses): the floor of 0.7 only checks that
    training worked (chance is 0.1) and sits more than 4 sds below the mean.
    """
    unseen = _photo_crops(photos.TEST_PHOTOS, 400, seed=1)
    test_images, test_labels = digits_split()["test"]
    aurocs = []
    for method in ("ce", "confidence"):
        model = _trained(method)
        assert training.accuracy(model, batches(test_images, test_labels)) > 0.7
        wrapped = timm_ood.wrap(model, "msp")
        scores_in, scores_out = wrapped.ood_score(test_images), wrapped.ood_score(unseen)
        is_ood = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))])
        aurocs.append(float(ood_metrics(torch.cat([scores_in, scores_out]), is_ood)["auroc"]))
    assert aurocs[1] > aurocs[0] + 0.15
