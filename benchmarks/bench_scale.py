"""ImageNet-scale fit and score of timm-ood's feature detectors, against the floors they cannot avoid.

Synthetic outputs of ImageNet's shape (N = 1,281,167 fit rows of D = 2,048
pre-logits features, K = 1,000 classes, 50,000 ID + 50,000 OOD queries) go
through every registered detector that reads only logits / pre-logits, by the
detector contract (``reset_fit`` / ``update_fit`` per chunk / ``next_fit_pass``
/ ``finish_fit``, then ``detector(outputs)`` per query chunk), chunk by chunk
from a seeded generator, so that no N x D tensor exists unless the detector
keeps one (``knn``, ``nnguide``). Features are class-conditional Gaussians
passed through a ReLU, like pooled CNN features; logits come from a real
``nn.Linear(2048, 1000)`` behind a stub with timm's model contract, so the
detectors that read the classifier get it from a real :class:`~timm_ood.tap.Tap`.

Measured in the same run, each job in a fresh process (its peak RSS is its
own: ``/proc/self/status`` VmHWM, reset before each of the detector's calls):

- every detector's fit and score seconds, its own calls only (generating the
  chunks and the logits is timed apart and excluded), and its peak RSS;
- the floor each method cannot avoid, timed in the same process on the same
  chunks right after the detector's update, on one chunk in ``--floor-every``
  and scaled, so that both see the same load on a shared machine: one
  streaming XᵀX in float64 (XᵀX in float32 alongside, for comparison), one
  class-sum ``index_add_``, one projection onto ViM's residual basis, one
  histogram of every activation, one softmax / argmax of the logits; for exact
  nearest neighbours, the plain Q x N product of each query chunk with the
  bank in the bank's dtype (and in float32), in the detector's chunks.
  Ratio = detector seconds / floor seconds. Goals: each streaming fit at most
  1.5 x its floor; exact kNN search at least 0.7 x the throughput of the plain
  product on the same shapes;
- side by side with pytorch-ood, whose ``fit_features`` takes all N x D
  features at once, and timm-ood's streaming fit on the same N; the largest N
  pytorch-ood fits within the budget is extrapolated from its measured peak.

A parent process watches each job's RSS and stops it above ``--memory-budget-gb``
(reported as out of memory), so that no job can take a shared machine's memory.

Usage::

    python benchmarks/bench_scale.py                               # ImageNet shapes: hours on 2 cores
    python benchmarks/bench_scale.py --max-fit-rows 400000 --queries 20000
    python benchmarks/bench_scale.py --detectors mahalanobis,vim --no-pytorch-ood
    python benchmarks/bench_scale.py --quick --in-process          # tiny shapes, seconds (the test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import timm_ood
from timm_ood.detectors import create_detector
from timm_ood.detectors.base import Detector
from timm_ood.errors import IncompatibleModelError
from timm_ood.tap import Need, Outputs, Tap

RESULTS = Path(__file__).resolve().parent / "results" / "scale.md"
IMAGENET_FIT_ROWS = 1_281_167

#: Hyperparameters different from the defaults, and why.
OPTIONS: dict[str, dict[str, Any]] = {
    # the default covariance="full" keeps K x D x D float64 moments: 1000 * 2048^2 * 8 bytes = 33.5 GB
    "gmm": {"covariance": "tied"},
}
#: Fit rows at most, for fits slower than the others by design (the ratio to their floor does not depend on N).
ROW_CAPS = {
    # 73 inverse temperatures: the NLL's derivatives take a softmax (and four more passes) of every row's
    # logits per grid point: ~400x one softmax pass (measured), an hour at ImageNet's N on 2 cores
    "temperature-scaling": 32_768,
}
#: The kNN banks measured: (detector, bank dtype, backend).
BANKS: tuple[tuple[str, str, str], ...] = (
    ("knn", "float32", "torch"), ("knn", "float16", "torch"), ("knn", "bfloat16", "torch"),
    ("knn", "float32", "faiss"), ("nnguide", "float32", "torch"), ("nnguide", "float16", "torch"),
)
#: Logit-only detectors scored as a sanity line (the others cost as little and are left out).
LOGIT_SANITY = ("msp", "energy")
#: Floor operations each streaming fit cannot avoid, per fit pass: timed on the same chunks as the fit,
#: right after the detector's update, on every ``--floor-every``-th chunk, and scaled to all of them.
FLOORS: dict[str, tuple[tuple[str, ...], ...]] = {
    "mahalanobis": (("to64", "gram64", "class_sum64"),),
    "rmd": (("to64", "gram64", "class_sum64"),),
    "gmm": (("to64", "gram64", "class_sum64"),),
    "vim": (("to64", "gram64"), ("to64", "project64")),
    "react": (("histogram",),),
    "vra": (("histogram",),),
    "dice": (("to64", "sum64"),),
    "fdbd": (("to64", "sum64"),),
    "nci": (("to64", "sum64"),),
    "she": (("to64", "class_sum64", "argmax"),),
    "kl-matching": (("softmax", "argmax", "logit_class_sum64"),),
    "temperature-scaling": (("softmax",),),
    "openmax": (("argmax", "logit_class_sum64"), ("argmax", "logit_distance64")),
}
#: Operations timed alongside a floor for information (not part of it).
ALONGSIDE = {"mahalanobis": ("gram32",)}
FLOOR_OPS = {
    "to64": "features to float64",
    "gram64": "XᵀX in float64 (addmm_ into a D x D accumulator)",
    "gram32": "XᵀX in float32 (the same in float32; no detector's floor, for comparison)",
    "class_sum64": "class sums in float64 (index_add_ into K x D)",
    "sum64": "column sums in float64",
    "project64": "X @ basis in float64, ViM's D x (D - d) residual basis",
    "histogram": "one 2^16-bin histogram of every activation (torch.histc, float32, its range known)",
    "softmax": "softmax of the logits (float32)",
    "argmax": "argmax of the logits",
    "logit_class_sum64": "class sums of the logits in float64 (index_add_ into K x K)",
    "logit_distance64": "distance of each row's logits to its class's mean logits, in float64",
}
#: Detectors that fit or score in memory that grows beyond the machine at this size, and why.
UNBOUNDED = {
    "gmm (covariance='full')": "per-class covariances K x D x D: 1000 * 2048^2 * 8 bytes = 33.5 GB of float64 "
                               "moments during the fit (mahalanobis.py, ClassStatistics(per_class=True)), the same as state",
}


# -- pytorch-ood's counterparts, built from our classifier and detector ----------------------------------------


@dataclass(frozen=True)
class Counterpart:
    """How pytorch-ood fits and scores one of our detectors from arrays held at once.

    Attributes:
        cls: the class name in ``pytorch_ood.detector``.
        build: ``(classifier, our_detector) -> pytorch-ood detector``.
        takes: ``"features"`` (fit_features / predict_features), ``"maps"`` (the
            features as [N, D, 1, 1] maps: fit_feature_maps / predict_feature_maps) or
            ``"logits"`` (fit_logits / predict_logits).
    """

    cls: str
    build: Callable[[nn.Linear, Detector], Any]
    takes: str = "features"


def _pood(name: str) -> Any:
    import pytorch_ood.detector

    return getattr(pytorch_ood.detector, name)


def _maps_head(classifier: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda maps: classifier(maps.flatten(1))


def _vim_dim(classifier: nn.Linear, detector: Detector) -> int:
    from timm_ood.detectors.classifier_geometry import vim_principal_dim

    return vim_principal_dim(classifier.in_features, detector.principal_dim)


COUNTERPARTS: dict[str, Counterpart] = {
    "mahalanobis": Counterpart("Mahalanobis", lambda c, d: _pood("Mahalanobis")(None)),
    "rmd": Counterpart("RMD", lambda c, d: _pood("RMD")(None)),
    "vim": Counterpart("ViM", lambda c, d: _pood("ViM")(None, d=_vim_dim(c, d), w=c.weight, b=c.bias)),
    "she": Counterpart("SHE", lambda c, d: _pood("SHE")(None, c)),
    "dice": Counterpart("DICE", lambda c, d: _pood("DICE")(None, w=c.weight, b=c.bias, p=float(d.p) / 100)),
    "fdbd": Counterpart("fDBD", lambda c, d: _pood("fDBD")(None, c)),
    "nci": Counterpart("NCI", lambda c, d: _pood("NCI")(None, c, alpha=d.alpha)),
    "react": Counterpart("ReAct", lambda c, d: _pood("ReAct")(None, _maps_head(c), percentile=float(d.percentile) / 100),
                         takes="maps"),
    "vra": Counterpart("VRA", lambda c, d: _pood("VRA")(
        None, _maps_head(c), lower_percentile=float(d.lower_percentile) / 100,
        upper_percentile=float(d.upper_percentile) / 100), takes="maps"),
    "kl-matching": Counterpart("KLMatching", lambda c, d: _pood("KLMatching")(None), takes="logits"),
    "temperature-scaling": Counterpart("TemperatureScaling", lambda c, d: _pood("TemperatureScaling")(None),
                                       takes="logits"),
    "openmax": Counterpart("OpenMax", lambda c, d: _pood("OpenMax")(
        None, tailsize=d.tail_size, alpha=d.alpha, euclid_weight=1 / 201), takes="logits"),
    "knn": Counterpart("KNN", lambda c, d: _pood("KNN")(None, k=d.k)),
    "nnguide": Counterpart("NNGuide", lambda c, d: _pood("NNGuide")(None, c, k=d.k)),
}
#: pytorch-ood fit rows at most, where its fit is too slow for the run (both sides then fit on that N).
POOD_ROW_CAPS = {
    # OpenMax's fit (per-class Weibull fits in Python) took 153 s for N = 16,384 and K = 1,000 on 2 loaded cores
    "openmax": 16_384,
}
#: pytorch-ood fit memory that does not grow with N, in MB, read from its source (for the largest N in budget).
POOD_FIXED_MB: dict[str, Callable[[Shapes], float]] = {
    # fDBD._precompute_denom_matrix: w[:, None] - w[None] is one K x K x D float32 tensor (8.2 GB at ImageNet's)
    "fdbd": lambda shapes: shapes.classes ** 2 * shapes.dim * 4 / 2**20,
}
#: Counterparts not run, and why.
POOD_SKIPPED = {
    "gmm": "pytorch-ood's GMM keeps a full covariance per class in float64 on the CPU: K x D x D = 33.5 GB",
}


# -- synthetic ImageNet-shaped outputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """Sizes of one run. ``queries`` and ``bank_queries`` count each side (ID and OOD)."""

    dim: int = 2048
    classes: int = 1000
    fit_rows: int = IMAGENET_FIT_ROWS
    queries: int = 50_000
    bank_rows: int = 200_000
    bank_queries: int = 5_000
    pood_rows: int = 262_144
    pood_queries: int = 16
    chunk_rows: int = 4096
    floor_every: int = 4
    seed: int = 0


class Stub(nn.Module):
    """timm's model contract over pre-logits inputs: ``forward_features`` is the identity, the head one Linear."""

    def __init__(self, classifier: nn.Linear) -> None:
        super().__init__()
        self.fc = classifier
        self.num_classes = classifier.out_features
        self.num_features = classifier.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _no_images(rows: int) -> torch.Tensor | None:
    """No images: ``None`` where :class:`Outputs` takes outputs without images, else a free [B, 1, 1, 1] stand-in."""
    if "_inputs" in Outputs.__slots__:
        return None
    return torch.zeros(1, 1, 1, 1).expand(rows, 1, 1, 1)  # only its batch size is read


