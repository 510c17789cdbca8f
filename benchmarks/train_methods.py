"""Training-time OOD methods on the offline Fashion-MNIST protocol, next to cross-entropy + MSP.

Every method trains the same timm architecture with the same recipe (optimiser,
learning rate, schedule, epochs, images, augmentation, seed); what differs is
its head, its loss, and whether it sees the auxiliary outlier photos (which are
disjoint from every test OOD set). Each trained model is evaluated with the
detectors its paper uses on the benchmark's test OOD sets, all unseen, and the
seeds' qualitative claims (BENCHMARK.md) are checked against the numbers.

Methods are recipes in one registry, :data:`METHODS` (name -> :class:`Method`):
a head kind for ``training.replace_head``, a loss factory, whether auxiliary
outliers are interleaved (or an ``OutlierSource`` built over them), or a
custom training function, plus the detectors to evaluate. Add one with
:func:`register`.

Usage::

    python benchmarks/train_methods.py                         # every method (about 80 minutes on 2 shared cores)
    python benchmarks/train_methods.py --methods ce,isomax      # some; merged into the recorded JSON
    python benchmarks/train_methods.py --fast --out /tmp/tm     # smoke run: tiny model, few images

Trained models are cached as checkpoints under ``$TIMM_OOD_CACHE_DIR/models``
(keyed by method settings and recipe), so a rerun only evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timm_ood import training
from timm_ood.data import Benchmark, load_benchmark, make_loader
from timm_ood.evaluation import evaluate
from timm_ood.evaluation.evaluate import DetectorSpec
from timm_ood.evaluation.results import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
ODIN = ("odin", {"temperature": 1000.0, "epsilon": 0.0014})  # ODIN's chosen values; not tuned on test OOD
METRICS = {"fpr_at_tpr": "FPR@95TPR ↓", "auroc": "AUROC ↑", "detection_accuracy": "Det. acc. ↑"}


# -- the recipe every method shares --------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How every method's classifier is trained and evaluated (the same for all of them).

    Attributes:
        architecture: the timm model, created for 28x28 grey Fashion-MNIST.
        train_images: first N training images after a seeded shuffle (None = all 60,000).
        epochs / batch_size / optimizer / lr / weight_decay / schedule / warmup_epochs / augment / seed:
            as ``training.fit``.
        outlier_images: size of the auxiliary photo set (methods that train with outliers).
        eval_images: at most this many images per evaluation set (None = all).
    """

    architecture: str = "test_resnet"
    train_images: int | None = 20_000
    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.1
    augment: bool = True
    seed: int = 0
    outlier_images: int = 50_000
    eval_images: int | None = 2_000

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def fit_kwargs(self) -> dict[str, Any]:
        """The classifier settings, as ``training.fit`` / ``training.fit_joint_confidence`` take them."""
        return {"epochs": self.epochs, "optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay,
                "schedule": self.schedule, "warmup_epochs": self.warmup_epochs, "augment": self.augment,
                "seed": self.seed}


RECIPE = Recipe()
FAST_RECIPE = Recipe(architecture="test_resnet", train_images=2000, batch_size=64, lr=0.05, outlier_images=2000,
                     eval_images=300)


@dataclass
class TrainContext:
    """What a method's training sees: the recipe, the benchmark and loaders made for the model."""

    recipe: Recipe
    bench: Benchmark
    train_data: Any
    model: nn.Module

    def train_loader(self):
        return make_loader(self.train_data, self.model, batch_size=self.recipe.batch_size, shuffle=True,
                           seed=self.recipe.seed, drop_last=True, name="fashion-mnist/train")

    def outlier_loader(self):
        """The auxiliary photos (disjoint from the test OOD sets), shuffled, one batch per ID batch."""
        outliers = self.bench.outliers(size=self.recipe.outlier_images)
        return make_loader(outliers, self.model, batch_size=self.recipe.batch_size, shuffle=True,
                           seed=self.recipe.seed + 1, drop_last=True, name="aux-photos")


