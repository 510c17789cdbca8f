"""Speed of timm-ood's detectors against pytorch-ood's on the same model, inputs and batch size.

For every detector both libraries implement, the ratio of timm-ood's time to
pytorch-ood's, forward passes included on both sides (goal: at most 1.0):

- scoring: ``OODModel.ood_score(x)`` against ``detector.predict(x)`` over the
  same batches of Fashion-MNIST test images and an OOD set;
- fitting: ``OODModel.fit(batches)`` against ``detector.fit(batches)`` on the
  same training batches, for detectors that fit on either side.

One table, :data:`COUNTERPARTS`, maps a timm-ood detector name to its
pytorch-ood class and an adapter building that class from the timm model (the
``model``, or the ``encoder`` / ``backbone`` / ``head`` callables pytorch-ood
takes) with the hyperparameters of timm-ood's default detector; a detector that
lands later is one line there. Names in the table that are not registered yet
are listed as "not yet available". The table also says, per detector, whether
both libraries define the same score (``tests/test_pytorch_ood_agreement.py``
checks those rank inputs identically) or how the definitions differ.

Each side runs ``--repeats`` times, fits in alternating order and scoring
interleaved batch by batch, so that both see the same load on a shared
machine; the best (smallest) of the repeats is compared, as ``timeit`` does:
interference from other processes only ever adds time. The
Spearman correlation of the two libraries' scores and both AUROCs (ID test vs
the OOD set) are printed as a sanity check of what was timed.

Usage::

    python benchmarks/bench_detectors.py                   # the small reference model (FAST_RECIPE), cached
    python benchmarks/bench_detectors.py --recipe full     # the reference ResNet-18 (trained once, cached)
    python benchmarks/bench_detectors.py --only knn,vim --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import timm_ood
from timm_ood.detectors.base import Detector

RESULTS = Path(__file__).resolve().parent / "results" / "detectors_speed.md"


# -- what pytorch-ood's constructors take, from one timm model -------------------------------------


@dataclass(frozen=True)
class Parts:
    """A timm model cut the ways pytorch-ood's detectors take it.

    Attributes:
        model: the whole model (logits).
        encoder: images -> pre-logits ``forward_head(forward_features(x), pre_logits=True)``.
        classifier: the linear classifier over the pre-logits (``get_classifier()``).
        backbone: images -> unpooled feature maps (``forward_features``).
        head: feature maps -> logits (``forward_head``).
        stages: a timm ResNet as consecutive modules (stem, ``layer1`` .. ``layer4``), for the
            detectors that take a list of layers.
        std: the model's per-channel normalisation std, for input perturbations.
    """

    model: nn.Module
    encoder: Callable[[torch.Tensor], torch.Tensor]
    classifier: nn.Linear
    backbone: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    stages: list[nn.Module]
    std: list[float]

    @classmethod
    def of(cls, model: nn.Module) -> Parts:
        from timm_ood.model_info import normalisation

        def encoder(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.forward_features(x), pre_logits=True)

        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        stages = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
        return cls(model, encoder, model.get_classifier(), model.forward_features, model.forward_head, stages,
                   normalisation(model)[1].tolist())

    def as_maps(self) -> tuple[Callable, Callable]:
        """``(backbone, head)`` over the pre-logits as [B, D, 1, 1] maps, for detectors that want 4-d maps."""
        return (lambda x: self.encoder(x)[:, :, None, None]), (lambda maps: self.classifier(maps.flatten(1)))


@dataclass(frozen=True)
class Counterpart:
    """pytorch-ood's implementation of one timm-ood detector.

    Attributes:
        cls: the class name in ``pytorch_ood.detector``.
        build: ``(parts, our_detector) -> pytorch-ood detector`` with equivalent hyperparameters.
        differs: ``None`` when both libraries define the same score (the agreement test checks
            they rank inputs identically), else how the definitions differ.
        model_options: attributes set on a copy of the model for both sides (dropout for mc-dropout).
        image_size: inputs resized to this size for both sides (RankFeat needs a final feature map of at
            least 2 x 2; the small reference ResNet maps 28 x 28 images to 1 x 1).
    """

    cls: str
    build: Callable[[Parts, Detector], Any]
    differs: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` at :attr:`image_size` (bilinear), or unchanged."""
        if self.image_size is None:
            return images
        return F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)


def _pood(name: str) -> Any:
    import pytorch_ood.detector

    return getattr(pytorch_ood.detector, name)