class SyntheticOutputs(Outputs):
    """:class:`Outputs` of one chunk whose logits are computed on first read, and that time spent.

    Logits are given only when the detector declares ``Need.LOGITS`` (as the tap
    does); the classifier product they cost is generation, not the detector's time.
    """

    __slots__ = ("_make_logits", "logit_seconds")

    def __init__(self, features: torch.Tensor, tap: Tap, needs: frozenset[Need],
                 make_logits: Callable[[], torch.Tensor]) -> None:
        super().__init__(_no_images(len(features)), tap, pre_logits=features if Need.PRE_LOGITS in needs else None)
        self._make_logits = make_logits if Need.LOGITS in needs else None
        self.logit_seconds = 0.0

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None and self._make_logits is not None:
            start = time.perf_counter()
            self._logits = self._make_logits()
            self.logit_seconds += time.perf_counter() - start
        return super().logits


class Synthetic:
    """Seeded ImageNet-shaped outputs, chunk by chunk: the same chunks in every process.

    ID features of class y: ``relu(μ_y + ε)``, ``μ_y ~ N(0, 0.1² I)``, ``ε ~ N(0, I)``
    (half the activations 0, mean 0.4, like pooled ResNet features); OOD
    features the same around 1000 other means. Labels are uniform. The linear
    classifier's rows are the centred class means scaled to norm 8, its bias
    centres the logits (about 73% top-1, mean max-softmax 0.87).
    """

    SPREAD, WEIGHT_NORM = 0.1, 8.0
    SPLITS: ClassVar[dict[str, int]] = {"fit": 1, "id": 2, "ood": 3}

    def __init__(self, shapes: Shapes) -> None:
        self.shapes = shapes
        generator = torch.Generator().manual_seed(shapes.seed)
        dim, classes = shapes.dim, shapes.classes
        self.means = torch.randn(classes, dim, generator=generator) * self.SPREAD
        self.ood_means = torch.randn(classes, dim, generator=generator) * self.SPREAD
        centred = self.means - self.means.mean(0)
        weight = centred / centred.norm(dim=1, keepdim=True) * self.WEIGHT_NORM
        normal = torch.distributions.Normal(0.0, 1.0)
        expected = (self.means * normal.cdf(self.means) + normal.log_prob(self.means).exp()).mean(0)
        self.classifier = nn.Linear(dim, classes)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(-(weight @ expected))
        self.classifier.requires_grad_(False)
        self.tap = Tap(Stub(self.classifier).eval())
        self.generate_seconds = 0.0

    def chunk(self, split: str, index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [rows, D] float32 and labels [rows] of chunk ``index`` of ``split``."""
        start = time.perf_counter()
        seed = ((self.shapes.seed * 7 + self.SPLITS[split]) << 32) + index
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(self.shapes.classes, (rows,), generator=generator)
        means = self.ood_means if split == "ood" else self.means
        features = torch.randn(rows, self.shapes.dim, generator=generator).add_(means[labels]).relu_()
        self.generate_seconds += time.perf_counter() - start
        return features, labels

    def chunks(self, split: str, rows: int, desc: str = "", quiet: bool = False
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.shapes.chunk_rows
        for index in tqdm(range(math.ceil(rows / size)), desc=desc or split, leave=False, mininterval=10,
                          disable=quiet, file=sys.stderr):
            yield self.chunk(split, index, min(size, rows - index * size))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.classifier.weight, self.classifier.bias)

    def outputs(self, features: torch.Tensor, needs: frozenset[Need]) -> SyntheticOutputs:
        return SyntheticOutputs(features, self.tap, needs, lambda: self.logits(features))

    def logit_chunks(self, split: str, rows: int, desc: str = "", quiet: bool = False
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Features, labels and logits (the classifier's time counted as generation)."""
        for features, labels in self.chunks(split, rows, desc, quiet):
            start = time.perf_counter()
            logits = self.logits(features)
            self.generate_seconds += time.perf_counter() - start
            yield features, labels, logits


# -- peak memory ---------------------------------------------------------------------------------------------


def _status_kb(field_name: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def reset_peak() -> float:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0); that RSS in MB."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return rss_mb()


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


# -- jobs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One measurement, run in a fresh process.

    Attributes:
        kind: ``"timm"`` (one of our detectors, its floors timed alongside) or ``"pood"``
            (pytorch-ood's counterpart of one).
        name: the detector's registered name.
        options: its hyperparameters.
        rows: fit rows (the bank for kNN).
        queries: query rows per side (ID and OOD).
        tag: which table the result goes to.
    """

    kind: str
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    queries: int = 0
    tag: str = ""

    @property
    def label(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        name = self.name or self.kind
        return f"{name} ({options})" if options else name


def time_floor_ops(names: tuple[str, ...], features: torch.Tensor, labels: torch.Tensor,
                   outputs: SyntheticOutputs, data: Synthetic) -> dict[str, float]:
    """Seconds of each floor operation on one chunk; buffers are allocated untimed and freed after."""
    from timm_ood.detectors.classifier_geometry import vim_principal_dim

    dim, classes = data.shapes.dim, data.shapes.classes
    seconds: dict[str, float] = {}
    x64 = None
    for name in names:
        if name == "to64":
            start = time.perf_counter()
            x64 = features.double()
        else:
            x = features.double() if x64 is None and name.endswith("64") else x64
            if name == "gram64":
                buffer = torch.zeros(dim, dim, dtype=torch.float64)
                start = time.perf_counter()
                buffer.addmm_(x.T, x)
            elif name == "gram32":
                buffer = torch.zeros(dim, dim)
                start = time.perf_counter()
                buffer.addmm_(features.T, features)
            elif name == "class_sum64":
                buffer = torch.zeros(classes, dim, dtype=torch.float64)
                start = time.perf_counter()
                buffer.index_add_(0, labels, x)
            elif name == "sum64":
                start = time.perf_counter()
                x.sum(0)
            elif name == "project64":
                basis = torch.rand(dim, dim - vim_principal_dim(dim), dtype=torch.float64)
                buffer = torch.empty(len(x), basis.shape[1], dtype=torch.float64)
                start = time.perf_counter()
                torch.mm(x, basis, out=buffer)
            elif name == "histogram":
                top = float(data.means.max()) + 8  # above every activation: relu(μ + ε), |ε| < 8
                start = time.perf_counter()
                torch.histc(features, bins=2**16, min=0, max=top)
            elif name in ("softmax", "argmax"):
                logits = outputs.logits  # computed here if the detector did not read them (generation)
                start = time.perf_counter()
                torch.softmax(logits, dim=1) if name == "softmax" else logits.argmax(dim=1)
            elif name == "logit_class_sum64":
                logits = outputs.logits
                buffer = torch.zeros(classes, logits.shape[1], dtype=torch.float64)
                start = time.perf_counter()
                buffer.index_add_(0, labels, logits.double())
            elif name == "logit_distance64":
                logits = outputs.logits
                means = torch.rand(classes, logits.shape[1], dtype=torch.float64)
                start = time.perf_counter()
                (logits.double() - means[labels]).norm(dim=1)
            else:
                raise ValueError(f"unknown floor operation {name!r}")
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return seconds


def _fit(detector: Detector, data: Synthetic, rows: int, every: int, quiet: bool) -> dict[str, Any]:
    """Fit by the contract, chunk by chunk, its floor timed on every ``every``-th chunk right after it.

    Returns the detector's seconds, its peak RSS (high-water mark over its own calls), and the floor
    operations' seconds scaled from the chunks they were timed on to all of them.
    """
    requirements = detector.requirements
    needs = frozenset(requirements.outputs_for_fit)
    floors = FLOORS.get(detector.name, ())
    seconds, peak, finish, paired = 0.0, 0.0, 0.0, 0.0
    scaled: dict[str, float] = {}  # floor operations' seconds scaled to all chunks
    sampled_ops: dict[str, float] = {}  # the same, on the chunks they were timed on

    def call(method: Callable[[], Any]) -> float:
        nonlocal peak
        reset_peak()
        start = time.perf_counter()
        method()
        elapsed = time.perf_counter() - start
        peak = max(peak, peak_mb())
        return elapsed

    with torch.no_grad():
        finish += call(lambda: detector.reset_fit(data.tap))
        for index in range(requirements.fit_passes):
            desc = f"fit {detector.name}" + (f" pass {index + 1}" if requirements.fit_passes > 1 else "")
            ops = floors[index] if index < len(floors) else ()
            if ops and index == 0:
                ops += ALONGSIDE.get(detector.name, ())
            timed: dict[str, float] = {}
            sampled = 0
            for position, (features, labels) in enumerate(data.chunks("fit", rows, desc, quiet)):
                outputs = data.outputs(features, needs)
                given = labels if requirements.fit_labels else None
                update = call(lambda o=outputs, y=given: detector.update_fit(o, y)) - outputs.logit_seconds
                seconds += update
                if ops and position % every == 0:
                    paired += update
                    for name, elapsed in time_floor_ops(ops, features, labels, outputs, data).items():
                        timed[name] = timed.get(name, 0.0) + elapsed
                    sampled += len(features)
                data.generate_seconds += outputs.logit_seconds
            for name, elapsed in timed.items():
                scaled[name] = scaled.get(name, 0.0) + elapsed * rows / sampled
                sampled_ops[name] = sampled_ops.get(name, 0.0) + elapsed
            last = index + 1 == requirements.fit_passes
            finish += call(detector.finish_fit if last else detector.next_fit_pass)
        detector.is_fitted = True
    floor = _floor_total(floors, scaled) if floors else None
    return {"fit_seconds": seconds + finish, "finish_seconds": finish, "peak_fit_mb": peak, "floor_ops": scaled,
            "floor_seconds": floor, "paired_ratio": paired / _floor_total(floors, sampled_ops) if floors else None}


def _floor_total(floors: tuple[tuple[str, ...], ...], scaled: dict[str, float]) -> float:
    """The floor: every listed operation of every pass (an op listed in two passes was timed in both)."""
    return sum(scaled[name] for name in {name for ops in floors for name in ops})


def time_products(queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int) -> dict[str, float]:
    """One plain product of ``queries`` with the bank, chunked as the detector chunks it, per dtype.

    In the bank's dtype on a quarter of its rows (an eighth for float16, whose CPU product is slow)
    and, for a bank stored narrower, in float32 on a quarter converted untimed; scaled to all rows.
    """
    rows = len(bank)
    seconds: dict[str, float] = {}
    dtypes = [bank.dtype] + ([torch.float32] if bank.dtype != torch.float32 else [])
    for dtype in dtypes:
        share = max(1, rows // (8 if dtype == torch.float16 else 4))
        block = bank[:share] if dtype == bank.dtype else bank[:share].to(dtype)
        query = queries.to(dtype)
        step = max(1, min(chunk_elements // len(query), chunk_elements // bank.shape[1]))  # as the detector
        out = torch.empty(len(query), min(step, share), dtype=dtype)
        start = time.perf_counter()
        for first in range(0, share, step):
            part = block[first:first + step]
            torch.mm(query, part.T, out=out[:, :len(part)])
        seconds[f"product_{str(dtype).removeprefix('torch.')}"] = (time.perf_counter() - start) * rows / share
        del block, out
    return seconds


def _score(detector: Detector, data: Synthetic, queries: int, quiet: bool) -> dict[str, Any]:
    """Score ID and OOD queries; a bank detector's plain products timed after each chunk."""
    from timm_ood.detectors import neighbours

    needs = frozenset(detector.requirements.outputs)
    bank = getattr(detector, "bank", None)
    chunk_elements = getattr(neighbours, "CHUNK_ELEMENTS", 1 << 26)
    seconds, peak, scores, is_ood, products = 0.0, 0.0, [], [], {}
    warm_up = None
    with torch.no_grad():
        if isinstance(bank, torch.Tensor):  # what the first search builds (faiss's index), timed apart
            features, _ = data.chunk("id", 10**6, 1)
            start = time.perf_counter()
            detector(data.outputs(features, needs))
            warm_up = time.perf_counter() - start
        for split in ("id", "ood"):
            for features, _ in data.chunks(split, queries, f"score {detector.name} {split}", quiet):
                outputs = data.outputs(features, needs)
                reset_peak()
                start = time.perf_counter()
                scores.append(detector(outputs))
                seconds += time.perf_counter() - start - outputs.logit_seconds
                peak = max(peak, peak_mb())
                data.generate_seconds += outputs.logit_seconds
                is_ood.append(torch.full((len(features),), split == "ood"))
                if isinstance(bank, torch.Tensor):
                    for name, elapsed in time_products(F.normalize(features, dim=1), bank, chunk_elements).items():
                        products[name] = products.get(name, 0.0) + elapsed
    result = {"score_seconds": seconds, "peak_score_mb": peak,
              "auroc": _auroc(torch.cat(scores).to(torch.float64), torch.cat(is_ood))}
    if products:
        result.update(products=products, warm_up_seconds=warm_up)
    return result


def _auroc(scores: torch.Tensor, is_ood: torch.Tensor) -> float | None:
    from timm_ood.metrics import auroc

    if not bool(torch.isfinite(scores).all()):
        return None
    return float(auroc(scores, is_ood))


def run_timm(job: Job, data: Synthetic, quiet: bool) -> dict[str, Any]:
    detector = create_detector(job.name, **job.options)
    detector.check_model(data.tap)
    result: dict[str, Any] = {"rss_start_mb": rss_mb(), "fit_seconds": None, "peak_fit_mb": None}
    if detector.requirements.fit:
        result.update(_fit(detector, data, job.rows, data.shapes.floor_every, quiet))
        bank = getattr(detector, "bank", None)
        if isinstance(bank, torch.Tensor):
            result["bank_mb"] = bank.numel() * bank.element_size() / 2**20
    if job.queries:
        result.update(_score(detector, data, job.queries, quiet))
    result["hyperparameters"] = {k: repr(v) for k, v in detector.hyperparameters().items()}
    return result


def run_pood(job: Job, data: Synthetic, quiet: bool) -> dict[str, Any]:
    """pytorch-ood's counterpart: every fit row built into one tensor (its API), then fit and score timed."""
    counterpart = COUNTERPARTS[job.name]
    ours = create_detector(job.name, **job.options)
    detector = counterpart.build(data.classifier, ours)
    dim, classes, rows = data.shapes.dim, data.shapes.classes, job.rows
    width = classes if counterpart.takes == "logits" else dim
    held = torch.empty(rows, width)
    labels = torch.empty(rows, dtype=torch.long)
    start_row = 0
    for features, y in data.chunks("fit", rows, f"hold {job.name}", quiet):
        block = data.logits(features) if counterpart.takes == "logits" else features
        held[start_row:start_row + len(y)] = block
        labels[start_row:start_row + len(y)] = y
        start_row += len(y)
    if counterpart.takes == "maps":
        held = held[:, :, None, None]
    fit = {"features": "fit_features", "maps": "fit_feature_maps", "logits": "fit_logits"}[counterpart.takes]
    predict = {"features": "predict_features", "maps": "predict_feature_maps",
               "logits": "predict_logits"}[counterpart.takes]
    result: dict[str, Any] = {"rss_start_mb": reset_peak(),
                              "held_mb": held.numel() * held.element_size() / 2**20}
    with torch.no_grad():
        start = time.perf_counter()
        getattr(detector, fit)(held, labels)
        result["fit_seconds"] = time.perf_counter() - start
    result["peak_fit_mb"] = peak_mb()
    del held, labels
    reset_peak()
    seconds, scores, is_ood = 0.0, [], []
    with torch.no_grad():
        for split in ("id", "ood"):
            for features, _ in data.chunks(split, job.queries, f"score {job.name} {split}", quiet):
                block = data.logits(features) if counterpart.takes == "logits" else features
                if counterpart.takes == "maps":
                    block = block[:, :, None, None]
                start = time.perf_counter()
                scores.append(torch.as_tensor(getattr(detector, predict)(block)).flatten())
                seconds += time.perf_counter() - start
                is_ood.append(torch.full((len(features),), split == "ood"))
    result.update(score_seconds=seconds, peak_score_mb=peak_mb(),
                  auroc=_auroc(torch.cat(scores).to(torch.float64), torch.cat(is_ood)))
    return result


RUNNERS = {"timm": run_timm, "pood": run_pood}


def run_job(job: Job, shapes: Shapes, quiet: bool = False) -> dict[str, Any]:
    """Run one job in this process: its result, with the seconds spent generating data."""
    torch.manual_seed(shapes.seed)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_ood").setLevel(logging.ERROR)
    data = Synthetic(shapes)
    data.chunk("fit", 0, min(64, shapes.chunk_rows))  # warm the generator and the allocator
    data.generate_seconds = 0.0
    start = time.perf_counter()
    result = RUNNERS[job.kind](job, data, quiet)
    result.update(generate_seconds=data.generate_seconds, wall_seconds=time.perf_counter() - start)
    return result


def run_isolated(job: Job, shapes: Shapes, budget_mb: float, timeout: float) -> dict[str, Any]:
    """Run one job in a fresh Python process, stopped when its RSS exceeds ``budget_mb`` or after ``timeout``."""
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "result.json"
        spec = json.dumps({"job": asdict(job), "shapes": asdict(shapes)})
        process = subprocess.Popen([sys.executable, __file__, "--job", spec, "--result", str(result_path)])
        largest, start, stopped = 0.0, time.perf_counter(), None
        try:
            while process.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    largest = max(largest, _status_kb("VmRSS", process.pid) / 1024)
                if largest > budget_mb:
                    stopped = f"out of memory: RSS passed the {budget_mb / 1024:.1f} GB budget"
                elif time.perf_counter() - start > timeout:
                    stopped = f"stopped after the {timeout:.0f} s time limit"
                if stopped:
                    break
                time.sleep(0.2)
        finally:  # stopped, or the benchmark itself interrupted: the child goes too
            if process.poll() is None:
                process.kill()
                process.wait()
        if stopped:
            return {"error": stopped, "watched_peak_mb": largest}
        if process.returncode != 0 or not result_path.exists():
            return {"error": f"exit status {process.returncode}", "watched_peak_mb": largest}
        result = json.loads(result_path.read_text())
        result["watched_peak_mb"] = largest
        return result


# -- which detectors ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The registered detectors sorted into what is measured and what is not (with why)."""

    fits: list[str] = field(default_factory=list)
    score_only: list[str] = field(default_factory=list)
    logit_sanity: list[str] = field(default_factory=list)
    banks: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def plan_detectors(selected: list[str] | None, tap: Tap, with_plugins: bool) -> Plan:
    """Sort every registered detector (or the ``selected`` ones) by what it reads and what it keeps."""
    plan = Plan()
    names = timm_ood.list_detectors() if selected is None else selected
    for name in names:
        try:
            detector = create_detector(name, **OPTIONS.get(name, {}))
        except Exception as error:  # a broken plugin must not stop the benchmark
            plan.excluded[name] = f"cannot be created: {type(error).__name__}: {error}"
            continue
        requirements = detector.requirements
        needs = set(requirements.outputs) | set(requirements.outputs_for_fit)
        plugin = not type(detector).__module__.startswith("timm_ood.")
        if requirements.input_gradients:
            plan.excluded[name] = "runs its own input-gradient passes: needs images and a real backbone"
        elif needs & {Need.FEATURES, Need.INTERMEDIATES}:
            plan.excluded[name] = "reads feature maps / intermediate layers, which pre-logits outputs do not have"
        elif not needs:
            plan.excluded[name] = "reads nothing of the shared forward: runs its own passes on the images"
        else:
            try:
                detector.check_model(tap)
            except IncompatibleModelError as error:
                plan.excluded[name] = f"refuses a plain linear classifier: {error}"
                continue
            if plugin and not (with_plugins or selected is not None):
                plan.excluded[name] = (
                    f"plugin ({type(detector).__module__.split('.')[0]}): streams moments and a bounded "
                    "reservoir (<= 2 x reservoir_size rows), then fits a scikit-learn estimator on that "
                    "sample; its time is scikit-learn's and has no XᵀX-like floor (run with --plugins)")
            elif name in ("knn", "nnguide"):
                plan.banks.append(name)
            elif requirements.fit:
                (plan.plugins if plugin else plan.fits).append(name)
            elif needs == {Need.LOGITS}:
                if name in LOGIT_SANITY or selected is not None:
                    plan.logit_sanity.append(name)
                else:
                    plan.excluded[name] = "logits only, no fit: costs as little as msp and energy (measured)"
            else:
                plan.score_only.append(name)
    if selected is None or "gmm" in selected:
        plan.excluded.update(UNBOUNDED)
    return plan


def build_jobs(plan: Plan, shapes: Shapes, pytorch_ood: bool) -> list[Job]:
    jobs = []
    for name in plan.fits + plan.plugins:
        rows = min(shapes.fit_rows, ROW_CAPS.get(name, shapes.fit_rows))
        jobs.append(Job("timm", name, OPTIONS.get(name, {}), rows, shapes.queries, tag="fit"))
    for name in plan.score_only + plan.logit_sanity:
        jobs.append(Job("timm", name, OPTIONS.get(name, {}), 0, shapes.queries, tag="score"))
    if plan.banks:
        for name, dtype, backend in BANKS:
            if name not in plan.banks or (backend == "faiss" and not _faiss_available()):
                continue
            jobs.append(Job("timm", name, {"bank_dtype": dtype, "backend": backend}, shapes.bank_rows,
                            shapes.bank_queries, tag="bank"))
    if pytorch_ood:
        compared = [n for n in plan.fits if n in COUNTERPARTS]
        for name in compared:
            rows = min(shapes.pood_rows, ROW_CAPS.get(name, shapes.pood_rows), POOD_ROW_CAPS.get(name, shapes.pood_rows))
            if rows != min(shapes.fit_rows, ROW_CAPS.get(name, shapes.fit_rows)):
                jobs.append(Job("timm", name, OPTIONS.get(name, {}), rows, 0, tag="pood-ours"))
            jobs.append(Job("pood", name, OPTIONS.get(name, {}), rows, shapes.pood_queries, tag="pood"))
        for name in plan.banks:
            options = {"bank_dtype": "float32", "backend": "torch"}
            jobs.append(Job("pood", name, options, shapes.bank_rows, shapes.bank_queries, tag="pood-bank"))
    return jobs


def _faiss_available() -> bool:
    from timm_ood.detectors import neighbours

    available = getattr(neighbours, "faiss_available", None)
    return bool(available()) if available is not None else False


# -- the report -----------------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _peak(result: dict[str, Any], key: str) -> str:
    """Peak RSS in MB and, in brackets, its increase over the RSS the job started the fit with."""
    value, start = result.get(key), result.get("rss_start_mb")
    if value is None:
        return "—"
    return f"{value:,.0f}" if start is None else f"{value:,.0f} (+{max(value - start, 0):,.0f})"


def _ratio(value: float | None, goal: float, above: bool) -> str:
    if value is None:
        return "—"
    missed = value < goal if above else value > goal
    return f"**{value:.2f}**" if missed else f"{value:.2f}"


def _machine_line() -> str:
    from timm_ood._runtime import _cpu_model

    memory = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        memory = int(handle.readline().split()[1])
    try:
        import pytorch_ood

        pood = f", pytorch-ood {pytorch_ood.__version__}"
    except ImportError:
        pood = ""
    return (f"Machine: {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{memory / 2**20:.0f} GB RAM; torch {torch.__version__}, timm-ood {timm_ood.__version__}{pood}, "
            f"Python {platform.python_version()}.")


def report(results: list[tuple[Job, dict[str, Any]]], plan: Plan, shapes: Shapes, command: str,
           budget_mb: float, total_seconds: float) -> str:
    by_tag: dict[str, list[tuple[Job, dict[str, Any]]]] = {}
    for job, result in results:
        by_tag.setdefault(job.tag, []).append((job, result))
    lines = [
        "# ImageNet-scale fit and score: timm-ood's feature detectors against their floors",
        "",
        f"Command: `{command}`",
        "",
        _machine_line(),
        "",
        f"Synthetic outputs: D = {shapes.dim:,} pre-logits features, K = {shapes.classes:,} classes; fit on "
        f"N = {shapes.fit_rows:,} rows, scored on {shapes.queries:,} ID + {shapes.queries:,} OOD queries, in "
        f"chunks of {shapes.chunk_rows:,} rows. kNN banks: N = {shapes.bank_rows:,}, {shapes.bank_queries:,} + "
        f"{shapes.bank_queries:,} queries. pytorch-ood: N = {shapes.pood_rows:,}, {shapes.pood_queries:,} + "
        f"{shapes.pood_queries:,} queries. Each job runs in a fresh process. Seconds are the detector's own "
        "calls (generating features and logits is timed apart: column `generate s`). Floors are timed in the "
        f"same process on the same chunks, right after the detector's update, on one chunk in "
        f"{shapes.floor_every}, and scaled to all chunks, so that both see the same load on a shared machine. "
        "Peak = RSS high-water mark over the detector's own calls (VmHWM reset before each), Python and torch "
        "included; in brackets its increase over the RSS before the fit. Memory budget per job "
        f"{budget_mb / 1024:.1f} GB; the whole run took "
        f"{total_seconds / 60:.1f} min.",
        "",
    ]
    fits = by_tag.get("fit", [])
    if fits:
        lines += [f"## Streaming fits, N = {shapes.fit_rows:,}", "",
                  "Ratio at N: fit seconds (finish included) / floor seconds. Paired: the detector's updates / "
                  "the floor on the chunks where both were timed, back to back (robust to the load of a shared "
                  f"machine). At N = {IMAGENET_FIT_ROWS:,}: the ratio measured there, or, for a smaller N, the "
                  "paired ratio plus the finish (a fixed cost: pseudo-inverse, eigendecomposition, Weibull fits) "
                  "over the floor scaled to ImageNet's N; the goal is read there.", "",
                  "| detector | fit s | finish s | floor | floor s | ratio at N | paired | "
                  f"ratio at N = {IMAGENET_FIT_ROWS:,} (goal <= 1.5) | peak fit MB | generate s | "
                  f"score s ({2 * shapes.queries:,} queries) | peak score MB | AUROC |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for job, result in fits:
            label = job.label if job.rows == shapes.fit_rows else f"{job.label}, N = {job.rows:,}"
            if "error" in result:
                lines.append(f"| {label} | {result['error']} | | | | | | | > {_mb(result.get('watched_peak_mb'))} "
                             "| | | | |")
                continue
            floor, paired, finish = result.get("floor_seconds"), result.get("paired_ratio"), result.get("finish_seconds")
            ratio = result["fit_seconds"] / floor if floor else None
            projected = (paired + finish * job.rows / (floor * IMAGENET_FIT_ROWS)
                         if floor and paired is not None and finish is not None else None)
            if job.rows >= IMAGENET_FIT_ROWS:  # measured there: nothing to project
                projected = ratio
            ops = " + ".join(" + ".join(p) for p in FLOORS.get(job.name, ())) or "—"
            lines.append(
                f"| {label} | {_s(result['fit_seconds'])} | {_s(finish)} | {ops} | {_s(floor)} | "
                f"{_ratio(ratio, 1.5, above=False)} | {_ratio(paired, 1.5, above=False)} | "
                f"{_ratio(projected, 1.5, above=False)} | {_peak(result, 'peak_fit_mb')} | "
                f"{_s(result.get('generate_seconds'))} | {_s(result.get('score_seconds'))} | "
                f"{_peak(result, 'peak_score_mb')} | {_s(result.get('auroc'), 4)} |")
        measured = [op for op in FLOOR_OPS if any(op in r.get("floor_ops", {}) for _, r in fits)]
        lines += ["", f"Floor operations, seconds over all N rows (timed on one chunk in {shapes.floor_every} "
                  "of that detector's job, scaled):", "",
                  "| job | " + " | ".join(measured) + " |", "| --- |" + " ---: |" * len(measured)]
        for job, result in fits:
            ops = result.get("floor_ops") or {}
            if ops:
                lines.append(f"| {job.label} | " + " | ".join(_s(ops.get(op)) for op in measured) + " |")
        lines += [""] + [f"- {op}: {FLOOR_OPS[op]}" for op in measured] + [""]
    if "score" in by_tag:
        lines += [f"## Detectors without a fit ({2 * shapes.queries:,} queries)", "",
                  "| detector | score s | queries / s | peak score MB | AUROC |", "| --- | ---: | ---: | ---: | ---: |"]
        for job, result in by_tag["score"]:
            if "error" in result:
                lines.append(f"| {job.label} | {result['error']} | | | |")
                continue
            rate = 2 * job.queries / result["score_seconds"] if result["score_seconds"] else None
            lines.append(f"| {job.label} | {_s(result['score_seconds'])} | {_mb(rate)} | "
                         f"{_peak(result, 'peak_score_mb')} | {_s(result.get('auroc'), 4)} |")
        lines.append("")
    if "bank" in by_tag:
        lines += [f"## Exact nearest-neighbour search, bank N = {shapes.bank_rows:,}, "
                  f"{2 * shapes.bank_queries:,} queries", "",
                  "Floor: the plain product of each query chunk with the bank, in the bank's chunks "
                  "(`torch.mm` into a preallocated output), timed right after the detector's search of the "
                  "same chunk, on a quarter of the bank (an eighth in float16, whose CPU product is slow) and "
                  "scaled. Throughput ratio = product seconds / search seconds (goal >= 0.7), against the "
                  "product in the bank's dtype and against the float32 one. First search: one query, before "
                  "the timed ones (faiss builds its index there).", "",
                  "| detector | bank dtype | backend | fit s | peak fit MB | bank MB | first search s | search s | "
                  "product s (bank dtype) | product s (float32) | ratio vs bank dtype | ratio vs float32 | "
                  "peak search MB | AUROC |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for job, result in by_tag["bank"]:
            dtype, backend = job.options["bank_dtype"], job.options["backend"]
            if "error" in result:
                lines.append(f"| {job.name} | {dtype} | {backend} | {result['error']} | "
                             f"> {_mb(result.get('watched_peak_mb'))} | | | | | | | | | |")
                continue
            search = result.get("score_seconds")
            products = result.get("products", {})
            own, f32 = products.get(f"product_{dtype}"), products.get("product_float32")
            lines.append(
                f"| {job.name} | {dtype} | {backend} | {_s(result['fit_seconds'])} | {_peak(result, 'peak_fit_mb')} | "
                f"{_mb(result.get('bank_mb'))} | {_s(result.get('warm_up_seconds'))} | {_s(search)} | {_s(own)} | {_s(f32)} | "
                f"{_ratio(own / search if own and search else None, 0.7, above=True)} | "
                f"{_ratio(f32 / search if f32 and search else None, 0.7, above=True)} | "
                f"{_peak(result, 'peak_score_mb')} | {_s(result.get('auroc'), 4)} |")
        lines.append("")
    if "pood" in by_tag or "pood-bank" in by_tag:
        lines += _pood_section(by_tag, shapes, budget_mb)
    lines += ["## Not measured", ""]
    lines += [f"- {name}: {why}" for name, why in plan.excluded.items()]
    lines.append("")
    return "\n".join(lines)


def _pood_section(by_tag: dict[str, list[tuple[Job, dict[str, Any]]]], shapes: Shapes,
                  budget_mb: float) -> list[str]:
    ours_at = {(job.name, job.rows): result for job, result in by_tag.get("fit", []) + by_tag.get("pood-ours", [])}
    ours_full = {job.name: result for job, result in by_tag.get("fit", [])}
    ours_bank = {job.name: result for job, result in by_tag.get("bank", [])
                 if job.options == {"bank_dtype": "float32", "backend": "torch"}}
    lines = [f"## Side by side with pytorch-ood, N = {shapes.pood_rows:,} (kNN: the bank's N = {shapes.bank_rows:,})",
             "",
             "pytorch-ood's `fit_features` / `fit_feature_maps` / `fit_logits` take every row at once: its peak "
             "includes the N x D (or N x K) float32 input it needs. Score seconds per 1,000 queries: timm-ood's from "
             "the main run, pytorch-ood's from its own queries. Largest N within the budget: pytorch-ood's peak "
             "grows linearly in N from what it held before reading the rows (plus, for fDBD, its fixed K x K x D "
             "tensor), extrapolated from this run.",
             "",
             "| detector | pytorch-ood | fit s timm-ood | fit s pytorch-ood | fit ratio timm-ood / pytorch-ood | peak fit MB timm-ood | "
             "peak fit MB pytorch-ood | largest N pytorch-ood in budget | score s / 1k queries timm-ood | "
             "score s / 1k pytorch-ood | AUROC timm-ood / pytorch-ood |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for job, result in by_tag.get("pood", []) + by_tag.get("pood-bank", []):
        bank = job.tag == "pood-bank"
        ours = ours_bank.get(job.name) if bank else ours_at.get((job.name, job.rows))
        scored = ours if bank else ours_full.get(job.name)
        cls = COUNTERPARTS[job.name].cls
        name = job.name if job.rows == (shapes.bank_rows if bank else shapes.pood_rows) else f"{job.name}, N = {job.rows:,}"
        if "error" in result:
            lines.append(f"| {name} | {cls} | {_s((ours or {}).get('fit_seconds'))} | {result['error']} | | "
                         f"{_mb((ours or {}).get('peak_fit_mb'))} | > {_mb(result.get('watched_peak_mb'))} | | | | |")
            continue
        fit_ours = (ours or {}).get("fit_seconds")
        ratio = fit_ours / result["fit_seconds"] if fit_ours and result["fit_seconds"] else None
        base = result["rss_start_mb"] - result["held_mb"] + POOD_FIXED_MB.get(job.name, lambda _: 0.0)(shapes)
        slope = (result["peak_fit_mb"] - base) / job.rows
        largest = min(int((budget_mb - base) / slope), 10**9) if slope > 0 else None
        per_k_ours = (1000 * scored["score_seconds"] / (2 * (shapes.bank_queries if bank else shapes.queries))
                      if scored and scored.get("score_seconds") is not None else None)
        per_k_theirs = 1000 * result["score_seconds"] / (2 * job.queries)
        auroc_ours = (scored or {}).get("auroc")
        lines.append(
            f"| {name} | {cls} | {_s(fit_ours)} | {_s(result['fit_seconds'])} | {_s(ratio)} | "
            f"{_mb((ours or {}).get('peak_fit_mb'))} | {_mb(result['peak_fit_mb'])} | "
            f"{'—' if largest is None else f'{largest:,}'} | {_s(per_k_ours, 3)} | {_s(per_k_theirs, 3)} | "
            f"{_s(auroc_ours, 4)} / {_s(result.get('auroc'), 4)} |")
    skipped = [f"{name} ({why})" for name, why in POOD_SKIPPED.items()]
    lines += ["", f"- pytorch-ood skipped: {'; '.join(skipped)}", ""]
    return lines


# -- main -------------------------------------------------------------------------------------------------------


QUICK = Shapes(dim=64, classes=10, fit_rows=1500, queries=100, bank_rows=600, bank_queries=50, pood_rows=800,
               pood_queries=40, chunk_rows=256, floor_every=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-fit-rows", type=int, default=IMAGENET_FIT_ROWS,
                        help="fit rows of the streaming detectors (ImageNet: 1,281,167)")
    parser.add_argument("--queries", type=int, default=50_000, help="ID queries, and as many OOD ones")
    parser.add_argument("--bank-rows", type=int, default=200_000, help="rows of the knn / nnguide banks")
    parser.add_argument("--bank-queries", type=int, default=5_000, help="ID (and OOD) queries of the banks")
    parser.add_argument("--pytorch-ood-rows", type=int, default=262_144,
                        help="fit rows on both sides of the pytorch-ood comparison")
    parser.add_argument("--pytorch-ood-queries", type=int, default=16,
                        help="ID (and OOD) queries pytorch-ood scores (its Mahalanobis and RMD take a D x D product per class)")
    parser.add_argument("--chunk-rows", type=int, default=4096, help="rows per update_fit / scoring call")
    parser.add_argument("--floor-every", type=int, default=4, help="time the floors on every n-th fit chunk")
    parser.add_argument("--detectors", default=None, help="comma-separated registered names (default: all)")
    parser.add_argument("--plugins", action="store_true", help="also the plugin detectors (scikit-learn ones)")
    parser.add_argument("--no-pytorch-ood", action="store_true", help="skip the pytorch-ood comparison")
    parser.add_argument("--memory-budget-gb", type=float, default=12.0,
                        help="a job whose RSS passes this is stopped and reported out of memory")
    parser.add_argument("--job-timeout", type=float, default=1200.0, help="seconds before a job is stopped")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (D=64, K=10), for the test")
    parser.add_argument("--in-process", action="store_true",
                        help="run the jobs in this process (no isolation: peaks include earlier jobs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the markdown goes")
    parser.add_argument("--raw", type=Path, default=None,
                        help="also write every measurement as JSON here (after each job)")
    parser.add_argument("--render", type=Path, default=None,
                        help="measure nothing: write the markdown of a --raw file")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _measuring(argv: list[str]) -> list[str]:
    """The arguments that decide what is measured (without where the results are written)."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument in ("--out", "--raw"):
            skip = True
        elif not argument.startswith(("--out=", "--raw=")):
            kept.append(argument)
    return kept


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.job:  # a child: one job, its result as JSON
        spec = json.loads(args.job)
        result = run_job(Job(**spec["job"]), Shapes(**spec["shapes"]))
        args.result.write_text(json.dumps(result))
        return ""
    if args.render:
        raw = json.loads(args.render.read_text())
        plan = Plan(**raw["plan"])
        results = [(Job(**job), result) for job, result in raw["results"]]
        text = report(results, plan, Shapes(**raw["shapes"]), raw["command"], raw["budget_mb"], raw["seconds"])
        args.out.write_text(text)
        return text
    shapes = QUICK if args.quick else Shapes()
    if not args.quick:
        shapes = replace(shapes, fit_rows=args.max_fit_rows, queries=args.queries, bank_rows=args.bank_rows,
                         bank_queries=args.bank_queries, pood_rows=min(args.pytorch_ood_rows, args.max_fit_rows),
                         pood_queries=args.pytorch_ood_queries, chunk_rows=args.chunk_rows,
                         floor_every=args.floor_every)
    selected = args.detectors.split(",") if args.detectors else None
    plan = plan_detectors(selected, Synthetic(shapes).tap, args.plugins)
    use_pood = not args.no_pytorch_ood
    if use_pood:
        try:
            import pytorch_ood  # noqa: F401
        except ImportError:
            use_pood = False
    jobs = build_jobs(plan, shapes, use_pood)
    budget_mb = args.memory_budget_gb * 1024
    results: list[tuple[Job, dict[str, Any]]] = []
    begin = time.perf_counter()
    command = " ".join(["python benchmarks/bench_scale.py", *_measuring(argv if argv is not None else sys.argv[1:])])
    for index, job in enumerate(jobs, 1):
        print(f"[{index}/{len(jobs)}] {job.kind} {job.label} rows={job.rows:,} queries={job.queries:,}",
              file=sys.stderr, flush=True)
        if args.in_process:
            try:
                result = run_job(job, shapes, quiet=True)
            except Exception as error:  # one job's failure must not hide the others' numbers
                result = {"error": f"{type(error).__name__}: {error}"}
        else:
            result = run_isolated(job, shapes, budget_mb, args.job_timeout)
        summary = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()
                   if k in ("fit_seconds", "score_seconds", "peak_fit_mb", "peak_score_mb", "auroc", "error")}
        print(f"    {summary}", file=sys.stderr, flush=True)
        results.append((job, result))
        if args.raw:
            args.raw.write_text(json.dumps({
                "command": command, "shapes": asdict(shapes), "plan": asdict(plan), "budget_mb": budget_mb,
                "seconds": time.perf_counter() - begin, "results": [(asdict(j), r) for j, r in results]}))
    text = report(results, plan, shapes, command, budget_mb, time.perf_counter() - begin)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
