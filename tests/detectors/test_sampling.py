"""mc-dropout and deep-ensemble, each against its paper's formula.

The models are the conformance kit's (``timm_ood.testing.conformance_model``):
trained once per process and shared with ``tests/test_conformance.py``. The
kit itself runs here for ``mc-dropout`` and ``deep-ensemble``, on the kit's
models given dropout and made into an ensemble (the plain models refuse them).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

import timm_ood
from timm_ood import IncompatibleModelError
from timm_ood.detectors.sampling import (
    EnsembleModel,
    SharedMaskDropout,
    mc_dropout_log_probabilities,
    sampled_generators,
)
from timm_ood.tap import Tap
from timm_ood.testing import conformance_model, detector_checks

from ._kit import sample

ARCHITECTURES = ("test_resnet", "test_convnext", "test_vit")


def with_dropout(model: nn.Module, **rates: float) -> nn.Module:
    """``model`` re-created with dropout rates (``drop_rate=...``) and the same trained weights."""
    cfg = model.pretrained_cfg
    size = {"img_size": model.patch_embed.img_size} if hasattr(model, "patch_embed") else {}
    copy = timm.create_model(cfg["architecture"], num_classes=model.num_classes, in_chans=cfg["input_size"][0],
                             pretrained_cfg_overlay=dict(cfg), **size, **rates)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@functools.cache
def kit_model(detector: str, architecture: str) -> nn.Module:
    """The model the kit checks ``detector`` on: the kit's own, with dropout or as a two-member ensemble."""
    if detector == "mc-dropout":
        return with_dropout(conformance_model(architecture), drop_rate=0.3)
    return EnsembleModel([conformance_model(architecture), conformance_model(architecture)])


# -- the conformance kit on models with dropout and on ensembles ------------------------------------


KIT = [(name, architecture, check.name) for name in ("mc-dropout", "deep-ensemble")
       for architecture in ARCHITECTURES for check in detector_checks(name)]


@pytest.mark.parametrize(("detector", "architecture", "check"), KIT, ids=["-".join(case) for case in KIT])
def test_the_conformance_kit_passes(detector: str, architecture: str, check: str) -> None:
    model = kit_model(detector, architecture)
    (bound,) = [c for c in detector_checks(detector, model=model) if c.name == check]
    bound()


# -- mc-dropout ---------------------------------------------------------------------------------------------


def test_mc_dropout_is_the_monte_carlo_average_of_its_sampled_networks() -> None:
    model = with_dropout(conformance_model("test_resnet"), drop_rate=0.5)
    x = sample(model, 8)
    inputs_of_classifier: list[torch.Tensor] = []
    stem_calls: list[int] = []
    hooks = [model.get_classifier().register_forward_hook(lambda m, args, out: inputs_of_classifier.append(args[0])),
             model.get_submodule(model.pretrained_cfg["first_conv"]).register_forward_hook(
                 lambda m, args, out: stem_calls.append(1))]
    try:
        scores = timm_ood.wrap(model, "mc-dropout", samples=7, seed=3).ood_score(x)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        h = model.forward_head(model.forward_features(x), pre_logits=True).double()
    assert len(stem_calls) == 1 and len(inputs_of_classifier) == 7  # dropout only in the head: features once
    classifier = model.get_classifier()
    probabilities = []
    masks = []
    for dropped in inputs_of_classifier:
        dropped = dropped.double()
        kept = (dropped != 0).any(dim=0)  # units that are 0 for every input tell nothing: the ReLU's zeros
        # one mask per pass, shared by the batch; kept units scaled by 1 / (1 - p)
        torch.testing.assert_close(dropped, 2 * h * kept, rtol=0, atol=0)
        masks.append(kept[(h != 0).any(dim=0)])
        logits = F.linear(dropped, classifier.weight.double(), classifier.bias.double())
        probabilities.append(torch.softmax(logits, dim=1))
    assert len({tuple(mask.tolist()) for mask in masks}) == 7, "every pass samples another network"
    mean = torch.stack(masks).double().mean()
    assert 0.3 < float(mean) < 0.7  # p = 0.5
    expected = -torch.stack(probabilities).mean(0).amax(1).log()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rates", [{"drop_rate": 0.3}, {"drop_rate": 0.2, "proj_drop_rate": 0.2}],
                         ids=["head-dropout", "dropout-in-the-blocks"])
def test_mc_dropout_equals_full_stochastic_passes_and_reuses_features_only_when_exact(rates: dict) -> None:
    model = with_dropout(conformance_model("test_vit"), **rates)
    x = sample(model, 6)
    with torch.inference_mode():
        log_mean = mc_dropout_log_probabilities(Tap(model), x, samples=5, seed=0)
        passes = []
        for generator in sampled_generators(5, seed=0):
            with SharedMaskDropout(generator):
                passes.append(torch.log_softmax(model(x).double(), dim=1))
    expected = torch.logsumexp(torch.stack(passes), dim=0) - np.log(5)
    torch.testing.assert_close(log_mean, expected, rtol=1e-10, atol=1e-12)


