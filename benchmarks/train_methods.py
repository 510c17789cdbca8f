"""Training-time OOD methods on the offline Fashion-MNIST protocol, next to cross-entropy + MSP, over seeds.

Every method trains the same timm architecture with the same recipe (optimiser,
learning rate, schedule, epochs, images, augmentation, seed); what differs is
its head, its loss, and whether it sees the auxiliary outlier photos. Each
trained model is evaluated with the detectors its paper uses on the benchmark's
test OOD sets over several training seeds, and the papers' claims are judged by
a stated rule (:mod:`timm_ood.evaluation.verdicts`: a paired t-interval over
seeds). ODIN and Baseline+T are also tuned as ODIN tunes them (per OOD set on
1,000 + 1,000 held-out images, and tune-on-one / test-on-the-others, ODIN
Appendix H). The auxiliary photos are crops and downsampled windows of photos
that no test set uses, but ``natural-crop`` and ``natural-resize`` are made the
same way, so claims about outlier-trained methods are judged on the other sets.

Beyond each method at its default, the benchmark runs each paper's own recipe
as a variant (reported apart): IsoMax's entropic scale 1/3/10/30 and Xavier vs
zero prototypes; the joint GAN with the authors' code's optimiser, generator
loss and beta; GReg with Eq. 3's per-sample scaling, and GReg with as many
random outliers as GReg+ picks; VIB and VIBY trained 5x longer. It measures
GReg's mechanism (Fig. 3: the energy's input-gradient norm during fine-tuning)
and why VIB/VIBY rank some sets inverted (the KL score's terms per set).

Methods are recipes in one registry, :data:`METHODS` (name -> :class:`Method`);
add one with :func:`register`.

Usage::

    python benchmarks/train_methods.py                               # every method, seeds 0, 1, 2
    python benchmarks/train_methods.py --methods ce,isomax --seeds 0  # some; merged into the recorded JSON
    python benchmarks/train_methods.py --fast --out /tmp/tm           # smoke run: tiny model, few images
    python benchmarks/train_methods.py --report-only                 # rewrite the report from the JSON

Resumable and runnable piecewise: each finished (seed, method) is merged into
the JSON next to the report under a file lock, so several processes can run
different methods or seeds at once, and a rerun skips what is recorded with the
same settings (``--rerun`` redoes it). Trained models are cached as checkpoints
under ``$TIMM_OOD_CACHE_DIR/models``, keyed by method settings and recipe, so a
rerun only evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timm_ood import training
from timm_ood.batches import iter_batches
from timm_ood.data import Benchmark, load_benchmark, make_loader
from timm_ood.evaluation import evaluate, tune
from timm_ood.evaluation.evaluate import DetectorSpec
from timm_ood.evaluation.results import markdown_table
from timm_ood.evaluation.seeds import mean_sd
from timm_ood.evaluation.verdicts import VERDICT_RULE, paired_verdict

RESULTS = Path(__file__).resolve().parent / "results"
ODIN = ("odin", {"temperature": 1000.0, "epsilon": 0.0014})  # ODIN's chosen values; not tuned on test OOD
METRICS = {"fpr_at_tpr": "FPR@95TPR ↓", "auroc": "AUROC ↑", "detection_accuracy": "Det. acc. ↑"}
#: the test OOD sets made by the same crop / downsample procedure as the auxiliary outliers: not "unseen" in Lee et
#: al.'s sense, so outlier-trained methods are judged on the others ("unlike the auxiliary set")
LIKE_AUX = ("natural-crop", "natural-resize")
#: detectors tuned as ODIN tunes them, on the methods that report them
TUNED = ("odin", "temperature")
SEEDS = (0, 1, 2)


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
    epochs: int = 3
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
FAST_RECIPE = Recipe(architecture="test_resnet", train_images=2000, epochs=1, batch_size=64, lr=0.05,
                     outlier_images=2000, eval_images=300)


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

    def outlier_loader(self, per_id_image: int = 1):
        """The auxiliary photos (disjoint from the test OOD sets), shuffled, one batch of ``per_id_image`` times the
        ID batch size per ID batch."""
        outliers = self.bench.outliers(size=self.recipe.outlier_images)
        return make_loader(outliers, self.model, batch_size=per_id_image * self.recipe.batch_size, shuffle=True,
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
        head_options: the head's keyword arguments (e.g. IsoMax's ``prototype_init``).
        loss: ``settings -> loss module`` for ``training.fit`` (None = cross-entropy).
        outliers: interleave the auxiliary photos, one batch per step.
        outlier_source: ``(outlier loader, settings) -> OutlierSource`` (samplers such as GReg+'s);
            implies ``outliers``.
        train: ``(model, context, settings) -> measurements or None``, a custom trainer replacing
            ``training.fit``; what it measured (JSON-ready) is kept with the checkpoint and the record.
        uses_ood_data: says in the report whether the method saw (auxiliary) OOD images.
        variant_of: for a paper's own recipe or a sweep point, the method it varies (reported apart).
        tuned: tune ODIN and Baseline+T on this model (default: when ODIN is among its detectors).
    """

    name: str
    title: str
    paper: str
    detectors: tuple[DetectorSpec, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    head: str | None = None
    head_options: Mapping[str, Any] = field(default_factory=dict)
    loss: Callable[[Mapping[str, Any]], nn.Module] | None = None
    outliers: bool = False
    outlier_source: Callable[[Any, Mapping[str, Any]], training.OutlierSource] | None = None
    train: Callable[[nn.Module, TrainContext, Mapping[str, Any]], dict[str, Any] | None] | None = None
    uses_ood_data: str = "none"
    variant_of: str | None = None
    tuned: bool | None = None

    @property
    def tunes(self) -> bool:
        """Whether ODIN and Baseline+T are tuned on this method's model."""
        return self.tuned if self.tuned is not None else any(_name(d) == "odin" for d in self.detectors)

    def key(self) -> str:
        described = {"name": self.name, "head": self.head, "settings": dict(self.settings),
                     "outliers": self.outliers or self.outlier_source is not None}
        if self.head_options:
            described["head_options"] = dict(self.head_options)
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:12]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to :data:`METHODS` (a name may be registered once)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


AUTHORS_CLASSIFIER = "Adam 2e-4, x0.1 at 60%, no weight decay (the authors' code)"


