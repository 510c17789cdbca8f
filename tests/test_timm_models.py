"""Pretrained timm models by name, offline: a local weights file through timm's own overlay, and clear errors."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_ood
from timm_ood.errors import UnknownModelError, WeightsUnavailableError
from timm_ood.timm_models import close_model_names, create_timm_model, split_model_name

pytestmark = pytest.mark.usefixtures("data_hub_offline")


@pytest.fixture(scope="module")
def test_resnet_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    state = timm.create_model("test_resnet").state_dict()
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(state, str(path))
    return str(path), state


def test_a_local_weights_file_loads_through_the_tags_overlay_and_keeps_its_data_config(test_resnet_weights):
    path, state = test_resnet_weights
    model = create_timm_model("test_resnet.r160_in1k", weights=path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.pretrained_cfg["tag"] == "r160_in1k" and model.pretrained_cfg["file"] == path
    config = timm_ood.model_info.data_config(model)
    assert config["input_size"] == (3, 160, 160)
    assert config["mean"] == timm.get_pretrained_cfg("test_resnet.r160_in1k").mean
    assert not model.training


def test_timm_kwargs_reach_timm_with_the_weights(test_resnet_weights):
    path, _ = test_resnet_weights
    model = create_timm_model("test_resnet.r160_in1k", weights=path, num_classes=7)
    assert model.num_classes == 7  # timm drops the file's classifier for another class count


def test_create_model_wraps_a_pretrained_model_in_one_call(test_resnet_weights):
    path, _ = test_resnet_weights
    ood = timm_ood.create_model("test_resnet.r160_in1k", detector="energy", weights=path)
    assert isinstance(ood, timm_ood.OODModel) and ood.detector.name == "energy"
    scores = ood.ood_score(torch.randn(2, 3, 160, 160))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_an_unknown_model_suggests_the_closest_timm_names():
    with pytest.raises(UnknownModelError, match="resnet18") as error:
        create_timm_model("resnet81")
    assert "timm has no model 'resnet81'" in str(error.value)
    assert "\n" not in str(error.value)
    assert "resnet18" in close_model_names("resnet81")


def test_an_unknown_tag_lists_the_tags_that_exist():
    with pytest.raises(UnknownModelError, match=r"no pretrained tag 'a9_in1k'.*resnet18\.a1_in1k"):
        create_timm_model("resnet18.a9_in1k")


def test_offline_without_weights_says_how_to_pass_a_local_file_at_once():
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=r"--weights FILE") as error:
        create_timm_model("resnet18.a1_in1k")
    assert time.perf_counter() - started < 10
    assert "cannot be reached" in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, OSError)


def test_a_file_that_is_not_a_state_dict_is_named(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"is not a weights file timm can read"):
        create_timm_model("test_resnet.r160_in1k", weights=junk)
    with pytest.raises(FileNotFoundError, match="not found"):
        create_timm_model("test_resnet.r160_in1k", weights=tmp_path / "missing.safetensors")


def test_weights_of_another_architecture_are_refused(test_resnet_weights):
    path, _ = test_resnet_weights
    with pytest.raises(ValueError, match=r"do not fit test_vit\.r160_in1k.*names the architecture"):
        create_timm_model("test_vit.r160_in1k", weights=path)


def test_model_names_split_into_architecture_and_tag():
    assert split_model_name("resnet50.a1_in1k") == ("resnet50", "a1_in1k")
    assert split_model_name("resnet50") == ("resnet50", None)


def test_an_architecture_without_pretrained_weights_says_how_to_go_on():
    with pytest.raises(UnknownModelError, match=r"no pretrained weights for 'resnet50t'.*pretrained=False"):
        create_timm_model("resnet50t")
    assert create_timm_model("test_resnet", pretrained=False).num_classes == 1000


def test_an_hf_hub_id_offline_is_named_and_cannot_take_a_local_file(test_resnet_weights):
    with pytest.raises(WeightsUnavailableError, match=r"hf_hub:timm/resnet18\.a1_in1k.*cannot be reached"):
        create_timm_model("hf_hub:timm/resnet18.a1_in1k")
    with pytest.raises(ValueError, match=r"name the timm model instead \(e\.g\. 'resnet18\.a1_in1k'\)"):
        create_timm_model("hf_hub:timm/resnet18.a1_in1k", weights=test_resnet_weights[0])


def test_weights_unavailable_is_a_hub_unavailable_error():
    """One family for "the hub cannot be reached", whatever was asked of it (weights, datasets, detectors)."""
    assert issubclass(WeightsUnavailableError, timm_ood.HubUnavailableError)
    assert timm_ood.data.HubUnavailableError is timm_ood.HubUnavailableError
