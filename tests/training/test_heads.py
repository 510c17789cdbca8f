"""IsoMax (Macêdo et al.): the prototype head, its loss, the entropic score, and a short training run."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import timm_ood
from timm_ood import training
from timm_ood.metrics import ood_metrics
from timm_ood.tap import Tap

from .._models import batches, create, digits_split, noise_images


def test_head_distances_and_logits_by_hand() -> None:
    head = training.IsoMaxHead(2, 2)
    assert torch.equal(head.prototypes, torch.zeros(2, 2))  # zero-initialised, as the paper
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    features = torch.tensor([[3.0, 4.0], [3.0, 0.0]])
    # ||(3,4)-(0,0)|| = 5, ||(3,4)-(3,0)|| = 4; ||(3,0)-(0,0)|| = 3, on the second prototype: 0 (eps)
    expected = torch.tensor([[5.0, 4.0], [3.0, 1e-6]])
    torch.testing.assert_close(head.distances(features), expected)
    torch.testing.assert_close(head(features), -expected)


def test_loss_by_hand() -> None:
    logits = torch.tensor([[-0.5, -0.2, -1.0], [-0.3, -0.9, -0.1]])
    targets = torch.tensor([1, 0])
    scale = 10.0
    expected = 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        terms = [math.exp(scale * z) for z in row]  # exp(-E_s d)
        expected += -math.log(terms[target] / sum(terms))
    loss = training.IsoMaxLoss(entropic_scale=scale)(logits, targets)
    assert float(loss) == pytest.approx(expected / 2, rel=1e-6)
    # no scale at E_s = 1: plain cross-entropy of -d
    plain = training.IsoMaxLoss(entropic_scale=1.0)(logits, targets)
    torch.testing.assert_close(plain, nn.functional.cross_entropy(logits, targets))
    with pytest.raises(ValueError, match="replace_head"):
        training.IsoMaxLoss()(torch.tensor([[0.5, -1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="entropic_scale"):
        training.IsoMaxLoss(entropic_scale=0)


def test_gradient_is_finite_at_a_zero_feature_and_on_a_prototype() -> None:
    head = training.IsoMaxHead(3, 2)  # prototypes at zero
    features = torch.zeros(1, 3, requires_grad=True)
    head(features).sum().backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(head.prototypes.grad).all()
    head.zero_grad()
    with torch.no_grad():
        head.prototypes[1] = torch.tensor([1.0, -2.0, 0.5])
    on_prototype = head.prototypes.detach()[1:].clone().requires_grad_(True)
    loss = training.IsoMaxLoss()(head(on_prototype), torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(on_prototype.grad).all() and torch.isfinite(head.prototypes.grad).all()
    # away from zero the gradient is exact: d||h - p|| / dh = (h - p) / ||h - p||
    h = torch.tensor([[2.0, 1.0, -1.0]], requires_grad=True)
    head(h)[0, 1].backward()
    difference = h.detach()[0] - head.prototypes.detach()[1]
    torch.testing.assert_close(h.grad[0], -difference / difference.norm())


def test_weight_decay_reaches_the_prototypes() -> None:
    torch.manual_seed(0)
    model = create("test_resnet")
    head = training.replace_head(model, "isomax")
    with torch.no_grad():
        head.prototypes.fill_(1.0)

    class NoGradient(nn.Module):  # the loss ignores the head: only weight decay moves the prototypes
        def forward(self, logits, targets):
            return (0 * logits).sum()

    images, labels = digits_split()["train"]
    training.fit(model, batches(images[:8], labels[:8], 8), loss=NoGradient(), epochs=1, lr=0.1, weight_decay=0.1,
                 momentum=0.0, schedule="constant", progress=False)
    torch.testing.assert_close(head.prototypes, torch.full_like(head.prototypes, 1.0 - 0.1 * 0.1))


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit"])
def test_replace_head_keeps_the_timm_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create(name).eval()
    linear = model.get_classifier()
    head = training.replace_head(model, "isomax")
    assert model.get_classifier() is head and isinstance(head, training.IsoMaxHead)
    assert (head.in_features, head.out_features) == (linear.in_features, linear.out_features)
    assert model.timm_ood_head == {"kind": "isomax", "options": {"eps": 1e-6, "prototype_init": "zero"}}
    x = digits_split()["test"][0][:3]
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(x), -head.distances(pre_logits))
    assert Tap(model).head_info.kind == "other"  # logits come from forward_head
    model.reset_classifier(5)
    assert isinstance(model.get_classifier(), training.IsoMaxHead) and model.get_classifier().out_features == 5
    assert model(x).shape == (3, 5) and torch.equal(model.get_classifier().prototypes, torch.zeros(5, head.in_features))
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    model.reset_classifier(4)
    assert isinstance(model.get_classifier(), training.IsoMaxHead)
    training.replace_head(model, "linear")
    assert type(model.get_classifier()) is nn.Linear and not hasattr(model, "timm_ood_head")
    model.reset_classifier(6)
    assert type(model.get_classifier()) is nn.Linear


def test_replace_head_refuses_what_it_cannot_do() -> None:
    model = create("test_resnet")
    with pytest.raises(ValueError, match="unknown head kind 'isomx'"):
        training.replace_head(model, "isomx")
    with pytest.raises(ValueError, match="num_classes=0"):
        training.replace_head(create("test_resnet", num_classes=0), "isomax")
    with pytest.raises(TypeError, match="timm model"):
        training.replace_head(nn.Linear(3, 2), "isomax")


def test_prototypes_start_at_zero_or_xavier_and_the_choice_is_checked(tmp_path) -> None:
    """Zero is the paper's initialisation; Xavier-normal (the one it found unstable) is kept to measure that."""
    assert not training.IsoMaxHead(8, 3).prototypes.any()
    torch.manual_seed(0)
    xavier = training.IsoMaxHead(64, 10, prototype_init="xavier").prototypes.detach()
    assert float(xavier.std()) == pytest.approx(math.sqrt(2 / (64 + 10)), rel=0.1)  # Xavier-normal's sd
    with pytest.raises(ValueError, match="prototype_init 'kaiming'; choose one of zero, xavier"):
        training.IsoMaxHead(8, 3, prototype_init="kaiming")
    model = create("test_resnet")
    training.replace_head(model, "isomax", prototype_init="xavier")
    path = tmp_path / "xavier.safetensors"
    training.save_checkpoint(model, path)
    loaded = training.load_checkpoint(path).get_classifier()
    assert loaded.prototype_init == "xavier" and torch.equal(loaded.prototypes, model.get_classifier().prototypes)


