"""The tap's five kinds of head (``timm_ood.tap.inspect_head``, ``HeadInfo.kind``): what each gives, and refuses.

``linear`` (one ``nn.Linear`` over the pre-logits, every detector), ``other``
(logits from ``forward_head``), ``distilled`` (timm's distilled models: the
inference logits), ``none`` (``num_classes=0``: features only) and ``opaque``
(a plain module without timm's contract: logits only).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import timm_ood
from timm_ood import IncompatibleModelError
from timm_ood.tap import HeadInfo, Need, Tap, inspect_head

from ._models import batches, create, digits_split


def test_inspect_head_tells_the_five_kinds_apart() -> None:
    mlp = create("test_resnet")
    mlp.fc = nn.Sequential(nn.Linear(mlp.num_features, 16), nn.ReLU(), nn.Linear(16, 10))
    models = {
        "linear": create("test_resnet"),
        "other": mlp,
        "distilled": timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=32,
                                       depth=2, embed_dim=48, num_heads=2),
        "none": create("test_resnet", num_classes=0),
        "opaque": nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10)),
    }
    heads = {kind: inspect_head(model) for kind, model in models.items()}
    assert {kind: head.kind for kind, head in heads.items()} == {kind: kind for kind in models}
    assert [head.has_logits for head in heads.values()] == [True, True, True, False, True]
    assert [head.is_linear for head in heads.values()] == [True, False, False, False, False]
    assert (heads["none"].num_classes, heads["opaque"].num_features) == (0, None)


@pytest.mark.parametrize("architecture", ["test_resnet", "test_convnext", "test_vit"])
def test_a_linear_head_gives_its_weight_and_bias_and_the_logits_from_the_pre_logits(architecture: str) -> None:
    """The common head, one nn.Linear over the pre-logits: every detector may read it."""
    torch.manual_seed(0)
    model = create(architecture).eval()
    tap = Tap(model)
    classifier = model.get_classifier()
    assert tap.head_info == HeadInfo("linear", 10, classifier.in_features)
    weight, bias = tap.linear_classifier("vim")
    assert weight is classifier.weight and bias is classifier.bias
    x = digits_split()["test"][0][:3]
    with torch.no_grad():
        outputs = tap(x, {Need.LOGITS, Need.PRE_LOGITS})
        torch.testing.assert_close(outputs.logits, model(x))
        torch.testing.assert_close(outputs.logits, outputs.pre_logits @ weight.T + bias)
    assert timm_ood.wrap(model, "vim").tap.head_info.kind == "linear"


class TestHeads:
    """Models whose head is not one linear layer get documented behaviour, never a wrong score."""

    def test_no_classifier(self) -> None:
        model = create("test_resnet", num_classes=0)
        with pytest.raises(IncompatibleModelError, match="num_classes=0"):
            timm_ood.wrap(model, "msp")
        detector = timm_ood.wrap(model, "mahalanobis").fit(batches(*digits_split()["train"]), progress=False)
        assert detector.ood_score(digits_split()["test"][0][:4]).shape == (4,)

    def test_distilled_model_scores_its_inference_logits(self) -> None:
        model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=32,
                                  depth=2, embed_dim=48, num_heads=2).eval()
        x = torch.randn(3, 3, 32, 32)
        wrapped = timm_ood.wrap(model, "msp")
        assert wrapped.tap.head_info.kind == "distilled"
        with torch.no_grad():
            expected = torch.logsumexp(model(x).double(), 1) - model(x).double().amax(1)
        torch.testing.assert_close(wrapped.ood_score(x), expected)
        with pytest.raises(IncompatibleModelError, match="distilled"):
            wrapped.tap.linear_classifier("react")

    def test_mlp_classifier_uses_forward_head(self) -> None:
        model = create("test_resnet")
        model.fc = nn.Sequential(nn.Linear(model.num_features, 16), nn.ReLU(), nn.Linear(16, 10))
        model.eval()
        wrapped = timm_ood.wrap(model, "maxlogit")
        assert wrapped.tap.head_info.kind == "other"
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(wrapped.ood_score(x), -model(x).amax(1))
        with pytest.raises(IncompatibleModelError, match=r"not one nn\.Linear"):
            wrapped.tap.linear_classifier("vim")

    def test_plain_module_gives_logits_only(self) -> None:
        model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
        scores = timm_ood.wrap(model, "energy").ood_score(torch.randn(5, 1, 32, 32))
        assert scores.shape == (5,)
        with pytest.raises(IncompatibleModelError, match="forward_features"):
            timm_ood.wrap(model, "mahalanobis")