def _train_joint_confidence(model: nn.Module, context: TrainContext, settings: Mapping[str, Any]) -> None:
    """Algorithm 1 with the shared recipe's classifier optimiser, or (``classifier=AUTHORS_CLASSIFIER``) with the
    authors' code's: Adam 2e-4, x0.1 at 60% of training, no weight decay (``fit_joint_confidence``'s defaults)."""
    fit_kwargs = context.recipe.fit_kwargs()
    if settings.get("classifier") == AUTHORS_CLASSIFIER:
        fit_kwargs = {k: fit_kwargs[k] for k in ("epochs", "augment", "seed")}
    training.fit_joint_confidence(model, context.train_loader(), beta=settings["beta"],
                                  generator_loss=settings["generator_loss"], progress=False, **fit_kwargs)


register(Method(
    "ce", "Cross-entropy (SoftMax)", "Hendrycks & Gimpel 2017 (MSP); Liang et al. 2018 (ODIN)",
    detectors=("msp", "entropic", ODIN),
))
ISOMAX_PAPER = "Macêdo et al., arXiv 1908.05569, Eq. 4 (loss), Eq. 6 (entropic score)"
register(Method(
    "isomax", "IsoMax", ISOMAX_PAPER,
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
    train=_train_joint_confidence, uses_ood_data="none (GAN samples)", tuned=False,
))


# energy loss, GReg, GReg+ (issue 7). As in the GReg paper's comparison (CIFAR energy loss and GReg, ImageNet
# GReg+), each fine-tunes a trained classifier: the cross-entropy baseline's model (the `ce` method, trained with
# the shared recipe or loaded from the cache), for one epoch with the recipe's optimiser and schedule but at the
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
FINE_TUNING = {"initialisation": "the ce method's model", "fine_tune_lr": 0.001, "fine_tune_epochs": 1}


def _image_batches(loader: Any, count: int) -> Iterator[torch.Tensor]:
    """The image batches of ``loader`` until at least ``count`` images have come."""
    seen = 0
    for images, _ in iter_batches(loader):
        yield images
        seen += len(images)
        if seen >= count:
            return