def _classifier_weight_name(model: nn.Module) -> str:
    weight = model.get_classifier().weight
    return next(name for name, parameter in model.named_parameters() if parameter is weight)


_SINGULAR = ("on a singular covariance (dead ReLU units, a LayerNorm head) pytorch-ood inverts the "
             "un-normalised scatter plus 1e-6 I in float32, which weights its null space by 1e6; the "
             "authors' code (sklearn's EmpiricalCovariance) and timm-ood take the pseudo-inverse. On a "
             "full-rank covariance both rank alike (checked separately by the agreement test)")
#: pytorch-ood's OpenMax distance ``(1 - w) cos + w euclid``; w = 1/201 is eucos (euclid/200 + cos) times 200/201.
_EUCLID_WEIGHT = {"euclidean": 1.0, "cosine": 0.0, "eucos": 1 / 201}


def _fraction(percentile: float) -> float:
    return float(percentile) / 100


def _ash(variant: str) -> Counterpart:
    def build(parts: Parts, ours: Detector) -> Any:
        backbone, head = parts.as_maps()
        return _pood("ASH")(backbone, head, variant=variant, percentile=_fraction(ours.percentile))

    return Counterpart("ASH", build)


#: timm-ood name -> pytorch-ood counterpart, for every detector pytorch-ood 0.4.0 also implements.
COUNTERPARTS: dict[str, Counterpart] = {
    "msp": Counterpart("MaxSoftmax", lambda p, d: _pood("MaxSoftmax")(p.model)),
    "temperature": Counterpart("MaxSoftmax", lambda p, d: _pood("MaxSoftmax")(p.model, t=d.temperature)),
    "maxlogit": Counterpart("MaxLogit", lambda p, d: _pood("MaxLogit")(p.model)),
    "energy": Counterpart("EnergyBased", lambda p, d: _pood("EnergyBased")(p.model, t=d.temperature)),
    "entropy": Counterpart("Entropy", lambda p, d: _pood("Entropy")(p.model)),
    "odin": Counterpart("ODIN", lambda p, d: _pood("ODIN")(
        p.model, eps=d.epsilon, temperature=d.temperature, norm_std=p.std)),
    "mahalanobis": Counterpart("Mahalanobis", lambda p, d: _pood("Mahalanobis")(p.encoder), differs=_SINGULAR),
    "mahalanobis-odin": Counterpart("MahalanobisODIN", lambda p, d: _pood("MahalanobisODIN")(
        p.encoder, eps=d.epsilon, norm_std=p.std), differs=_SINGULAR),
    "gradnorm": Counterpart("GradNorm", lambda p, d: _pood("GradNorm")(
        p.model, param_filter=_classifier_weight_name(p.model).__eq__, temperature=d.temperature)),
    "mc-dropout": Counterpart(
        "MCD", lambda p, d: _pood("MCD")(p.model, samples=d.samples, mode="mean"),
        differs="both sample random dropout masks: pytorch-ood per element from the global generator, "
                "timm-ood one seeded mask per pass shared by the batch; the scores are estimates of the "
                "same quantity, not equal",
        model_options={"drop_rate": 0.2}),
    "temperature-scaling": Counterpart(
        "TemperatureScaling", lambda p, d: _pood("TemperatureScaling")(p.model),
        differs="both fit T by the NLL on ID data, with different optimisers; the fitted T, and so "
                "the ranking at ties of the max logit, agree only to the optimisers' tolerance"),
    "gen": Counterpart("GEN", lambda p, d: _pood("GEN")(
        p.model, gamma=d.gamma, M=min(int(d.top_classes), p.classifier.out_features))),
    "kl-matching": Counterpart("KLMatching", lambda p, d: _pood("KLMatching")(p.model)),
    "weighted-energy": Counterpart("WeightedEBO", lambda p, d: _pood("WeightedEBO")(
        p.model, weights=torch.ones(p.classifier.out_features) if d.weights is None else torch.tensor(d.weights))),
    "react": Counterpart("ReAct", lambda p, d: _pood("ReAct")(
        p.encoder, p.classifier, percentile=_fraction(d.percentile))),
    "ash-p": _ash("ash-p"),
    "ash-b": _ash("ash-b"),
    "ash-s": _ash("ash-s"),
    "scale": Counterpart("SCALE", lambda p, d: _pood("SCALE")(*p.as_maps(), percentile=_fraction(d.percentile))),
    "dice": Counterpart("DICE", lambda p, d: _pood("DICE")(
        p.encoder, p.classifier.weight, p.classifier.bias, p=_fraction(d.p))),
    "vra": Counterpart("VRA", lambda p, d: _pood("VRA")(
        p.encoder, p.classifier, lower_percentile=_fraction(d.lower_percentile),
        upper_percentile=_fraction(d.upper_percentile)),
        differs="pytorch-ood clamps activations below the lower threshold up to it, with one pair of "
                "thresholds per unit; the paper's VRA (and timm-ood) zeroes them, with thresholds over all "
                "activations"),
    "rankfeat": Counterpart("RankFeat", lambda p, d: _pood("RankFeat")(p.backbone, p.head), image_size=64),
    "lts": Counterpart("LTS", lambda p, d: _pood("LTS")(p.encoder, p.classifier, p=1 - _fraction(d.percentile))),
    "rmd": Counterpart("RMD", lambda p, d: _pood("RMD")(p.encoder), differs=_SINGULAR),  # class and background scatter alike
    "multi-mahalanobis": Counterpart(
        "MultiMahalanobis", lambda p, d: _pood("MultiMahalanobis")(p.stages),
        differs="pytorch-ood sums the layers' scores with fixed weights (all 1); the paper, and "
                "timm-ood, fit the weights by logistic regression"),
    "gmm": Counterpart("GMM", lambda p, d: _pood("GMM")(p.encoder, reg=d.regularization)),
    "knn": Counterpart("KNN", lambda p, d: _pood("KNN")(p.encoder, k=d.k)),
    "nnguide": Counterpart("NNGuide", lambda p, d: _pood("NNGuide")(p.encoder, p.classifier, k=d.k)),
    "vim": Counterpart("ViM", lambda p, d: _pood("ViM")(
        p.encoder, d=_vim_dimension(p, d), w=p.classifier.weight, b=p.classifier.bias)),
    "fdbd": Counterpart("fDBD", lambda p, d: _pood("fDBD")(p.encoder, p.classifier)),
    "nci": Counterpart("NCI", lambda p, d: _pood("NCI")(p.encoder, p.classifier, alpha=d.alpha)),
    "she": Counterpart("SHE", lambda p, d: _pood("SHE")(p.encoder, p.classifier)),
    "openmax": Counterpart("OpenMax", lambda p, d: _pood("OpenMax")(
        p.model, tailsize=d.tail_size, alpha=d.alpha, euclid_weight=_EUCLID_WEIGHT[d.distance]),
        differs="pytorch-ood fits each class's mean and Weibull tail on all of its training images; the "
                "paper (and timm-ood) on the correctly classified ones only"),
    "gram": Counterpart("Gram", lambda p, d: _pood("Gram")(
        p.head, p.stages, p.classifier.out_features, num_poles_list=list(range(1, int(d.max_power) + 1))),
        differs="the layers' expected deviations E[delta_l]: pytorch-ood holds out a random 10% of the fit "
                "data per class, timm-ood takes the exact leave-one-out estimate on all of it (or held-out "
                "data passed to model.fit_held_out)"),
}