# -- the methods ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One training-time method as a recipe.

    Attributes:
        name: the registry key (``--methods``).
        title: the row label in the report.
        paper: citation and equation.
        detectors: what to evaluate the trained model with (the paper's detectors).
        settings: the method's hyperparameters (recorded, and part of the checkpoint key).
        head: ``training.replace_head`` kind, or None for the model's linear classifier.
        loss: ``settings -> loss module`` for ``training.fit`` (None = cross-entropy).
        outliers: interleave the auxiliary photos, one batch per step.
        outlier_source: ``(outlier loader, settings) -> OutlierSource`` (samplers such as GReg+'s);
            implies ``outliers``.
        train: ``(model, context, settings) -> None``, a custom trainer replacing ``training.fit``.
        uses_ood_data: says in the report whether the method saw (auxiliary) OOD images.
    """

    name: str
    title: str
    paper: str
    detectors: tuple[DetectorSpec, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    head: str | None = None
    loss: Callable[[Mapping[str, Any]], nn.Module] | None = None
    outliers: bool = False
    outlier_source: Callable[[Any, Mapping[str, Any]], training.OutlierSource] | None = None
    train: Callable[[nn.Module, TrainContext, Mapping[str, Any]], None] | None = None
    uses_ood_data: str = "none"

    def key(self) -> str:
        described = {"name": self.name, "head": self.head, "settings": dict(self.settings),
                     "outliers": self.outliers or self.outlier_source is not None}
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:12]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to :data:`METHODS` (a name may be registered once)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _train_joint_confidence(model: nn.Module, context: TrainContext, settings: Mapping[str, Any]) -> None:
    training.fit_joint_confidence(model, context.train_loader(), beta=settings["beta"],
                                  generator_loss=settings["generator_loss"], progress=False,
                                  **context.recipe.fit_kwargs())


register(Method(
    "ce", "Cross-entropy (SoftMax)", "Hendrycks & Gimpel 2017 (MSP); Liang et al. 2018 (ODIN)",
    detectors=("msp", "entropic", ODIN),
))
register(Method(
    "isomax", "IsoMax", "Macêdo et al., arXiv 1908.05569, Eq. 4 (loss), Eq. 6 (entropic score)",
    detectors=("entropic", "msp"), settings={"entropic_scale": 10.0}, head="isomax",
    loss=lambda s: training.IsoMaxLoss(entropic_scale=s["entropic_scale"]),
))
register(Method(
    "oe", "Outlier exposure", "Hendrycks, Mazeika & Dietterich, ICLR 2019, Eq. 1",
    detectors=("msp",), settings={"lam": 0.5}, loss=lambda s: training.OutlierExposureLoss(lam=s["lam"]),
    outliers=True, uses_ood_data="auxiliary photos",
))
register(Method(
    "confidence", "Confidence loss", "Lee, Lee, Lee & Shin, ICLR 2018, Eq. 1",
    detectors=("msp", ODIN), settings={"beta": 1.0}, loss=lambda s: training.ConfidenceLoss(beta=s["beta"]),
    outliers=True, uses_ood_data="auxiliary photos",
))
register(Method(
    "joint-confidence", "Joint confidence loss + GAN", "Lee, Lee, Lee & Shin, ICLR 2018, Eq. 4, Algorithm 1",
    detectors=("msp", ODIN), settings={"beta": 1.0, "generator_loss": "paper", "gan": "DCGAN width 64, Adam 2e-4"},
    train=_train_joint_confidence, uses_ood_data="none (GAN samples)",
))


# energy loss, GReg, GReg+ (issue 7). As in the GReg paper's comparison (CIFAR energy loss and GReg, ImageNet
# GReg+), each fine-tunes a trained classifier: the cross-entropy baseline's model (the `ce` method, trained with
# the shared recipe or loaded from the cache), for the recipe's epochs with its optimiser and schedule but at the
# papers' fine-tuning learning rate, 0.001 (Liu et al.'s and the GReg code's), without warm-up.
# Margins: the authors' defaults (m_in = -25, m_out = -7) are absolute energies of their CIFAR networks; this
# recipe's small model has energies near -4 (ID and auxiliary photos alike), so those margins swamp the
# cross-entropy (accuracy falls to 20-28%; docs/training.md). Liu et al. place the margins relative to
# the pre-trained model's energies; here, by a fixed rule on training data only: m_in = the 10th percentile of
# the ce model's energies on ID training images, m_out = the 90th percentile on the auxiliary photos (the
# values are logged and recorded). Weights and scaling: the GReg authors' code defaults.
GREG_SETTINGS = {"energy_weight": 0.1, "gradient_weight": 1.0, "gradient_scaling": "batch-mean"}
MARGIN_RULE = {"m_in": "10th percentile of the ce model's ID-train energies",
               "m_out": "90th percentile of its auxiliary-photo energies"}
FINE_TUNING = {"initialisation": "the ce method's model", "fine_tune_lr": 0.001}


def _energies(model: nn.Module, loader: Any, limit: int = 4096) -> torch.Tensor:
    """``-logsumexp(logits)`` of up to ``limit`` images of ``loader`` (eval mode, no grad)."""
    model.eval()
    energies, seen = [], 0
    with torch.inference_mode():
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            energies.append(-torch.logsumexp(model(images).double(), dim=1))
            seen += len(images)
            if seen >= limit:
                break
    return torch.cat(energies)


def _margins_from(model: nn.Module, context: TrainContext) -> dict[str, float]:
    """The rule of :data:`MARGIN_RULE` on the starting model; m_in < m_out is required by the loss."""
    m_in = float(torch.quantile(_energies(model, context.train_loader()), 0.1))
    m_out = float(torch.quantile(_energies(model, context.outlier_loader()), 0.9))
    if not m_in < m_out:
        raise ValueError(f"the margin rule gave m_in = {m_in:.2f} >= m_out = {m_out:.2f}")
    _log(f"margins from the ce model: m_in = {m_in:.2f}, m_out = {m_out:.2f}")
    return {"m_in": round(m_in, 2), "m_out": round(m_out, 2)}


def _fine_tuned_from_ce(
    loss: Callable[[Mapping[str, Any]], nn.Module],
    outlier_source: Callable[[Any, Mapping[str, Any]], training.OutlierSource] | None = None,
) -> Callable[[nn.Module, TrainContext, Mapping[str, Any]], None]:
    """A trainer that starts from the ``ce`` method's model and fine-tunes it with ``loss`` and auxiliary outliers.

    ``loss`` receives the method's settings plus the margins of :func:`_margins_from`.
    """

    def train(model: nn.Module, context: TrainContext, settings: Mapping[str, Any]) -> None:
        from timm_ood.data.cache import cache_dir

        base, _ = train_method(METHODS["ce"], context.recipe, context.bench, cache_dir=cache_dir() / "models")
        model.load_state_dict(base.state_dict())
        settings = {**settings, **_margins_from(model, context)}
        outliers = context.outlier_loader()
        if outlier_source is not None:
            outliers = outlier_source(outliers, settings)
        fit_kwargs = {**context.recipe.fit_kwargs(), "warmup_epochs": 0.0, "lr": settings["fine_tune_lr"]}
        training.fit(model, context.train_loader(), loss=loss(settings), outliers=outliers, progress=False,
                     **fit_kwargs)

    return train


register(Method(
    "energy", "Energy loss (fine-tuned)", "Liu et al., NeurIPS 2020, Eq. 6 (GReg Eq. 1)",
    detectors=("energy", "msp"),
    settings={**MARGIN_RULE, "energy_weight": GREG_SETTINGS["energy_weight"], **FINE_TUNING},
    train=_fine_tuned_from_ce(lambda s: training.EnergyLoss(s["m_in"], s["m_out"], s["energy_weight"])),
    uses_ood_data="auxiliary photos",
))
register(Method(
    "greg", "GReg (fine-tuned)", "Sharifi et al., ECCV 2024, Eq. 1-3",
    detectors=("energy", "msp"), settings={**MARGIN_RULE, **GREG_SETTINGS, **FINE_TUNING},
    train=_fine_tuned_from_ce(lambda s: training.GRegObjective(**{k: s[k] for k in ("m_in", "m_out", *GREG_SETTINGS)})),
    uses_ood_data="auxiliary photos",
))
register(Method(
    "greg-plus", "GReg+ (fine-tuned, energy-based cluster sampling)", "Sharifi et al., ECCV 2024, Eq. 1-3, Algorithm 1",
    detectors=("energy", "msp"),
    settings={**MARGIN_RULE, **GREG_SETTINGS, **FINE_TUNING, "pool_ratio": 6.0, "kmeans_iterations": 10},
    train=_fine_tuned_from_ce(
        lambda s: training.GRegObjective(**{k: s[k] for k in ("m_in", "m_out", *GREG_SETTINGS)}),
        lambda loader, s: training.EnergyClusterSampler(loader, pool_ratio=s["pool_ratio"],
                                                        kmeans_iterations=s["kmeans_iterations"])),
    uses_ood_data="auxiliary photos (2 per ID image, picked from 6 per ID image)",
))


# BIN, BINC, VIB, VIBY (issue 7; Sreeramdas & Sarawagi, Sec. 3, Eq. 3-7), the paper's hyperparameters (Sec. 5.3).
# The heads' widths (BINC's z layer, the VIB/VIBY latent) are the head kinds' defaults, z = 64.
register(Method(
    "bin", "BIN (K sigmoids)", "Sreeramdas & Sarawagi, Sec. 3, Eq. 3 (corrected: class-weighted BCE)",
    detectors=("bin",), settings={"zeta": 0.05}, head="bin", loss=lambda s: training.BINLoss(zeta=s["zeta"]),
))
register(Method(
    "binc", "BINC (z layer, softmax + sigmoid heads, MMCE_w)", "Sreeramdas & Sarawagi, Sec. 3, Eq. 4",
    detectors=("bin", "msp"), settings={"zeta": 0.05, "mmce_weight": 0.5, "embedding_dim": 64}, head="binc",
    loss=lambda s: training.BINCLoss(zeta=s["zeta"], mmce_weight=s["mmce_weight"]),
))
register(Method(
    "vib", "VIB (one learned prior)", "Alemi et al. 2017; Sreeramdas & Sarawagi, Eq. 5",
    detectors=("vib", "msp"), settings={"beta": 0.005, "latent_dim": 64}, head="vib",
    loss=lambda s: training.VIBLoss(beta=s["beta"]),
))
register(Method(
    "viby", "VIBY (a learned prior per class)", "Sreeramdas & Sarawagi, Eq. 6-7",
    detectors=("viby-1", "viby-2", "msp"), settings={"beta": 0.01, "latent_dim": 64}, head="viby",
    loss=lambda s: training.VIBYLoss(beta=s["beta"]),
))

# -- training and evaluation ------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _train_data(bench: Benchmark, recipe: Recipe):
    data = bench.id_train
    if recipe.train_images is not None and len(data) > recipe.train_images:
        data = data.shuffle(seed=recipe.seed).select(range(recipe.train_images))
    return data


def train_method(method: Method, recipe: Recipe, bench: Benchmark, *, cache_dir: Path, retrain: bool = False
                 ) -> tuple[nn.Module, float]:
    """The method's trained model (from the checkpoint cache, or trained now) and its training seconds."""
    import timm

    path = cache_dir / f"train-methods-{method.name}-{method.key()}-{recipe.architecture}-{recipe.key()}.safetensors"
    if path.exists() and not retrain:
        _log(f"{method.name}: cached model {path}")
        return training.load_checkpoint(path), float(training.read_checkpoint_metadata(path)["metadata"]["seconds"])
    torch.manual_seed(recipe.seed)
    model = timm.create_model(recipe.architecture, num_classes=bench.num_classes, in_chans=1,
                              pretrained_cfg_overlay=bench.model_overlay())
    if method.head is not None:
        training.replace_head(model, method.head)
    context = TrainContext(recipe, bench, _train_data(bench, recipe), model)
    _log(f"{method.name}: training {recipe.architecture} on {len(context.train_data)} images")
    start = time.perf_counter()
    if method.train is not None:
        method.train(model, context, method.settings)
    else:
        outliers = None
        if method.outlier_source is not None:
            outliers = method.outlier_source(context.outlier_loader(), method.settings)
        elif method.outliers:
            outliers = context.outlier_loader()
        loss = None if method.loss is None else method.loss(method.settings)
        training.fit(model, context.train_loader(), loss=loss, outliers=outliers, progress=False,
                     **recipe.fit_kwargs())
    seconds = time.perf_counter() - start
    _log(f"{method.name}: trained in {seconds:.0f} s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    training.save_checkpoint(model, partial, metadata={"method": method.name, "settings": dict(method.settings),
                                                       "recipe": dataclasses.asdict(recipe), "seconds": seconds})
    partial.replace(path)
    return model.eval(), seconds


def run_method(method: Method, recipe: Recipe, bench: Benchmark, *, cache_dir: Path, retrain: bool) -> dict[str, Any]:
    """Train (or load) and evaluate one method; a JSON-ready record."""
    model, seconds = train_method(method, recipe, bench, cache_dir=cache_dir, retrain=retrain)
    _log(f"{method.name}: evaluating {[d if isinstance(d, str) else d[0] for d in method.detectors]}")
    start = time.perf_counter()
    results = evaluate(model, list(method.detectors), bench, batch_size=512, max_images=recipe.eval_images,
                       progress=False)
    _log(f"{method.name}: evaluated in {time.perf_counter() - start:.0f} s, accuracy {100 * results.accuracy:.2f}%")
    return {
        "title": method.title,
        "paper": method.paper,
        "settings": dict(method.settings),
        "head": method.head or "linear",
        "uses_ood_data": method.uses_ood_data,
        "train_seconds": seconds,
        "eval_seconds": time.perf_counter() - start,
        "accuracy": results.accuracy,
        "detectors": results.detectors,
        "ood_sets": results.ood_sets,
        "sizes": results.settings["sizes"],
        "metrics": results.metrics,
    }


# -- the claims ------------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def compare(records: Mapping[str, Any], method: tuple[str, str], baseline: tuple[str, str]) -> dict[str, Any]:
    """Average FPR@95TPR / AUROC of ``(method, detector)`` against ``baseline``, and per-set wins."""
    (m, d), (bm, bd) = method, baseline
    ours, theirs = records[m]["metrics"][d], records[bm]["metrics"][bd]
    sets = records[m]["ood_sets"]
    return {
        "fpr": (ours["average"]["fpr_at_tpr"], theirs["average"]["fpr_at_tpr"]),
        "auroc": (ours["average"]["auroc"], theirs["average"]["auroc"]),
        "fpr_wins": sum(ours[s]["fpr_at_tpr"] < theirs[s]["fpr_at_tpr"] for s in sets),
        "auroc_wins": sum(ours[s]["auroc"] > theirs[s]["auroc"] for s in sets),
        "sets": len(sets),
        "accuracy": (records[m]["accuracy"], records[bm]["accuracy"]),
    }


def _beats(c: Mapping[str, Any]) -> bool:
    """Lower average FPR@95TPR, higher average AUROC, and higher AUROC on most sets."""
    return c["fpr"][0] < c["fpr"][1] and c["auroc"][0] > c["auroc"][1] and 2 * c["auroc_wins"] > c["sets"]


def _describe(c: Mapping[str, Any], ours: str, theirs: str) -> str:
    return (f"{ours}: average FPR@95TPR {_pct(c['fpr'][0])}% vs {_pct(c['fpr'][1])}% for {theirs} "
            f"(lower on {c['fpr_wins']}/{c['sets']} sets), AUROC {_pct(c['auroc'][0])} vs {_pct(c['auroc'][1])} "
            f"(higher on {c['auroc_wins']}/{c['sets']})")


#: (claim, source, method, baseline, largest accuracy loss in points that still counts as "the same", or None)
CLAIMS: tuple[tuple[str, str, tuple[str, str], tuple[str, str], float | None], ...] = (
    ("IsoMax + entropic score beats SoftMax + max-softmax without OOD data, at about the same accuracy",
     "IsoMax Table 2, Table 4", ("isomax", "entropic"), ("ce", "msp"), 1.0),
    ("Confidence loss with seen OOD data beats cross-entropy on unseen OOD sets",
     "Lee et al. Fig. 4, Table 1", ("confidence", "msp"), ("ce", "msp"), None),
    ("The joint GAN version, without OOD data, beats cross-entropy on unseen OOD sets",
     "Lee et al. Fig. 4, Table 5", ("joint-confidence", "msp"), ("ce", "msp"), None),
)
#: further comparisons the papers make, reported the same way
FURTHER: tuple[tuple[str, str, tuple[str, str], tuple[str, str]], ...] = (
    ("IsoMax + entropic score beats ODIN on a SoftMax model (without ODIN's validation)", "IsoMax Table 3",
     ("isomax", "entropic"), ("ce", "odin")),
    ("The joint GAN version beats the confidence loss with explicit OOD data", "Lee et al. Fig. 4",
     ("joint-confidence", "msp"), ("confidence", "msp")),
    ("ODIN adds to the confidence loss", "Lee et al. Fig. 7, Table 6", ("confidence", "odin"), ("confidence", "msp")),
    ("ODIN adds to the joint confidence loss", "Lee et al. Fig. 7", ("joint-confidence", "odin"),
     ("joint-confidence", "msp")),
    ("Outlier exposure beats cross-entropy on unseen OOD sets", "Hendrycks et al. 2019", ("oe", "msp"), ("ce", "msp")),
)

# energy loss, GReg, GReg+ (issue 7)
CLAIMS = (
    *CLAIMS,
    ("GReg beats plain energy-loss training", "GReg Tables 1-3", ("greg", "energy"), ("energy", "energy"), None),
    ("GReg+ sampling helps where the auxiliary set is large", "GReg Table 2, Table 5",
     ("greg-plus", "energy"), ("greg", "energy"), None),
)
FURTHER = (
    *FURTHER,
    ("The energy loss with seen OOD data beats cross-entropy + MSP on unseen OOD sets", "GReg Tables 1-3",
     ("energy", "energy"), ("ce", "msp")),
    ("GReg beats cross-entropy + MSP on unseen OOD sets", "GReg Tables 1-3", ("greg", "energy"), ("ce", "msp")),
)


# BIN, BINC, VIB, VIBY (issue 7): where the survey (Table 1, Sec. 6-7) puts them relative to ODIN and each other
CLAIMS = (
    *CLAIMS,
    ("ODIN on a cross-entropy model beats BIN", "Sreeramdas & Sarawagi Table 1, Sec. 7",
     ("ce", "odin"), ("bin", "bin"), None),
    ("ODIN on a cross-entropy model beats BINC", "Sreeramdas & Sarawagi Table 1, Sec. 7",
     ("ce", "odin"), ("binc", "bin"), None),
    ("ODIN on a cross-entropy model beats VIB", "Sreeramdas & Sarawagi Table 1, Sec. 7",
     ("ce", "odin"), ("vib", "vib"), None),
    ("ODIN on a cross-entropy model beats VIBY (r_II)", "Sreeramdas & Sarawagi Table 1, Sec. 7",
     ("ce", "odin"), ("viby", "viby-2"), None),
    ("BINC improves slightly on BIN", "Sreeramdas & Sarawagi Table 1, Sec. 6", ("binc", "bin"), ("bin", "bin"), None),
    ("VIBY beats VIB", "Sreeramdas & Sarawagi Table 1, Sec. 6", ("viby", "viby-2"), ("vib", "vib"), None),
)
FURTHER = (
    *FURTHER,
    ("VIBY's r_II beats its r_I", "Sreeramdas & Sarawagi Table 1, Sec. 6", ("viby", "viby-2"), ("viby", "viby-1")),
    ("BIN beats cross-entropy + MSP", "Sreeramdas & Sarawagi Table 1", ("bin", "bin"), ("ce", "msp")),
    ("BINC beats cross-entropy + MSP", "Sreeramdas & Sarawagi Table 1", ("binc", "bin"), ("ce", "msp")),
    ("VIB beats cross-entropy + MSP", "Sreeramdas & Sarawagi Table 1", ("vib", "vib"), ("ce", "msp")),
    ("VIBY (r_II) beats cross-entropy + MSP", "Sreeramdas & Sarawagi Table 1", ("viby", "viby-2"), ("ce", "msp")),
)


def _available(records: Mapping[str, Any], *pairs: tuple[str, str]) -> bool:
    return all(m in records and d in records[m]["metrics"] for m, d in pairs)


def check_claims(records: Mapping[str, Any]) -> list[list[str]]:
    """Rows ``[claim, source, verdict, reason]`` for the seeds' claims and the further comparisons."""
    rows = []
    for claim, source, ours, theirs, tolerance in CLAIMS:
        if not _available(records, ours, theirs):
            rows.append([claim, source, "not run", "a method it needs was not run"])
            continue
        c = compare(records, ours, theirs)
        reason = _describe(c, f"{ours[0]}+{ours[1]}", f"{theirs[0]}+{theirs[1]}")
        held = _beats(c)
        delta = 100 * (c["accuracy"][0] - c["accuracy"][1])
        reason += f"; ID accuracy {100 * c['accuracy'][0]:.2f}% vs {100 * c['accuracy'][1]:.2f}% ({delta:+.2f} points"
        if tolerance is not None:
            kept = delta >= -tolerance
            reason += f", {'no' if kept else 'a'} loss of more than {tolerance:g} point"
            held = held and kept
        reason += ")"
        rows.append([claim, source, "**held**" if held else "**not held**", reason])
    for claim, source, ours, theirs in FURTHER:
        if not _available(records, ours, theirs):
            continue
        c = compare(records, ours, theirs)
        rows.append([claim, source, "held" if _beats(c) else "not held",
                     _describe(c, f"{ours[0]}+{ours[1]}", f"{theirs[0]}+{theirs[1]}")])
    return rows


# -- the report ---------------------------------------------------------------------------------------------
def _label(detector: str) -> str:
    return "odin" if detector.startswith("odin") else detector


def render(state: Mapping[str, Any]) -> str:
    """The markdown report of every recorded method."""
    recipe, records = state["recipe"], state["methods"]
    order = [m for m in METHODS if m in records] + [m for m in records if m not in METHODS]
    first = records[order[0]]
    sets = first["ood_sets"]
    lines = ["# Training-time methods on Fashion-MNIST (offline protocol)", ""]
    lines += ["Made by:", "", "```", *state["commands"], "```", ""]
    lines += [f"Machine: {state['machine']}", ""]
    lines += [
        "Protocol: ID = Fashion-MNIST (train: the images below; test: "
        f"{first['sizes'].get('id', '?')} images, the 1,000 tuning images held out and unused). OOD test sets, "
        "unseen by every method: " + ", ".join(f"{s} ({first['sizes'][s]})" for s in sets) + ". "
        f"Methods marked as using auxiliary photos train with {recipe['outlier_images']:,} crops and downsampled "
        "windows of photos disjoint from the test photos (`aux-photos`). Nothing is tuned on the test OOD sets: "
        "each method runs with its paper's default hyperparameters, ODIN with its paper's T = 1000, "
        "epsilon = 0.0014. Metrics read ID as positive (the seeds'); values in %.",
        "",
        "Every method trains the **same recipe** (the cross-entropy baseline included); only its head, loss and "
        "data differ. The joint GAN method additionally trains a DCGAN generator and discriminator (Adam 2e-4, "
        "betas 0.5/0.999, on the same schedule).",
        "",
        markdown_table(["setting", "value"], [[k, f"`{v}`"] for k, v in recipe.items()]),
        "",
        "## Methods",
        "",
        markdown_table(
            ["method", "paper", "head", "settings", "OOD data in training", "detectors", "train s", "eval s"],
            [[records[m]["title"], records[m]["paper"], records[m]["head"],
              ", ".join(f"{k}={v}" for k, v in records[m]["settings"].items()) or "-", records[m]["uses_ood_data"],
              ", ".join(_label(d) for d in records[m]["detectors"]), f"{records[m]['train_seconds']:.0f}",
              f"{records[m]['eval_seconds']:.0f}"] for m in order],
        ),
        "",
        "## Summary (averages over the OOD sets)",
        "",
    ]
    rows = []
    for m in order:
        for d in records[m]["detectors"]:
            avg = records[m]["metrics"][d]["average"]
            rows.append([f"{records[m]['title']}", _label(d), f"{100 * records[m]['accuracy']:.2f}",
                         *(_pct(avg[k]) for k in METRICS)])
    lines += [markdown_table(["method", "detector", "ID acc. ↑", *METRICS.values()], rows), ""]
    for key, title in METRICS.items():
        lines += [f"## {title} per OOD set", ""]
        rows = [[records[m]["title"], _label(d), *(_pct(records[m]["metrics"][d][s][key]) for s in [*sets, "average"])]
                for m in order for d in records[m]["detectors"]]
        lines += [markdown_table(["method", "detector", *sets, "**average**"], rows), ""]
    lines += ["## The seeds' claims", "",
              markdown_table(["claim", "source", "verdict", "measured"], check_claims(records)), ""]
    lines += ["A claim is held when the method's average FPR@95TPR is lower, its average AUROC higher, and its "
              "AUROC higher on most OOD sets than the baseline's (and, for IsoMax, its ID accuracy at most 1 point "
              "lower: the paper's Table 4 differences are within 0.5 point either way).",
              ""]
    return "\n".join(lines)


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {sys.version.split()[0]}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)} (default all)")
    parser.add_argument("--fast", action="store_true", help="smoke run: test_resnet, 2,000 images, small sets")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_methods.md", help="the markdown report")
    parser.add_argument("--retrain", action="store_true", help="ignore cached checkpoints")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    recipe = FAST_RECIPE if args.fast else RECIPE
    command = "python benchmarks/train_methods.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    from timm_ood.data.cache import cache_dir

    bench = load_benchmark("fashion-mnist")
    json_path = args.out.with_suffix(".json")
    state: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "recipe_key": recipe.key(), "methods": {},
                             "commands": []}
    if json_path.exists():
        previous = json.loads(json_path.read_text())
        if previous.get("recipe_key") == recipe.key():
            state = previous
        else:
            _log(f"{json_path} holds another recipe: starting a new record")
    torch.manual_seed(recipe.seed)
    for name in names:
        state["methods"][name] = run_method(METHODS[name], recipe, bench, cache_dir=cache_dir() / "models",
                                            retrain=args.retrain)
        state["commands"] = [*[c for c in state["commands"] if c != command.strip()], command.strip()]
        state["machine"] = _machine()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(state, indent=1) + "\n")
        args.out.write_text(render(state))
    print(render(state))


if __name__ == "__main__":
    main()