def _energies(model: nn.Module, loader: Any, limit: int = 4096) -> torch.Tensor:
    """The energy ``-logsumexp(logits)`` of the first batches of ``loader`` up to ``limit`` images (eval mode)."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([training.energy_score(model(images).double()) for images in _image_batches(loader, limit)])


def _margins_from(model: nn.Module, context: TrainContext) -> dict[str, float]:
    """The rule of :data:`MARGIN_RULE` on the starting model; m_in < m_out is required by the loss."""
    m_in = float(torch.quantile(_energies(model, context.train_loader()), 0.1))
    m_out = float(torch.quantile(_energies(model, context.outlier_loader()), 0.9))
    if not m_in < m_out:
        raise ValueError(f"the margin rule gave m_in = {m_in:.2f} >= m_out = {m_out:.2f}")
    _log(f"margins from the ce model: m_in = {m_in:.2f}, m_out = {m_out:.2f}")
    return {"m_in": round(m_in, 2), "m_out": round(m_out, 2)}


#: images of each kind (ID training, auxiliary) whose energy input-gradient norms are measured per epoch (GReg Fig. 3)
PROBE_IMAGES = 512


class GradientNormProbe(training.Objective):
    """Runs an objective unchanged and measures, before training and ``per_epoch`` times per epoch, the mean
    input-gradient norm of the energy on fixed ID and auxiliary images (GReg, Sharifi et al. 2024, Fig. 3), the model
    in eval mode. ``norms["epochs"]`` holds when (in epochs) each measurement was taken."""

    def __init__(self, objective: training.Objective, probes: Mapping[str, torch.Tensor], per_epoch: int = 4) -> None:
        super().__init__()
        self.objective = objective
        self.uses_outliers = objective.uses_outliers
        self.probes = dict(probes)
        self.per_epoch = per_epoch
        self.norms: dict[str, list[float]] = {"epochs": [], **{name: [] for name in probes}}
        self._model: list[nn.Module] = []  # not a submodule: the model is fit's
        self._steps = self._steps_per_epoch = 0

    def _measure(self) -> None:
        model = self._model[0]
        device = next(model.parameters()).device
        self.norms["epochs"].append(round(self._steps / self._steps_per_epoch, 3))
        for name, images in self.probes.items():
            self.norms[name].append(float(training.energy_input_gradient_norms(model, images.to(device)).mean()))

    def start(self, model, plan):
        self.objective.start(model, plan)
        self._model[:] = [model]
        self._steps_per_epoch = plan.steps_per_epoch
        self._measure()

    def update(self, model, images, targets):
        interval = max(1, self._steps_per_epoch // self.per_epoch)
        if self._steps % self._steps_per_epoch and self._steps % interval == 0:  # epoch ends: end_epoch measures
            self._measure()
        self._steps += 1
        self.objective.update(model, images, targets)

    def fit_parameters(self):
        return self.objective.fit_parameters()

    def forward(self, model, images, targets, outliers=None):
        return self.objective(model, images, targets, outliers)

    def end_epoch(self, record):
        self._measure()
        return self.objective.end_epoch(record)


def _first_images(loader: Any, count: int) -> torch.Tensor:
    return torch.cat(list(_image_batches(loader, count)))[:count]


def _fine_tuned_from_ce(
    loss: Callable[[Mapping[str, Any]], nn.Module],
    outlier_source: Callable[[Any, Mapping[str, Any]], training.OutlierSource] | None = None,
) -> Callable[[nn.Module, TrainContext, Mapping[str, Any]], dict[str, Any]]:
    """A trainer that starts from the ``ce`` method's model and fine-tunes it with ``loss`` and auxiliary outliers.

    ``loss`` receives the method's settings plus the margins of :func:`_margins_from`; the setting
    ``outliers_per_id_image`` (default 1) sizes the auxiliary batch. Returns the margins and GReg Fig. 3's
    per-epoch gradient norms (:class:`GradientNormProbe`).
    """

    def train(model: nn.Module, context: TrainContext, settings: Mapping[str, Any]) -> dict[str, Any]:
        from timm_ood.data.cache import cache_dir

        base, _, _ = train_method(METHODS["ce"], context.recipe, context.bench, cache_dir=cache_dir() / "models")
        model.load_state_dict(base.state_dict())
        margins = _margins_from(model, context)
        settings = {**settings, **margins}
        outliers = context.outlier_loader(settings.get("outliers_per_id_image", 1))
        probes = {"id": _first_images(context.train_loader(), PROBE_IMAGES),
                  "auxiliary": _first_images(context.outlier_loader(), PROBE_IMAGES)}
        if outlier_source is not None:
            outliers = outlier_source(outliers, settings)
        probe = GradientNormProbe(training.as_objective(loss(settings), with_outliers=True), probes)
        fit_kwargs = {**context.recipe.fit_kwargs(), "warmup_epochs": 0.0, "lr": settings["fine_tune_lr"],
                      "epochs": settings["fine_tune_epochs"]}
        training.fit(model, context.train_loader(), loss=probe, outliers=outliers, progress=False, **fit_kwargs)
        return {"margins": margins, "gradient_norms": probe.norms}

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

# -- each paper's own recipe, and sweeps (issue 15): variants of the methods above, reported apart --------------------
for scale in (1.0, 3.0, 30.0):  # IsoMax Sec. 2.3 / Table 5: the entropic scale E_s; 10 is the default above
    register(Method(
        f"isomax-s{scale:g}", f"IsoMax, entropic scale {scale:g}", ISOMAX_PAPER, detectors=("entropic", "msp"),
        settings={"entropic_scale": scale}, head="isomax",
        loss=lambda s: training.IsoMaxLoss(entropic_scale=s["entropic_scale"]), variant_of="isomax",
    ))
register(Method(
    "isomax-xavier", "IsoMax, Xavier-initialised prototypes", ISOMAX_PAPER + "; Sec. 2.2 (zero initialisation)",
    detectors=("entropic", "msp"), settings={"entropic_scale": 10.0}, head="isomax",
    head_options={"prototype_init": "xavier"},
    loss=lambda s: training.IsoMaxLoss(entropic_scale=s["entropic_scale"]), variant_of="isomax",
))
register(Method(
    "joint-confidence-authors", "Joint confidence loss + GAN, the authors' code's recipe",
    "Lee et al. 2018, Algorithm 1; github.com/alinlab/Confident_classifier (run_joint_confidence.py)",
    detectors=("msp",),
    settings={"beta": 0.1, "generator_loss": "non-saturating", "classifier": AUTHORS_CLASSIFIER,
              "gan": "DCGAN width 64, Adam 2e-4"},
    train=_train_joint_confidence, uses_ood_data="none (GAN samples)", variant_of="joint-confidence",
))
register(Method(
    "greg-per-sample", "GReg, Eq. 3's per-sample gradient scaling", "Sharifi et al., ECCV 2024, Eq. 3 as written",
    detectors=("energy", "msp"), settings={**MARGIN_RULE, **GREG_SETTINGS, "gradient_scaling": "per-sample",
                                           **FINE_TUNING},
    train=_fine_tuned_from_ce(lambda s: training.GRegObjective(**{k: s[k] for k in ("m_in", "m_out", *GREG_SETTINGS)})),
    uses_ood_data="auxiliary photos", variant_of="greg",
))
register(Method(
    "greg-2x", "GReg, 2 random outliers per ID image (GReg+'s count)", "Sharifi et al., ECCV 2024, Eq. 1-3",
    detectors=("energy", "msp"), settings={**MARGIN_RULE, **GREG_SETTINGS, **FINE_TUNING, "outliers_per_id_image": 2},
    train=_fine_tuned_from_ce(lambda s: training.GRegObjective(**{k: s[k] for k in ("m_in", "m_out", *GREG_SETTINGS)})),
    uses_ood_data="auxiliary photos (2 per ID image, random)", variant_of="greg",
))
#: VIB and VIBY trained this many times the recipe's epochs, for their priors to separate
LONG = 5
for name, beta, detectors in (("vib", 0.005, ("vib", "msp")), ("viby", 0.01, ("viby-1", "viby-2", "msp"))):
    register(Method(
        f"{name}-long", f"{name.upper()}, {LONG}x the epochs", METHODS[name].paper, detectors=detectors,
        settings={"beta": beta, "latent_dim": 64, "epochs_factor": LONG}, head=name, loss=METHODS[name].loss,
        variant_of=name,
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
                 ) -> tuple[nn.Module, float, dict[str, Any]]:
    """The method's trained model (from the checkpoint cache, or trained now), its training seconds and what its
    trainer measured (kept in the checkpoint's metadata)."""
    import timm

    path = cache_dir / f"train-methods-{method.name}-{method.key()}-{recipe.architecture}-{recipe.key()}.safetensors"
    if path.exists() and not retrain:
        _log(f"{method.name}: cached model {path}")
        metadata = training.read_checkpoint_metadata(path)["metadata"]
        return training.load_checkpoint(path), float(metadata["seconds"]), metadata.get("measurements", {})
    torch.manual_seed(recipe.seed)
    model = timm.create_model(recipe.architecture, num_classes=bench.num_classes, in_chans=1,
                              pretrained_cfg_overlay=bench.model_overlay())
    if method.head is not None:
        training.replace_head(model, method.head, **method.head_options)
    if "epochs_factor" in method.settings:
        recipe = dataclasses.replace(recipe, epochs=recipe.epochs * method.settings["epochs_factor"])
    context = TrainContext(recipe, bench, _train_data(bench, recipe), model)
    _log(f"{method.name}: training {recipe.architecture} on {len(context.train_data)} images")
    start = time.perf_counter()
    measurements: dict[str, Any] = {}
    if method.train is not None:
        measurements = method.train(model, context, method.settings) or {}
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
                                                       "recipe": dataclasses.asdict(recipe), "seconds": seconds,
                                                       "measurements": measurements})
    partial.replace(path)
    return model.eval(), seconds, measurements