def _vim_dimension(parts: Parts, ours: Detector) -> int:
    """ViM's principal dimension D as the integer pytorch-ood takes, by timm-ood's rule."""
    from timm_ood.detectors.classifier_geometry import vim_principal_dim

    return vim_principal_dim(parts.classifier.in_features, ours.principal_dim)


# -- running both sides ------------------------------------------------------------------------------


@dataclass
class Row:
    """One detector's measurements (seconds: the best of the repeats)."""

    name: str
    counterpart: str
    score_ours: float | None = None
    score_theirs: float | None = None
    fit_ours: float | None = None
    fit_theirs: float | None = None
    spearman: float | None = None
    auroc_ours: float | None = None
    auroc_theirs: float | None = None
    note: str = ""

    @property
    def score_ratio(self) -> float | None:
        return None if self.score_ours is None or not self.score_theirs else self.score_ours / self.score_theirs

    @property
    def fit_ratio(self) -> float | None:
        return None if self.fit_ours is None or not self.fit_theirs else self.fit_ours / self.fit_theirs


def _with_options(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    if not options:
        return model
    model = copy.deepcopy(model)
    for name, value in options.items():
        setattr(model, name, value)
    return model.eval()


class Side:
    """One library's detector for one repeat: fitted, then timed batch by batch."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], fit: Callable[[], Any] | None,
                 grad_mode: Callable[[], Any]) -> None:
        self.score, self.fit, self.grad_mode = score, fit, grad_mode
        self.fit_seconds: float | None = None
        self.score_seconds = 0.0
        self.scores: list[torch.Tensor] = []

    def run_fit(self, clock: Callable[[], float]) -> None:
        if self.fit is not None:
            start = clock()
            with self.grad_mode():
                self.fit()
            self.fit_seconds = clock() - start

    def run_score(self, x: torch.Tensor, clock: Callable[[], float]) -> None:
        start = clock()
        with self.grad_mode():
            scores = self.score(x)
        self.score_seconds += clock() - start
        self.scores.append(scores.detach().cpu())


def _ours(model: nn.Module, name: str, fit_batches: Sequence) -> Side:
    ood = timm_ood.wrap(model, name)
    fit = (lambda: ood.fit(fit_batches, progress=False)) if ood.detector.requirements.fit else None
    return Side(ood.ood_score, fit, contextlib.nullcontext)  # ood_score picks its own grad mode


def _theirs(parts: Parts, counterpart: Counterpart, ours: Detector, fit_batches: Sequence) -> Side:
    torch.manual_seed(0)
    detector = counterpart.build(parts, ours)
    fit = (lambda: detector.fit(fit_batches)) if detector.requires_fit else None
    # as a user scores without autograd; detectors that need gradients enable them inside predict
    return Side(detector.predict, fit, torch.no_grad)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def auroc(scores: torch.Tensor, is_ood: torch.Tensor) -> float:
    from timm_ood.metrics import ood_metrics

    return float(ood_metrics(scores.double(), is_ood)["auroc"])


def measure(model: nn.Module, name: str, counterpart: Counterpart, fit_batches: Sequence, score_batches: Sequence,
            repeats: int, clock: Callable[[], float]) -> Row:
    """Time both libraries on one detector: fits in alternating order, scoring interleaved batch by batch.

    Interleaving puts both libraries under the same load of a shared machine;
    each repeat builds and fits both detectors afresh.
    """
    model = _with_options(model, counterpart.model_options)
    fit_batches = [(counterpart.inputs(x), y) for x, y in fit_batches]
    score_batches = [(counterpart.inputs(x), y) for x, y in score_batches]
    parts = Parts.of(model)
    ours_detector = timm_ood.create_detector(name)
    fits: tuple[list[float], list[float]] = ([], [])
    totals: tuple[list[float], list[float]] = ([], [])
    for repeat in range(repeats):
        sides = (_ours(model, name, fit_batches), _theirs(parts, counterpart, ours_detector, fit_batches))
        order = (0, 1) if repeat % 2 == 0 else (1, 0)
        for index in order:
            sides[index].run_fit(clock)
        for index in order:  # warm-up: first-batch checks, allocator
            with sides[index].grad_mode():
                sides[index].score(score_batches[0][0])
        for batch, (x, _) in enumerate(score_batches):
            for index in order if batch % 2 == 0 else order[::-1]:
                sides[index].run_score(x, clock)
        for index, side in enumerate(sides):
            totals[index].append(side.score_seconds)
            if side.fit_seconds is not None:
                fits[index].append(side.fit_seconds)
    ours, theirs = (torch.cat(side.scores) for side in sides)
    is_ood = torch.cat([(y < 0).long() for _, y in score_batches])
    return Row(
        name, counterpart.cls,
        score_ours=min(totals[0]), score_theirs=min(totals[1]),
        fit_ours=min(fits[0]) if fits[0] else None,
        fit_theirs=min(fits[1]) if fits[1] else None,
        spearman=spearman(ours, theirs), auroc_ours=auroc(ours, is_ood), auroc_theirs=auroc(theirs, is_ood),
        note=counterpart.differs or "",
    )


# -- data, report ------------------------------------------------------------------------------------------


def load_batches(model: nn.Module, fit_images: int, score_images: int, batch_size: int) -> tuple[list, list, str]:
    """Fashion-MNIST training batches to fit on, test + OOD batches to score (in memory), and the OOD set's name."""
    from timm_ood import data

    bench = data.load_benchmark("fashion-mnist")
    ood_name, ood_set = next(iter(bench.ood.items()))
    half = score_images // 2

    def batches(dataset, count: int) -> list:
        dataset = dataset.select(range(min(count, len(dataset))))
        return list(data.make_loader(dataset, model, batch_size=batch_size))

    scored = batches(bench.id_test, half) + batches(ood_set, score_images - half)
    return batches(bench.id_train, fit_images), scored, ood_name


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"**{value:.3f}**" if value > 1.0 else f"{value:.3f}"


def report(rows: list[Row], missing: list[str], failed: dict[str, str], header: str) -> str:
    lines = [header, "",
             "| timm-ood | pytorch-ood | score s (timm-ood) | score s (pytorch-ood) | score ratio | "
             "fit s (timm-ood) | fit s (pytorch-ood) | fit ratio | Spearman | AUROC timm-ood / pytorch-ood |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.counterpart} | {_seconds(row.score_ours)} | {_seconds(row.score_theirs)} | "
            f"{_ratio(row.score_ratio)} | {_seconds(row.fit_ours)} | {_seconds(row.fit_theirs)} | "
            f"{_ratio(row.fit_ratio)} | {row.spearman:.4f} | {row.auroc_ours:.4f} / {row.auroc_theirs:.4f} |"
        )
    above = [f"{r.name} (score {r.score_ratio:.3f})" for r in rows if (r.score_ratio or 0) > 1.0]
    above += [f"{r.name} (fit {r.fit_ratio:.3f})" for r in rows if (r.fit_ratio or 0) > 1.0]
    lines += ["", f"- ratios above 1.0: {', '.join(above) or 'none'}"]
    differing = [f"  - {r.name}: {r.note}" for r in rows if r.note]
    if differing:
        lines += ["- definitions that differ (scores not expected to agree):", *differing]
    lines.append(f"- not yet available in timm-ood: {', '.join(missing) or 'none'}")
    if failed:
        lines += ["- failed:", *(f"  - {name}: {error}" for name, error in failed.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=("fast", "full"), default="fast",
                        help="fast: the small reference model (test_resnet); full: the reference ResNet-18")
    parser.add_argument("--only", default=None, help="comma-separated timm-ood detector names")
    parser.add_argument("--fit-images", type=int, default=2048)
    parser.add_argument("--score-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock seconds, or this process's CPU seconds (steadier on a shared machine)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    import pytorch_ood

    from timm_ood.reference import FAST_RECIPE, RECIPE, reference_model

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_ood").setLevel(logging.ERROR)  # "No device set. Will use 'cpu'." per fit
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    model = reference_model(FAST_RECIPE if args.recipe == "fast" else RECIPE).eval()
    fit_batches, score_batches, ood_name = load_batches(model, args.fit_images, args.score_images, args.batch_size)
    registered = set(timm_ood.list_detectors())
    names = list(COUNTERPARTS) if args.only is None else args.only.split(",")
    unknown = sorted(set(names) - set(COUNTERPARTS))
    if unknown:
        parser.error(f"no pytorch-ood counterpart for {', '.join(unknown)}; known: {', '.join(COUNTERPARTS)}")
    rows, failed = [], {}
    missing = [name for name in names if name not in registered]
    for name in names:
        if name in missing:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(model, name, COUNTERPARTS[name], fit_batches, score_batches, args.repeats, clock))
        except Exception as error:  # one detector's failure must not hide the others' numbers
            failed[name] = f"{type(error).__name__}: {error}"
    architecture = model.pretrained_cfg.get("architecture")
    header = "\n".join([
        "# Detector speed: timm-ood vs pytorch-ood",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_detectors.py', *sys.argv[1:]])}`",
        "",
        f"Model: {architecture} trained on Fashion-MNIST (`reference_model({'FAST_RECIPE' if args.recipe == 'fast' else 'RECIPE'})`), "
        f"CPU, {args.threads} torch thread(s), {args.clock} clock. Fit: {sum(len(x) for x, _ in fit_batches)} Fashion-MNIST training images; "
        f"score: {sum(len(x) for x, _ in score_batches)} images (half ID test, half {ood_name}), "
        f"batch size {args.batch_size}; best of {args.repeats} interleaved repeats, forward passes included.",
        "",
        f"torch {torch.__version__}, timm-ood {timm_ood.__version__}, pytorch-ood {pytorch_ood.__version__}, "
        f"Python {platform.python_version()}; ratio = timm-ood / pytorch-ood (goal <= 1.0; bold above).",
    ])
    text = report(rows, missing, failed, header)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