def test_checkpoint_restores_the_head(tmp_path) -> None:
    torch.manual_seed(0)
    model = create("test_resnet")
    training.replace_head(model, "isomax")
    with torch.no_grad():
        model.get_classifier().prototypes.normal_()
    path = tmp_path / "isomax.safetensors"
    training.save_checkpoint(model, path)
    assert training.read_checkpoint_metadata(path)["head"] == {"kind": "isomax",
                                                               "options": {"eps": 1e-6, "prototype_init": "zero"}}
    loaded = training.load_checkpoint(path)
    assert isinstance(loaded.get_classifier(), training.IsoMaxHead)
    x = digits_split()["test"][0][:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_entropic_score_by_hand_at_scale_one() -> None:
    logits = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    detector = timm_ood.create_detector("entropic")
    scores = detector.score(_Outputs(logits))
    for row, score in zip(logits.tolist(), scores.tolist(), strict=True):
        normaliser = sum(math.exp(z) for z in row)
        p = [math.exp(z) / normaliser for z in row]
        assert score == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-12)  # H(softmax(-d)), no E_s
    assert scores[1] == pytest.approx(math.log(3))  # equal distances: the most OOD an input can be
    torch.testing.assert_close(scores, timm_ood.create_detector("entropy").score(_Outputs(logits)).double())


class _Outputs:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


# -- a short seeded run: IsoMax + entropic against cross-entropy + MSP ------------------------------------
def _auroc(model: nn.Module, detector: str, ood: torch.Tensor) -> float:
    wrapped = timm_ood.wrap(model, detector)
    scores_in, scores_out = wrapped.ood_score(digits_split()["test"][0]), wrapped.ood_score(ood)
    is_ood = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))])
    return float(ood_metrics(torch.cat([scores_in, scores_out]), is_ood)["auroc"])


@functools.cache
def _trained(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = create("test_resnet")
    loss = None
    if method == "isomax":
        training.replace_head(model, "isomax")
        loss = training.IsoMaxLoss(entropic_scale=10.0)
    images, labels = digits_split()["train"]
    training.fit(model, batches(images, labels, 64), loss=loss, epochs=3, optimizer="adam", lr=1e-3, weight_decay=0.0,
                 seed=0, progress=False)
    return model


@pytest.mark.slow
def test_isomax_entropic_beats_cross_entropy_msp_on_noise() -> None:
    """IsoMax's claim on noise: the asserted gap (0.2 AUROC) is far inside the measured one.

    Measured over 5 seeds (this one, seed 0, and 1-4): AUROC on uniform noise 0.66 to 0.97 for IsoMax's
    entropic score (0.87 ± 0.13, sd) and 0.00 to 0.18 for cross-entropy's MSP (0.06 ± 0.08); the gap per
    seed 0.56 to 0.97. Accuracy 0.87 to 0.91 with IsoMax, 0.83 to 0.91 with cross-entropy: the difference
    (-0.02 to +0.06) is within the spread, so only IsoMax's absolute accuracy is checked, at a floor (0.8)
    below every measured run.
    """
    ood = noise_images(400, seed=1)
    baseline, isomax = _trained("ce"), _trained("isomax")
    assert training.accuracy(isomax, batches(*digits_split()["test"])) > 0.8
    assert _auroc(isomax, "entropic", ood) > _auroc(baseline, "msp", ood) + 0.2


def test_entropic_is_entropy_under_the_isomax_papers_name():
    """Issue 17: one computation, two registered names (the paper's and the generic one)."""
    from timm_ood.detectors.entropic import EntropicScore
    from timm_ood.detectors.logits import Entropy
    from timm_ood.tap import Outputs

    assert issubclass(EntropicScore, Entropy) and EntropicScore.score is Entropy.score
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 5
    outputs = Outputs(None, Tap(nn.Linear(3, 10)), logits=logits)
    assert torch.equal(timm_ood.create_detector("entropic").score(outputs),
                       timm_ood.create_detector("entropy").score(outputs))