def run_method(method: Method, recipe: Recipe, bench: Benchmark, *, cache_dir: Path, retrain: bool) -> dict[str, Any]:
    """Train (or load) and evaluate one method; a JSON-ready record."""
    model, seconds, measurements = train_method(method, recipe, bench, cache_dir=cache_dir, retrain=retrain)
    _log(f"{method.name}: evaluating {[d if isinstance(d, str) else d[0] for d in method.detectors]}")
    start = time.perf_counter()
    results = evaluate(model, list(method.detectors), bench, batch_size=512, max_images=recipe.eval_images,
                       progress=False)
    _log(f"{method.name}: evaluated in {time.perf_counter() - start:.0f} s, accuracy {100 * results.accuracy:.2f}%")
    metrics, choices = dict(results.metrics), {}
    if method.head in ("vib", "viby"):
        measurements = {**measurements, "bottleneck": bottleneck_measurements(model, bench, recipe)}
    if method.tunes:
        for name in TUNED:
            tuned = _tuned(model, name, bench, recipe)
            metrics.update(tuned["metrics"])
            choices[name] = tuned["choices"]
    return {
        "title": method.title,
        "paper": method.paper,
        "settings": dict(method.settings),
        "head": method.head or "linear",
        "uses_ood_data": method.uses_ood_data,
        "variant_of": method.variant_of,
        "train_seconds": seconds,
        "eval_seconds": time.perf_counter() - start,
        "accuracy": results.accuracy,
        "calibration_error": results.calibration_error,
        "detectors": [*results.detectors, *(f"{n}-{kind}" for n in choices for kind in ("tuned", "cross"))],
        "ood_sets": results.ood_sets,
        "sizes": results.settings["sizes"],
        "metrics": metrics,
        "tuned_choices": choices,
        "measurements": measurements,
    }


#: images per set for the bottleneck measurements
BOTTLENECK_IMAGES = 1000


def bottleneck_measurements(model: nn.Module, bench: Benchmark, recipe: Recipe) -> dict[str, Any]:
    """Why a VIB / VIBY score ranks a set where it does: per set (ID test first), the mean score ``KL(q(z|x) || r)``
    to the nearest prior, split into its mean term ``½ Σ (μ - m)² / s²`` and the rest (the variance term), the mean
    pre-logits norm ``||h(x)||`` and posterior-mean norm ``||μ(x)||``; and how far apart the learned priors are
    (mean pairwise distance of their means in units of their pooled sd; 0 for VIB's single prior)."""
    from timm_ood.training.heads import pre_logits

    head = model.get_classifier()
    sets = {"id": bench.id_test, **bench.ood}
    limit = min(BOTTLENECK_IMAGES, recipe.eval_images or BOTTLENECK_IMAGES)
    prior_mean, prior_log_variance = head.prior_mean.detach().double(), head.prior_log_variance.detach().double()
    per_set = {}
    model.eval()
    with torch.inference_mode():
        for name, dataset in sets.items():
            if len(dataset) > limit:
                dataset = dataset.select(range(limit))
            sums = torch.zeros(5, dtype=torch.float64)
            for images, _ in iter_batches(make_loader(dataset, model, batch_size=512, name=name)):
                features = pre_logits(model, images)
                mean, log_variance = (t.double() for t in head.posterior(features))
                features = features.double()
                kl = head.kl_to_priors(mean, log_variance)  # float64: the posterior's dtype
                kl_min, nearest = kl.min(dim=1)
                mean_term = 0.5 * ((mean - prior_mean[nearest]).pow(2) * torch.exp(-prior_log_variance[nearest])).sum(1)
                sums += torch.stack([kl_min.sum(), mean_term.sum(), features.norm(dim=1).sum(),
                                     mean.norm(dim=1).sum(), torch.tensor(float(len(images)), dtype=torch.float64)])
            count = float(sums[4])
            per_set[name] = {"kl": float(sums[0]) / count, "kl_mean_term": float(sums[1]) / count,
                             "kl_variance_term": float(sums[0] - sums[1]) / count,
                             "pre_logits_norm": float(sums[2]) / count, "posterior_mean_norm": float(sums[3]) / count}
    separation = 0.0
    if len(prior_mean) > 1:
        pooled_sd = prior_log_variance.exp().mean().sqrt()
        distances = torch.cdist(prior_mean, prior_mean) / pooled_sd
        separation = float(distances.sum() / (len(prior_mean) * (len(prior_mean) - 1)))
    return {"per_set": per_set, "prior_separation": separation}


def _tuned(model: nn.Module, detector: str, bench: Benchmark, recipe: Recipe) -> dict[str, Any]:
    """ODIN's protocol: tuned per OOD set on its 1,000 held-out images (and 1,000 held-out ID images), tested on
    that set's evaluation images (``<detector>-tuned``), and each set's choice tested on every other set
    (``<detector>-cross``, ODIN Appendix H: the mean over the sets it was not tuned on). FPR@95TPR only."""
    start = time.perf_counter()
    result = tune(model, detector, bench, protocol="cross-set", batch_size=512, max_images=recipe.eval_images,
                  progress=False)
    sets = list(result.cross)
    per_set = {s: {"fpr_at_tpr": result.cross[s][s]} for s in sets}
    cross = {s: {"fpr_at_tpr": sum(result.cross[t][s] for t in sets if t != s) / (len(sets) - 1)} for s in sets}
    for table in (per_set, cross):
        table["average"] = {"fpr_at_tpr": sum(table[s]["fpr_at_tpr"] for s in sets) / len(sets)}
    _log(f"{detector}: tuned in {time.perf_counter() - start:.0f} s")
    return {"metrics": {f"{detector}-tuned": per_set, f"{detector}-cross": cross}, "choices": result.best}


# -- the claims ------------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


@dataclass(frozen=True)
class Claim:
    """A paper's claim "``ours`` beats ``theirs``", each a ``(method, detector)`` pair.

    ``metric`` is what decides it (FPR@95TPR averaged over the judged OOD sets, or the ID expected calibration
    error); ``accuracy_tolerance``: also require the mean ID accuracy to drop by at most this many points.
    """

    text: str
    source: str
    ours: tuple[str, str]
    theirs: tuple[str, str]
    metric: str = "fpr_at_tpr"
    accuracy_tolerance: float | None = None