def test_mc_dropout_is_seeded() -> None:
    model = kit_model("mc-dropout", "test_convnext")
    x = sample(model)
    first, again = (timm_ood.wrap(model, "mc-dropout", seed=1).ood_score(x) for _ in range(2))
    other = timm_ood.wrap(model, "mc-dropout", seed=2).ood_score(x)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_mc_dropout_refuses_models_whose_dropout_it_cannot_sample() -> None:
    with pytest.raises(IncompatibleModelError, match=r"no dropout with p > 0.*drop_rate=0\.2"):
        timm_ood.wrap(conformance_model("test_resnet"), "mc-dropout")
    fused = with_dropout(conformance_model("test_vit"), attn_drop_rate=0.1)
    if any(getattr(module, "fused_attn", False) for module in fused.modules()):
        with pytest.raises(IncompatibleModelError, match=r"fused scaled_dot_product_attention.*set_fused_attn"):
            timm_ood.wrap(fused, "mc-dropout")


# -- deep-ensemble --------------------------------------------------------------------------------------


@functools.cache
def mixed_ensemble() -> EnsembleModel:
    """Three different architectures trained on the same digits: a diverse ensemble."""
    return EnsembleModel([conformance_model(architecture) for architecture in ARCHITECTURES])


def test_deep_ensemble_is_the_entropy_of_the_members_mean_softmax() -> None:
    ensemble = mixed_ensemble()
    x = sample(ensemble)
    scores = timm_ood.wrap(ensemble, "deep-ensemble").ood_score(x)
    with torch.no_grad():
        probabilities = np.stack([torch.softmax(m(x).double(), dim=1).numpy() for m in ensemble.members])
    mean = probabilities.mean(0)
    expected = -(mean * np.log(mean)).sum(1)
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        np.testing.assert_allclose(ensemble(x).double().exp().numpy(), mean, rtol=1e-5, atol=1e-7)
    assert ensemble.pretrained_cfg["architecture"] == "ensemble[test_resnet,test_convnext,test_vit]"
    msp = timm_ood.wrap(ensemble, "msp").ood_score(x)  # the paper's other measure: the confidence max p̄
    np.testing.assert_allclose(msp.double().numpy(), -np.log(mean.max(1)), rtol=1e-5, atol=1e-7)


def test_deep_ensemble_refuses_a_single_model_and_members_that_disagree() -> None:
    with pytest.raises(IncompatibleModelError, match=r"EnsembleModel\(\[model_1, model_2"):
        timm_ood.wrap(conformance_model("test_resnet"), "deep-ensemble")
    resnet = conformance_model("test_resnet")
    fewer_classes = timm.create_model("test_resnet", num_classes=3, in_chans=1,
                                      pretrained_cfg_overlay=dict(resnet.pretrained_cfg))
    with pytest.raises(ValueError, match=r"different numbers of classes: \[10, 3\]"):
        EnsembleModel([resnet, fewer_classes])
    other_normalisation = timm.create_model("test_resnet", num_classes=10, in_chans=1,
                                            pretrained_cfg_overlay={**resnet.pretrained_cfg, "std": (0.5,)})
    with pytest.raises(ValueError, match="member 1 takes inputs"):
        EnsembleModel([resnet, other_normalisation])
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleModel([])


def test_an_ensemble_saves_as_models_and_its_detector_as_a_name(tmp_path) -> None:
    ensemble = mixed_ensemble()
    ood = timm_ood.wrap(ensemble, "deep-ensemble")
    x = sample(ensemble)
    ood.calibrate([(x, None)], tpr=0.9)
    save_model(ensemble, str(tmp_path / "ensemble.safetensors"))
    ood.save_detector(tmp_path / "detector.safetensors")
    rebuilt = EnsembleModel([timm.create_model(a, num_classes=10, in_chans=1, pretrained_cfg_overlay=dict(m.pretrained_cfg),
                                               **({"img_size": 32} if a == "test_vit" else {}))
                             for a, m in zip(ARCHITECTURES, ensemble.members, strict=True)])
    load_model(rebuilt, str(tmp_path / "ensemble.safetensors"))
    loaded = timm_ood.wrap(rebuilt.eval(), "deep-ensemble").load_detector(tmp_path / "detector.safetensors")
    assert loaded.detector.fitted_state() == {} and float(loaded.threshold) == float(ood.threshold)
    torch.testing.assert_close(loaded.ood_score(x), ood.ood_score(x), rtol=0, atol=0)
