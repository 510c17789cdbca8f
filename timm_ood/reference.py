"""The reference model of the offline benchmark: a timm ResNet-18 trained on Fashion-MNIST.

The offline benchmark asks for a model trained on the CPU in minutes, at least 90% test accuracy, its
checkpoint cached so a benchmark rerun does not retrain. The recipe lives in
one frozen :class:`Recipe`; the cache file name holds its hash, so changing the
recipe retrains instead of reusing a stale model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._runtime import cpu_threads, numerics_environment

__all__ = ["FAST_RECIPE", "RECIPE", "RECORDED_RESULTS", "TRAINING_VERSION", "Recipe", "checkpoint_path", "record_results", "recorded_results",
           "reference_model", "train_on_source"]


@dataclass(frozen=True)
class Recipe:
    """How a reference model is trained.

    Attributes:
        architecture: the timm model.
        source: the in-distribution training source (and its ``test`` split for accuracy).
        epochs / batch_size / optimizer / lr / weight_decay / schedule / warmup_epochs / augment / seed:
            as :func:`timm_ood.training.fit`.
        train_images: use only the first N training images (None = all).
        num_threads: CPU threads the training runs with (None: torch's default). The thread
            count changes the order of parallel floating-point sums, so pinning it makes the
            recipe repeatable across core counts; see :func:`timm_ood._runtime.numerics_environment`
            for what else must match.
        min_accuracy: warn when the trained model's test accuracy is lower.
    """

    architecture: str = "resnet18"
    source: str = "fashion-mnist"
    epochs: int = 7
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.2
    augment: bool = True
    seed: int = 0
    train_images: int | None = None
    num_threads: int | None = 2
    min_accuracy: float = 0.90

    def without_seed(self) -> dict[str, object]:
        """Every field but the seed: what runs of one recipe over several seeds share."""
        fields = dataclasses.asdict(self)
        del fields["seed"]
        return fields

    def key(self) -> str:
        """The cache name: architecture, source and a hash of every field and of :data:`TRAINING_VERSION`."""
        fields = {**dataclasses.asdict(self), "training_version": TRAINING_VERSION}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"{self.architecture}-{self.source}-{digest[:12]}"


#: bumped when :func:`train_on_source` changes what a recipe trains to (2: the model's initial weights
#: are seeded by ``Recipe.seed``; 3: training runs with ``Recipe.num_threads`` CPU threads), so caches
#: from an earlier version are retrained, not reused
TRAINING_VERSION = 3

#: the benchmark's reference model
RECIPE = Recipe()
#: a small stand-in for quick runs (``timm-ood demo --fast``, the test suite): no accuracy goal
FAST_RECIPE = Recipe(architecture="test_resnet", epochs=1, batch_size=64, lr=0.05, train_images=6000,
                     min_accuracy=0.0, warmup_epochs=0.0)


#: the demo's numbers over several seeds, written by ``timm-ood demo --seeds 0,1,2 --record-reference``
RECORDED_RESULTS = Path(__file__).with_name("reference_results.json")


def recorded_results(recipe: Recipe = RECIPE) -> dict[str, Any] | None:
    """The demo's accuracy and average FPR@95TPR recorded over several seeds of ``recipe``'s family.

    Returns the record (``seeds``, ``accuracy`` and per-detector ``fpr_at_tpr`` /
    ``auroc`` as mean, sd and n) made with the same recipe up to the seed and
    the same :data:`TRAINING_VERSION`, or None: numbers recorded for another
    recipe say nothing about this one.
    """
    return next((r for r in _records() if _same_family(r, recipe)), None)


def record_results(recipe: Recipe, record: dict[str, Any]) -> None:
    """Store ``record`` as :func:`recorded_results` of ``recipe``'s family (replacing an older one)."""
    entry = {"recipe": recipe.without_seed(), "training_version": TRAINING_VERSION, **record}
    records = [r for r in _records() if not _same_family(r, recipe)] + [entry]
    RECORDED_RESULTS.write_text(json.dumps({"records": records}, indent=2) + "\n")


def _records() -> list[dict[str, Any]]:
    if not RECORDED_RESULTS.exists():
        return []
    return list(json.loads(RECORDED_RESULTS.read_text())["records"])


def _same_family(record: dict[str, Any], recipe: Recipe) -> bool:
    return record.get("recipe") == recipe.without_seed() and record.get("training_version") == TRAINING_VERSION


def train_on_source(recipe: Recipe, *, progress: bool | None = None) -> tuple[nn.Module, float]:
    """Create the recipe's timm model for its source and train it; returns ``(model, test accuracy)``.

    ``recipe.seed`` seeds the model's initial weights as well as the training
    run, and the run uses ``recipe.num_threads`` CPU threads, so the same recipe
    gives bit-identical weights whatever the caller's random state or thread
    setting, on machines whose CPU kernels agree (same CPU instruction set and
    torch build: see ``docs/reproducibility.md``).
    """
    from . import training
    from .data import load_source, make_loader, model_overlay
    from .timm_models import create_timm_model

    train = load_source(recipe.source, split="train")
    test = load_source(recipe.source, split="test")
    if recipe.train_images is not None and len(train) > recipe.train_images:
        train = train.shuffle(seed=recipe.seed).select(range(recipe.train_images))
    overlay = model_overlay(recipe.source)
    num_classes = len(set(train["label"]))
    with cpu_threads(recipe.num_threads):
        torch.manual_seed(recipe.seed)
        # timm.create_model, with the closest timm names when the architecture is unknown
        model = create_timm_model(recipe.architecture, pretrained=False, num_classes=num_classes,
                                  in_chans=overlay["input_size"][0], pretrained_cfg_overlay=overlay)
        loader = make_loader(train, model, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed,
                             drop_last=True, name=f"{recipe.source}/train")
        training.fit(model, loader, epochs=recipe.epochs, optimizer=recipe.optimizer, lr=recipe.lr,
                     weight_decay=recipe.weight_decay, schedule=recipe.schedule, warmup_epochs=recipe.warmup_epochs,
                     augment=recipe.augment, seed=recipe.seed, progress=progress)
    accuracy = training.accuracy(model, make_loader(test, model, batch_size=512, name=f"{recipe.source}/test"))
    return model, accuracy


def checkpoint_path(recipe: Recipe, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`reference_model` caches ``recipe``'s model (default ``$TIMM_OOD_CACHE_DIR/models``)."""
    from .data.cache import cache_dir as default_cache_dir

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "models"
    return folder / f"{recipe.key()}.safetensors"


def reference_model(
    recipe: Recipe = RECIPE, *, cache_dir: str | Path | None = None, retrain: bool = False,
    progress: bool | None = None,
) -> nn.Module:
    """The trained reference model, from the cache or trained now (and cached).

    Args:
        recipe: what to train (default :data:`RECIPE`, ResNet-18 on Fashion-MNIST).
        cache_dir: where checkpoints live (default ``$TIMM_OOD_CACHE_DIR/models``).
        retrain: ignore the cache.
        progress: tqdm bars while training.

    Returns:
        The model in eval mode; its checkpoint metadata records the recipe and
        the test accuracy (``timm_ood.training.read_checkpoint_metadata``).
    """
    from .training import load_checkpoint, save_checkpoint

    path = checkpoint_path(recipe, cache_dir)
    if path.exists() and not retrain:
        return load_checkpoint(path)
    model, accuracy = train_on_source(recipe, progress=progress)
    numerics = numerics_environment()
    if recipe.num_threads is not None:
        numerics["threads"] = recipe.num_threads
    if accuracy < recipe.min_accuracy:
        warnings.warn(
            f"the reference {recipe.architecture} reached {100 * accuracy:.2f}% test accuracy on "
            f"{recipe.source}, below the {100 * recipe.min_accuracy:.0f}% the benchmark asks for",
            stacklevel=2,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_checkpoint(model, partial, metadata={"recipe": dataclasses.asdict(recipe), "test_accuracy": accuracy,
                                                    "numerics": numerics})
    partial.replace(path)
    return model