#: the papers' claims (IsoMax, Lee et al., GReg, the survey of Sreeramdas & Sarawagi) and further comparisons
CLAIMS: tuple[Claim, ...] = (
    Claim("ODIN, tuned per OOD set, lowers FPR@95TPR against the max-softmax baseline", "ODIN Table 2, Fig. 3",
          ("ce", "odin-tuned"), ("ce", "msp")),
    Claim("Temperature alone (Baseline+T, tuned) gives part of ODIN's gain: it beats the max-softmax baseline",
          "ODIN Fig. 3; Sreeramdas & Sarawagi Table 1", ("ce", "temperature-tuned"), ("ce", "msp")),
    Claim("... and the input perturbation adds to it: tuned ODIN beats tuned Baseline+T", "ODIN Fig. 3",
          ("ce", "odin-tuned"), ("ce", "temperature-tuned")),
    Claim("ODIN tuned on one OOD set still beats the baseline on the others", "ODIN Appendix H",
          ("ce", "odin-cross"), ("ce", "msp")),
    Claim("IsoMax + entropic score beats SoftMax + max-softmax without OOD data, at about the same accuracy",
          "IsoMax Table 2, Table 4", ("isomax", "entropic"), ("ce", "msp"), accuracy_tolerance=1.0),
    Claim("IsoMax + entropic score beats ODIN tuned per OOD set on a SoftMax model", "IsoMax Table 3",
          ("isomax", "entropic"), ("ce", "odin-tuned")),
    Claim("Confidence loss with seen OOD data beats cross-entropy on unseen OOD sets", "Lee et al. Fig. 4, Table 1",
          ("confidence", "msp"), ("ce", "msp")),
    Claim("Confidence loss is better calibrated than cross-entropy (lower ECE)", "Lee et al. Sec. 4",
          ("confidence", "msp"), ("ce", "msp"), metric="calibration_error"),
    Claim("The joint GAN version, without OOD data, beats cross-entropy on unseen OOD sets",
          "Lee et al. Fig. 4, Table 5", ("joint-confidence", "msp"), ("ce", "msp")),
    Claim("The joint GAN version, the authors' code's recipe, beats cross-entropy on unseen OOD sets",
          "Lee et al. Fig. 4, Table 5; the authors' code", ("joint-confidence-authors", "msp"), ("ce", "msp")),
    Claim("The joint GAN version beats the confidence loss with explicit OOD data", "Lee et al. Fig. 4",
          ("joint-confidence", "msp"), ("confidence", "msp")),
    Claim("Tuned ODIN adds to the confidence loss", "Lee et al. Fig. 7, Table 6",
          ("confidence", "odin-tuned"), ("confidence", "msp")),
    Claim("Outlier exposure beats cross-entropy on unseen OOD sets", "Hendrycks et al. 2019",
          ("oe", "msp"), ("ce", "msp")),
    Claim("IsoMax's zero-initialised prototypes beat Xavier-initialised ones", "IsoMax Sec. 2.2",
          ("isomax", "entropic"), ("isomax-xavier", "entropic")),
    Claim("GReg beats plain energy-loss training", "GReg Tables 1-3", ("greg", "energy"), ("energy", "energy")),
    Claim("GReg with Eq. 3's per-sample scaling beats plain energy-loss training", "GReg Eq. 3, Tables 1-3",
          ("greg-per-sample", "energy"), ("energy", "energy")),
    Claim("GReg+ sampling helps (against GReg with one random outlier per ID image, as the paper compares)",
          "GReg Table 2, Table 5", ("greg-plus", "energy"), ("greg", "energy")),
    Claim("GReg+'s clustered picks beat as many random outliers (2 per ID image each)", "GReg Table 5, Table 7",
          ("greg-plus", "energy"), ("greg-2x", "energy")),
    Claim("The energy loss with seen OOD data beats cross-entropy + MSP on unseen OOD sets", "GReg Tables 1-3",
          ("energy", "energy"), ("ce", "msp")),
    *(Claim(f"Tuned {name} on a cross-entropy model beats {method.upper()}", "Sreeramdas & Sarawagi Table 1, Sec. 7",
            ("ce", f"{detector}-tuned"), (method, score))
      for name, detector in (("ODIN", "odin"), ("Baseline+T", "temperature"))
      for method, score in (("bin", "bin"), ("binc", "bin"), ("vib", "vib"), ("viby", "viby-2"))),
    Claim("BINC improves slightly on BIN", "Sreeramdas & Sarawagi Table 1, Sec. 6", ("binc", "bin"), ("bin", "bin")),
    Claim("VIBY beats VIB", "Sreeramdas & Sarawagi Table 1, Sec. 6", ("viby", "viby-2"), ("vib", "vib")),
    Claim("VIBY's r_II beats its r_I", "Sreeramdas & Sarawagi Table 1, Sec. 6", ("viby", "viby-2"), ("viby", "viby-1")),
    Claim(f"VIBY beats VIB, both trained {LONG}x longer", "Sreeramdas & Sarawagi Table 1, Sec. 6",
          ("viby-long", "viby-2"), ("vib-long", "vib")),
)


def _records(runs: Mapping[str, Mapping[str, Any]], method: str) -> dict[int, Mapping[str, Any]]:
    return {int(seed): by_method[method] for seed, by_method in runs.items() if method in by_method}


def judged_sets(runs: Mapping[str, Mapping[str, Any]], claim: Claim) -> list[str]:
    """The OOD sets a claim is judged on: those unlike the auxiliary outliers when either side trained on them."""
    first = next(iter(next(iter(runs.values())).values()))
    sets = list(first["ood_sets"])
    with_outliers = any(next(iter(_records(runs, m).values()), {}).get("uses_ood_data", "none") != "none"
                        for m in (claim.ours[0], claim.theirs[0]))
    return [s for s in sets if s not in LIKE_AUX] if with_outliers else sets


def _values(runs: Mapping[str, Mapping[str, Any]], pair: tuple[str, str], metric: str, sets: Sequence[str]
            ) -> dict[int, float]:
    method, detector = pair
    values = {}
    for seed, record in _records(runs, method).items():
        if metric == "calibration_error":
            if record.get("calibration_error") is not None:
                values[seed] = record["calibration_error"]
        elif detector in record["metrics"]:
            per_set = record["metrics"][detector]
            values[seed] = sum(per_set[s][metric] for s in sets) / len(sets)
    return values


def _sets_won(runs: Mapping[str, Mapping[str, Any]], claim: Claim, sets: Sequence[str]) -> int:
    """On how many of ``sets`` the mean FPR@95TPR over seeds of ``ours`` is below that of ``theirs``."""
    means = [{s: sum(v.values()) / len(v) for s in sets for v in [_values(runs, pair, "fpr_at_tpr", [s])] if v}
             for pair in (claim.ours, claim.theirs)]
    return sum(1 for s in sets if s in means[0] and s in means[1] and means[0][s] < means[1][s])


