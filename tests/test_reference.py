"""The reference model: recipes train reproducibly, cache by their hash and warn below their accuracy goal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from timm_ood.reference import FAST_RECIPE, RECIPE, Recipe, reference_model, train_on_source
from timm_ood.training import read_checkpoint_metadata

TINY = Recipe(architecture="test_resnet", epochs=1, batch_size=64, lr=0.05, train_images=256, warmup_epochs=0.0,
              min_accuracy=0.0)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_recipe_seed_fixes_the_initial_weights(data_fashion_mnist) -> None:
    """The model is the recipe's, not the caller's random state's: two runs from different global states agree."""
    torch.manual_seed(1)
    first, first_accuracy = train_on_source(TINY, progress=False)
    torch.manual_seed(2)
    torch.rand(1000)
    second, second_accuracy = train_on_source(TINY, progress=False)
    assert first_accuracy == second_accuracy
    for name, tensor in state(first).items():
        assert torch.equal(tensor, state(second)[name]), name
    other, _ = train_on_source(dataclasses.replace(TINY, seed=1), progress=False)
    assert not torch.equal(state(other)["fc.weight"], state(first)["fc.weight"])


def test_cache_key_changes_with_every_field() -> None:
    keys = {RECIPE.key(), FAST_RECIPE.key(), TINY.key()}
    for field in dataclasses.fields(Recipe):
        if field.name in ("architecture", "source"):
            continue
        value = getattr(TINY, field.name)
        changed = {int: lambda v: v + 1, float: lambda v: v + 0.5, bool: lambda v: not v, str: lambda v: v + "x",
                   type(None): lambda v: 7}[type(value)](value)
        keys.add(dataclasses.replace(TINY, **{field.name: changed}).key())
    assert len(keys) == 3 + len(dataclasses.fields(Recipe)) - 2
    assert RECIPE.key().startswith("resnet18-fashion-mnist-")


def test_reference_model_is_cached_and_records_its_recipe(tmp_path, data_fashion_mnist) -> None:
    model = reference_model(TINY, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    assert path.name == f"{TINY.key()}.safetensors"
    metadata = read_checkpoint_metadata(path)["metadata"]
    assert metadata["recipe"] == dataclasses.asdict(TINY)
    assert 0.0 < metadata["test_accuracy"] <= 1.0
    modified = path.stat().st_mtime_ns
    cached = reference_model(TINY, cache_dir=tmp_path, progress=False)
    assert path.stat().st_mtime_ns == modified
    assert not cached.training
    for name, tensor in state(model).items():
        assert torch.equal(tensor, state(cached)[name]), name


def test_reference_model_warns_below_its_accuracy_goal(tmp_path, data_fashion_mnist) -> None:
    demanding = dataclasses.replace(TINY, min_accuracy=0.999)
    with pytest.warns(UserWarning, match=r"below the 100% the benchmark asks for"):
        reference_model(demanding, cache_dir=tmp_path, progress=False)
    assert (tmp_path / f"{demanding.key()}.safetensors").exists()