def check_claims(runs: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Rows ``[claim, source, verdict, judged on, measured]`` by the paired rule over seeds."""
    rows = []
    for claim in CLAIMS:
        sets = judged_sets(runs, claim) if runs else []
        ours, theirs = (_values(runs, pair, claim.metric, sets) for pair in (claim.ours, claim.theirs))
        if not ours or not theirs:
            rows.append([claim.text, claim.source, "not run", "-", "a method it needs was not run"])
            continue
        verdict = paired_verdict(ours, theirs, higher_is_better=False)
        outcome, reason = verdict.outcome, verdict.explain(100, " points")
        mean = {k: mean_sd(list(v.values())) for k, v in (("ours", ours), ("theirs", theirs))}
        measured = (f"{claim.ours[0]}+{claim.ours[1]} {mean['ours'].format()} vs {claim.theirs[0]}+"
                    f"{claim.theirs[1]} {mean['theirs'].format()} ({'ECE' if claim.metric == 'calibration_error' else 'FPR@95TPR'}, %); {reason}")
        if claim.accuracy_tolerance is not None:
            accuracy = {k: {s: r["accuracy"] for s, r in _records(runs, pair[0]).items()}
                        for k, pair in (("ours", claim.ours), ("theirs", claim.theirs))}
            seeds = sorted(set(accuracy["ours"]) & set(accuracy["theirs"]))
            loss = 100 * sum(accuracy["theirs"][s] - accuracy["ours"][s] for s in seeds) / len(seeds)
            measured += f"; mean ID accuracy loss {loss:+.2f} points (at most {claim.accuracy_tolerance:g} allowed)"
            if outcome == "held" and loss > claim.accuracy_tolerance:
                outcome = "not held"
        if claim.metric != "calibration_error":
            wins = _sets_won(runs, claim, sets)
            measured += f"; lower mean FPR on {wins} of {len(sets)} judged sets"
        judged = "ID test set" if claim.metric == "calibration_error" else (
            "all OOD sets" if len(sets) == len(next(iter(_records(runs, claim.ours[0]).values()))["ood_sets"])
            else "sets unlike the auxiliary outliers")
        rows.append([claim.text, claim.source, f"**{outcome}**", judged, measured])
    return rows


# -- the report ---------------------------------------------------------------------------------------------
def _label(detector: str) -> str:
    return "odin" if detector.startswith("odin(") else detector


def _name(detector: DetectorSpec) -> str:
    return detector if isinstance(detector, str) else detector[0]


def _cell(values: Sequence[float], scale: float = 100.0) -> str:
    """``mean ± sd`` in percent (``scale`` 100, one decimal) or as measured (``scale`` 1, two decimals)."""
    return mean_sd(values).format(scale=scale, digits=1 if scale == 100.0 else 2) if values else "-"


def _seconds(values: Sequence[float]) -> str:
    return mean_sd(values).format(scale=1.0, digits=0)


def render(state: Mapping[str, Any], figures: Path | None = None) -> str:
    """The markdown report: every method as mean ± sd over the seeds run, and the claims' verdicts."""
    recipe, runs = state["recipe"], state["runs"]
    names = list(dict.fromkeys(m for by_method in runs.values() for m in by_method))
    order = [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]
    variants = [m for m in order if next(iter(_records(runs, m).values())).get("variant_of")]
    main = [m for m in order if m not in variants]
    order = main + variants
    seeds = sorted(int(s) for s in runs)
    first = next(iter(_records(runs, order[0]).values()))
    sets = first["ood_sets"]
    lines = ["# Training-time methods on Fashion-MNIST (offline protocol)", ""]
    lines += ["Made by:", "", "```", *state["commands"], "```", ""]
    lines += [f"Machine: {state['machine']}", ""]
    lines += [
        f"Seeds: {', '.join(map(str, seeds))}. Every number is mean ± sd over the seeds a method was run with "
        "(sample sd); a trained model is one draw.", "",
        "**Verdict rule.** " + VERDICT_RULE + " The decisive metric is the average FPR@95TPR over the judged OOD "
        "sets (ECE for the calibration claim).", "",
        "**Unseen means unseen.** The auxiliary outliers are crops and downsampled windows of photos; the test sets "
        f"{' and '.join(LIKE_AUX)} are made by the same procedure from other photos, so for a method trained on "
        "the auxiliary outliers they are not unseen in Lee et al.'s sense. Claims involving such a method are "
        "judged on the other sets only (" + ", ".join(s for s in sets if s not in LIKE_AUX) + "); the tables show "
        "every set.", "",
        "Protocol: ID = Fashion-MNIST (train: the images below; test: "
        f"{first['sizes'].get('id', '?')} images; 1,000 held-out ID test images and 1,000 of each OOD set are kept "
        "for tuning and never evaluated). OOD test sets: " + ", ".join(f"{s} ({first['sizes'][s]})" for s in sets)
        + f". Methods using auxiliary photos train with {recipe['outlier_images']:,} of them. ODIN and Baseline+T "
        "appear three ways: `odin` at the paper's T = 1000, epsilon = 0.0014; `odin-tuned` tuned per OOD set on "
        "its held-out images (ODIN Sec. 4.2); `odin-cross` tuned on one set and tested on the others (ODIN "
        "Appendix H, mean over the sets it was not tuned on); the same for `temperature`. Tuned rows have "
        "FPR@95TPR only. Metrics read ID as positive; values in %. ECE is the top-1 expected calibration error of "
        "the model's softmax on the ID test set (15 bins); IsoMax's inference softmax(-d) has no entropic scale, "
        "so its confidences are low by design and its ECE is no calibration verdict.", "",
        "Every method trains with the recipe below; energy, GReg and GReg+ (and their variants) fine-tune the "
        "cross-entropy model of the same seed for `fine_tune_epochs` at `fine_tune_lr`. "
        f"Compute: {_compute_hours(runs):.2f} h of training, evaluation and tuning in all (the sum over runs of "
        "the times below, on the machine named above).", "",
        markdown_table(["setting", "value"], [[k, f"`{v}`"] for k, v in recipe.items() if k != "seed"]),
        "",
        "## Methods",
        "",
        _methods_table(runs, main),
        "",
        "## Summary (averages over all OOD sets, mean ± sd over seeds)",
        "",
        markdown_table(SUMMARY_HEADER, _summary_rows(runs, main)),
        "",
    ]
    if variants:
        lines += [
            "## Each paper's own recipe, and sweeps",
            "",
            "Variants of the methods above, each as its paper or the authors' code has it, or a sweep point; same "
            "recipe, seeds and evaluation.",
            "",
            _methods_table(runs, variants),
            "",
            markdown_table(SUMMARY_HEADER, _summary_rows(runs, variants)),
            "",
        ]
    for key, title in METRICS.items():
        lines += [f"## {title} per OOD set", ""]
        rows = []
        for m in order:
            recs = _records(runs, m)
            for d in dict.fromkeys(d for r in recs.values() for d in r["detectors"]):
                present = [r for r in recs.values() if d in r["metrics"] and key in r["metrics"][d]["average"]]
                if present:
                    rows.append([next(iter(recs.values()))["title"], _label(d),
                                 *(_cell([r["metrics"][d][s][key] for r in present]) for s in [*sets, "average"])])
        lines += [markdown_table(["method", "detector", *sets, "**average**"], rows), ""]
    lines += ["## The papers' claims", "",
              markdown_table(["claim", "source", "verdict", "judged on", "measured"], check_claims(runs)), ""]
    lines += _survey_ranking(runs)
    lines += _gradient_norms(runs, figures)
    lines += _bottleneck(runs)
    return "\n".join(lines)


def _compute_hours(runs: Mapping[str, Mapping[str, Any]]) -> float:
    return sum(r["train_seconds"] + r["eval_seconds"] for by_method in runs.values() for r in by_method.values()) / 3600


SUMMARY_HEADER = ["method", "detector", "ID acc. ↑", "ECE ↓", *METRICS.values()]


def _methods_table(runs: Mapping[str, Mapping[str, Any]], methods: Sequence[str]) -> str:
    rows = []
    for m in methods:
        recs = _records(runs, m)
        first = next(iter(recs.values()))
        rows.append([first["title"], first["paper"], first["head"],
                     ", ".join(f"{k}={v}" for k, v in first["settings"].items()) or "-", first["uses_ood_data"],
                     ", ".join(map(str, sorted(recs))), _seconds([r["train_seconds"] for r in recs.values()]),
                     _seconds([r["eval_seconds"] for r in recs.values()])])
    return markdown_table(["method", "paper", "head", "settings", "OOD data in training", "seeds", "train s",
                           "eval s"], rows)


def _summary_rows(runs: Mapping[str, Mapping[str, Any]], methods: Sequence[str]) -> list[list[str]]:
    rows = []
    for m in methods:
        recs = _records(runs, m)
        for d in dict.fromkeys(d for r in recs.values() for d in r["detectors"]):
            present = [r for r in recs.values() if d in r["metrics"]]
            cells = [_cell([r["metrics"][d]["average"][k] for r in present if k in r["metrics"][d]["average"]])
                     for k in METRICS]
            rows.append([next(iter(recs.values()))["title"], _label(d), _cell([r["accuracy"] for r in recs.values()]),
                         _cell([r["calibration_error"] for r in recs.values() if r.get("calibration_error") is not None]),
                         *cells])
    return rows


#: the survey's detectors, in the order of its Table 1 ranking (best first), as (method, detector) here
SURVEY_RANKING = (("ODIN, tuned", ("ce", "odin-tuned")), ("Baseline+T, tuned", ("ce", "temperature-tuned")),
                  ("BIN", ("bin", "bin")), ("BINC", ("binc", "bin")), ("VIB", ("vib", "vib")),
                  ("VIBY (r_II)", ("viby", "viby-2")))


def _survey_ranking(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The survey's detectors ranked by mean FPR@95TPR over all OOD sets here, next to the survey's order."""
    measured = []
    for position, (title, pair) in enumerate(SURVEY_RANKING, start=1):
        sets = next(iter(_records(runs, pair[0]).values()), {}).get("ood_sets", [])
        values = _values(runs, pair, "fpr_at_tpr", sets) if sets else {}
        if values:
            measured.append((mean_sd(list(values.values())), position, title))
    if not measured:
        return []
    rows = [[str(rank), title, str(position), value.format()]
            for rank, (value, position, title) in enumerate(sorted(measured, key=lambda m: m[0].mean), start=1)]
    return ["## The survey's ranking, re-tested with tuned baselines", "",
            "Sreeramdas & Sarawagi rank ODIN, Baseline+T, BIN, BINC, VIB, VIBY in this order (their Table 1); here "
            "each runs on its own trained model (ODIN and Baseline+T tuned per OOD set on the cross-entropy model). "
            "Ranked by mean FPR@95TPR over all OOD sets; adjacent ranks within the spread are not an order (the "
            "claims above say which differences hold).", "",
            markdown_table(["rank here", "detector", "survey's rank", "FPR@95TPR ↓ (%)"], rows), ""]


def _gradient_norms(runs: Mapping[str, Mapping[str, Any]], figures: Path | None) -> list[str]:
    """GReg Fig. 3: mean ||∇_x S(x)|| on ID and auxiliary images, before fine-tuning and after each epoch."""
    curves = {}
    for m in ("energy", "greg", "greg-per-sample", "greg-2x", "greg-plus"):
        recs = [r for r in _records(runs, m).values() if r.get("measurements", {}).get("gradient_norms")]
        if recs:
            curves[m] = (recs[0]["title"], [r["measurements"]["gradient_norms"] for r in recs])
    if not curves:
        return []
    first = next(iter(curves.values()))[1][0]
    when = first.get("epochs", list(range(len(first["id"]))))
    rows = [[title, {"id": "ID", "auxiliary": "auxiliary"}[kind],
             *(_cell([n[kind][e] for n in norms if len(n[kind]) > e], 1.0) for e in range(len(when)))]
            for title, norms in curves.values() for kind in ("id", "auxiliary")]
    lines = ["## GReg's mechanism: input-gradient norms of the energy per epoch (GReg Fig. 3)", "",
             f"Mean ‖∇ₓ S(x)‖₂ over {PROBE_IMAGES} fixed ID training images and {PROBE_IMAGES} auxiliary photos, "
             "the model in eval mode, before fine-tuning (epoch 0) and every quarter epoch; mean ± sd over seeds. GReg "
             "penalises this norm on samples already beyond their margin, so it should fall under GReg and not under "
             "the plain energy loss.", "",
             markdown_table(["method", "images", *(f"epoch {e:g}" for e in when)], rows), ""]
    if figures is not None:
        path = figures / "training_methods_gradient_norms.png"
        _plot_gradient_norms(curves, path)
        lines += [f"![Energy input-gradient norms per epoch]({path.name})", ""]
    return lines


def _plot_gradient_norms(curves: Mapping[str, tuple[str, list[Mapping[str, list[float]]]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, kind, label in zip(axes, ("id", "auxiliary"), ("ID training images", "auxiliary photos"), strict=True):
        for title, norms in curves.values():
            count = min(len(n[kind]) for n in norms)
            when = norms[0].get("epochs", list(range(count)))[:count]
            values = [mean_sd([n[kind][e] for n in norms]) for e in range(count)]
            axis.errorbar(when, [v.mean for v in values], yerr=[v.sd for v in values], marker="o",
                          capsize=3, label=title)
        axis.set_title(label)
        axis.set_xlabel("fine-tuning epochs (0 = the cross-entropy model)")
        axis.set_yscale("log")
    axes[0].set_ylabel("mean ||∇ₓ energy||₂ (mean ± sd over seeds)")
    axes[1].legend(fontsize=7)
    figure.savefig(path, dpi=110)


def _bottleneck(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why VIB / VIBY invert on some sets: their score's terms and the feature norms per set."""
    methods = [m for m in ("vib", "viby", "vib-long", "viby-long")
               if any(r.get("measurements", {}).get("bottleneck") for r in _records(runs, m).values())]
    if not methods:
        return []
    rows = []
    for m in methods:
        recs = [r for r in _records(runs, m).values() if r.get("measurements", {}).get("bottleneck")]
        measured = [r["measurements"]["bottleneck"] for r in recs]
        for name in measured[0]["per_set"]:
            cell = {k: _cell([b["per_set"][name][k] for b in measured], 1.0)
                    for k in ("kl", "kl_mean_term", "kl_variance_term", "pre_logits_norm")}
            lower = sum(1 for b in measured if b["per_set"][name]["kl"] < b["per_set"]["id"]["kl"])
            rows.append([recs[0]["title"], name, cell["kl"], cell["kl_mean_term"], cell["kl_variance_term"],
                         cell["pre_logits_norm"], "-" if name == "id" else f"{lower} of {len(measured)}"])
    separation = []
    for m in methods:
        measured = [r["measurements"]["bottleneck"] for r in _records(runs, m).values()
                    if r.get("measurements", {}).get("bottleneck")]
        if m.startswith("viby"):
            separation.append([next(iter(_records(runs, m).values()))["title"],
                               _cell([b["prior_separation"] for b in measured], 1.0)])
    return ["## Why VIB and VIBY rank some sets inverted: the score's terms per set", "",
            "The score is KL(q(z|x) || prior) to the nearest learned prior (VIB: the one prior; VIBY r_II: the nearest "
            "class prior); higher = more OOD. Split into its mean term ½ Σ (μ(x) - m)² / s² and the rest (variance "
            "term), with the mean pre-logits norm ‖h(x)‖. A set whose KL is below the ID test set's is ranked as "
            "more in-distribution than ID: an inverted AUROC.", "",
            markdown_table(["method", "set", "KL ↑ (score)", "mean term", "variance term", "‖h(x)‖",
                            "seeds with KL below ID's"], rows), "",
            "VIBY's priors: mean pairwise distance between the class priors' means, in units of their pooled sd "
            "(how far the priors separated):", "",
            markdown_table(["method", "prior separation"], separation), ""]


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {sys.version.split()[0]}")


def _seeds(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers such as 0,1,2, got {text!r}")
    return seeds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)} (default all)")
    parser.add_argument("--seeds", type=_seeds, default=list(SEEDS), help="training seeds (default 0,1,2)")
    parser.add_argument("--fast", action="store_true", help="smoke run: test_resnet, 2,000 images, small sets")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_methods.md", help="the markdown report")
    parser.add_argument("--retrain", action="store_true", help="ignore cached checkpoints (implies --rerun)")
    parser.add_argument("--rerun", action="store_true", help="evaluate again the (seed, method) runs already recorded")
    parser.add_argument("--report-only", action="store_true", help="write the report from the recorded JSON, run nothing")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    base = FAST_RECIPE if args.fast else RECIPE
    base_key = dataclasses.replace(base, seed=0).key()  # the record holds every seed of one recipe
    command = "python benchmarks/train_methods.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    from timm_ood.data.cache import cache_dir

    json_path = args.out.with_suffix(".json")
    if args.report_only:
        state = _read_state(json_path, base, base_key)
        args.out.write_text(render(state, figures=args.out.parent))
        print(render(state))
        return
    bench = load_benchmark("fashion-mnist")
    for seed in args.seeds:
        recipe = dataclasses.replace(base, seed=seed)
        for name in names:
            done = _read_state(json_path, base, base_key)["runs"].get(str(seed), {}).get(name)
            if done is not None and not (args.rerun or args.retrain):
                if done["settings"] == json.loads(json.dumps(dict(METHODS[name].settings), default=str)):
                    _log(f"seed {seed}, {name}: recorded, skipped (--rerun redoes it)")
                    continue
                _log(f"seed {seed}, {name}: recorded with other settings ({done['settings']}): running it again")
            torch.manual_seed(recipe.seed)
            record = run_method(METHODS[name], recipe, bench, cache_dir=cache_dir() / "models", retrain=args.retrain)
            save_run(args.out, base, seed, name, record, command.strip())
    print(render(_read_state(json_path, base, base_key)))


def save_run(out: Path, base: Recipe, seed: int, name: str, record: Mapping[str, Any], command: str
             ) -> dict[str, Any]:
    """Merge one finished (seed, method) run into the JSON record next to ``out`` and rewrite the report.

    The record is read, merged and written under an exclusive lock, so several processes can run pieces of one
    benchmark (other methods or seeds) at once without losing each other's runs.
    """
    json_path = out.with_suffix(".json")
    base_key = dataclasses.replace(base, seed=0).key()
    with _locked(json_path):
        state = _read_state(json_path, base, base_key)
        state["runs"].setdefault(str(seed), {})[name] = dict(record)
        state["commands"] = [*[c for c in state["commands"] if c != command], command]
        state["machine"] = _machine()
        json_path.write_text(json.dumps(state, indent=1) + "\n")
        out.write_text(render(state, figures=out.parent))
    return state


def _read_state(json_path: Path, base: Recipe, base_key: str) -> dict[str, Any]:
    """The record of ``base``'s runs in ``json_path`` (a new one if the file holds another recipe or none)."""
    if json_path.exists():
        previous = json.loads(json_path.read_text())
        if previous.get("recipe_key") == base_key and "runs" in previous:
            return previous
        _log(f"{json_path} holds another recipe or the single-seed format: starting a new record")
    return {"recipe": dataclasses.asdict(base), "recipe_key": base_key, "runs": {}, "commands": []}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` + ``.lock`` (POSIX ``flock``) for reading, merging and writing the record."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":
    main()
