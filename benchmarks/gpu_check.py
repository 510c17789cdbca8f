"""GPU check: the device-parametrised tests on CUDA, every detector on 224 px timm models in float32 and under
bfloat16 autocast, the feature store, and the time against a plain forward; writes a markdown report.

One prepared script for one GPU, under 8 minutes (``--quick``: about 4). Steps:

1. pytest on the tests whose checks depend on the device: the conformance kit's
   ``check_follows_cuda`` of every detector on every kit architecture (the
   check exists only where ``torch.cuda.is_available()``; ``-k
   check_follows_cuda``), the tests that run the whole kit (``check_detector``,
   which then includes it), and the one asserting the CUDA check is selected;
   ``--quick``: the ResNet architectures only. pytest-xdist workers where it is
   installed. With ``--device cpu`` the CPU stand-ins of the device path run.
   Pass / fail counts, within ``--test-timeout`` seconds (the process group is
   stopped there, and the counts so far are reported).
2. Synthetic data without downloads: uniform-noise uint8 RGB images in memory
   (``images_to_dataset``, so the loaders have fingerprints and the store
   keys them), fit / ID / OOD sets, loaded by ``timm_ood.data.make_loader``.
   Models with random weights (``pretrained=False``): a check of mechanics and
   speed, not of detection quality. The fit and ID labels are the model's own
   predictions, so the detectors that keep correctly classified fit images
   (``she``, ``openmax``) have some.
3. For each model: ``evaluate_loaders(model, "all", ...)`` in float32 with a
   feature store (``cache_dir``), the same call again (served by the store),
   then under ``torch.autocast(<device>, dtype=torch.bfloat16)`` with a store of
   its own. Each run's wall time against one plain forward (``model(images)``
   under ``torch.inference_mode``, the same loaders, synchronised) in the same
   precision. When a call raises, it is repeated without the detector that
   raised (the innermost ``Detector`` in the traceback; if none can be told,
   each remaining detector alone), and each failure is recorded with the first
   line of its error. The stores of 224 px images hold every intermediate map
   ``gram`` and ``multi-mahalanobis`` read (~9 MB an image for a ResNet-50):
   ``--store-dir`` on a disk with room, each store deleted after its runs.

Exit status 1 when a test failed (or the tests did not finish) or a float32
evaluation raised; bfloat16 failures are recorded, not fatal.

Usage::

    python benchmarks/gpu_check.py                       # CUDA: resnet50 and vit_small_patch16_224, 1,536 images
    python benchmarks/gpu_check.py --quick               # CUDA: resnet50, 768 images, fewer tests
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check_cpu.md   # smoke test of the code path
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from datasets import DatasetInfo

import timm_ood
from timm_ood import Detector
from timm_ood.data import make_loader
from timm_ood.data.images import OOD_LABEL, images_to_dataset
from timm_ood.evaluation import evaluate_loaders
from timm_ood.evaluation.evaluate import ALL, all_detectors
from timm_ood.evaluation.results import EvaluationResults, markdown_table
from timm_ood.scoring import detector_labels
from timm_ood.store import FeatureStore
from timm_ood.tap import Tap

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results" / "gpu_check.md"

#: step 1 on CUDA: the kit's device check of every detector, and the tests whose kit runs include it
CUDA_TESTS = ["tests/test_conformance.py", "tests/detectors/test_sampling.py",
              "tests/training/test_sigmoid_bottleneck.py", "tests/detectors/test_shaping.py"]
CUDA_SELECTION = ("check_follows_cuda or test_checks_are_selected_from_the_declared_requirements"
                  " or test_detectors_pass_the_conformance_kit_with_their_head"
                  " or test_rankfeat_passes_the_kit_on_a_cnn_with_2x2_maps")
#: --quick: the device check on the ResNet architectures only
CUDA_QUICK_SELECTION = "(check_follows_cuda and resnet) or test_checks_are_selected_from_the_declared_requirements"
#: step 1 on a CPU: the device path exercised there, and the selection test
CPU_TESTS = ["tests/test_conformance.py"]
CPU_SELECTION = ("test_the_device_check_moves_the_state_and_the_scores"
                 " or test_checks_are_selected_from_the_declared_requirements")
#: a test's outcome in ``pytest -v`` output: ``node PASSED``, or with pytest-xdist ``[gw0] [ 5%] PASSED node``
OUTCOME = re.compile(r"^(?P<node>\S+::\S+)\s+(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                     r"|^\[gw\d+\]\s+(?:\[\s*\d+%\]\s+)?(?P<xoutcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+"
                     r"(?P<xnode>\S+::\S+)")
SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|error|errors|skipped|deselected).*) in ([\d.]+)s")


# -- step 1: the tests -----------------------------------------------------------------------------


@dataclass
class TestRun:
    command: list[str]
    seconds: float
    returncode: int | None  # None: stopped at the time limit
    counts: dict[str, int]
    failed: list[str]
    summary: str
    tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.failed


def parse_outcomes(output: str) -> tuple[dict[str, int], list[str], str]:
    """Counts by outcome, the failed tests and pytest's summary line, from ``pytest -v`` output (partial or not)."""
    counts: dict[str, int] = {}
    failed = []
    summary = ""
    for line in output.splitlines():
        if match := OUTCOME.match(line):
            outcome = match["outcome"] or match["xoutcome"]
            node = match["node"] or match["xnode"]
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
            if outcome in ("FAILED", "ERROR"):
                failed.append(node)
        elif match := SUMMARY.match(line):
            summary = match[1]
    return counts, failed, summary


def run_tests(device: str, timeout: float, quick: bool, workers: int) -> TestRun:
    """pytest on the device-dependent tests (``workers`` pytest-xdist processes), stopped after ``timeout`` s."""
    if device.startswith("cuda"):
        files, selection = CUDA_TESTS, CUDA_QUICK_SELECTION if quick else CUDA_SELECTION
    else:
        files, selection = CPU_TESTS, CPU_SELECTION
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "console_output_style=classic",
               "--tb=line", "-rfE", *(["-n", str(workers)] if workers else []), *files, "-k", selection]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        returncode = None
    seconds = time.perf_counter() - start
    counts, failed, summary = parse_outcomes(output)
    tail = "\n".join(output.splitlines()[-25:])
    return TestRun(command, seconds, returncode, counts, failed, summary, tail)


# -- step 2: data and models -----------------------------------------------------------------------


def noise_dataset(count: int, size: int, seed: int, label: int | None, name: str):
    """``count`` uniform-noise RGB images of ``size`` px; labels over 1,000 classes, or one label for all."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, size=count) if label is None else label
    return images_to_dataset(pixels, labels, info=DatasetInfo(dataset_name=name))


def count_stem_images(model: torch.nn.Module) -> Callable[[], int]:
    """Images through the model's first leaf module with weights (its stem): forwards actually run."""
    stem = next(m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False)))
    seen = [0]
    stem.register_forward_pre_hook(lambda module, inputs: seen.__setitem__(0, seen[0] + len(inputs[0])))
    return lambda: seen[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision(device: torch.device, bfloat16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bfloat16 else contextlib.nullcontext()


def plain_forward_seconds(model: torch.nn.Module, loaders: Iterable, device: torch.device, bfloat16: bool) -> float:
    """``model(images)`` over every batch of the loaders (loading included), synchronised at the end."""
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), precision(device, bfloat16):
        for loader in loaders:
            for images, _ in loader:
                model(images.to(device, non_blocking=True))
    synchronize(device)
    return time.perf_counter() - start


# -- step 3: evaluation ----------------------------------------------------------------------------


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class DetectorRow:
    fit_seconds: float = 0.0
    score_seconds: float = 0.0
    auroc: float | None = None
    finite: bool | None = None
    error: str | None = None


@dataclass
class Run:
    """One ``evaluate_loaders`` call (or, after it raised, one call per detector)."""

    name: str
    wall: float = 0.0
    forward: float = 0.0  # the shared forwards: fitting and scoring
    stem_images: int = 0
    plain: float = 0.0
    peak_memory: int | None = None
    whole_call_error: str | None = None
    detectors: dict[str, DetectorRow] = field(default_factory=dict)

    @property
    def failures(self) -> dict[str, str]:
        return {label: row.error for label, row in self.detectors.items() if row.error}


def detector_rows(results: EvaluationResults) -> dict[str, DetectorRow]:
    rows = {}
    for label in results.detectors:
        scores = results.scored.scores[label] if results.scored is not None else {}
        rows[label] = DetectorRow(
            fit_seconds=results.fit_seconds.get(label, 0.0), score_seconds=results.score_seconds.get(label, 0.0),
            auroc=results.metrics[label]["average" if len(results.ood_sets) > 1 else results.ood_sets[0]]["auroc"],
            finite=all(bool(torch.isfinite(s).all()) for s in scores.values()))
    return rows


def failing_detector(error: BaseException, labels: list[str]) -> str | None:
    """The detector an error came from: the innermost ``Detector`` method in its traceback, else a ``name: `` prefix."""
    found = None
    traceback = error.__traceback__
    while traceback is not None:
        owner = traceback.tb_frame.f_locals.get("self")
        if isinstance(owner, Detector) and owner.name in labels:
            found = owner.name
        traceback = traceback.tb_next
    return found or next((label for label in labels if str(error).startswith(f"{label}: ")), None)


def evaluate_run(name: str, model: torch.nn.Module, labels: list[str], loaders: Mapping[str, Any],
                 cache_dir: Path, device: torch.device, bfloat16: bool, stem: Callable[[], int],
                 plain: float) -> Run:
    """``evaluate_loaders(model, "all", ...)``; when it raises, again without the detector that raised (found in
    the traceback), and when that detector cannot be told, each remaining detector alone."""
    run = Run(name, plain=plain)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = stem()

    def call(detectors):
        with precision(device, bfloat16):
            return evaluate_loaders(model, detectors, id_data=loaders["id"], ood_data={"noise": loaders["ood"]},
                                    fit_data=loaders["fit"], progress=False, cache_dir=cache_dir)

    def record(results: EvaluationResults) -> None:
        run.forward += results.forward_seconds + results.settings["fit_forward_seconds"]
        run.detectors.update(detector_rows(results))

    synchronize(device)
    start = time.perf_counter()
    remaining: list[str] = list(labels)
    try:
        record(call(ALL))
    except Exception as error:  # recorded; then again without the detector that raised
        run.whole_call_error = first_line(error)
        while remaining:
            culprit = failing_detector(error, remaining)
            if culprit is None:  # cannot tell which: every remaining detector alone
                for label in remaining:
                    try:
                        record(call([label]))
                    except Exception as alone:
                        run.detectors[label] = DetectorRow(error=first_line(alone))
                break
            run.detectors[culprit] = DetectorRow(error=first_line(error))
            remaining.remove(culprit)
            if not remaining:
                break
            try:
                record(call(remaining))
                break
            except Exception as again:
                error = again
    synchronize(device)
    run.wall = time.perf_counter() - start
    run.stem_images = stem() - before
    if device.type == "cuda":
        run.peak_memory = torch.cuda.max_memory_allocated(device)
    run.detectors = {label: run.detectors[label] for label in labels if label in run.detectors}
    return run


@dataclass
class ModelReport:
    name: str
    parameters: int
    images: int
    runs: list[Run] = field(default_factory=list)
    store_bytes: int = 0
    store_entries: int = 0
    error: str | None = None
    seconds: float = 0.0


def predictions(model: torch.nn.Module, loader: Iterable, device: torch.device) -> list[int]:
    """The model's own top-1 class of every image (float32, in order)."""
    predicted = []
    with torch.inference_mode():
        for images, _ in loader:
            predicted.append(model(images.to(device)).argmax(dim=1).cpu())
    return torch.cat(predicted).tolist()


def check_model(name: str, sets: Mapping[str, Any], args: argparse.Namespace, device: torch.device,
                root: Path) -> ModelReport:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval().to(device)
    report = ModelReport(name, sum(p.numel() for p in model.parameters()), sum(len(d) for d in sets.values()))

    def loader(dataset):
        return make_loader(dataset, model, batch_size=args.batch_size, num_workers=args.workers,
                           input_size=(3, args.image_size, args.image_size), crop_pct=1.0)

    # the fit and ID labels become the model's own predictions: with random weights (and noise) the detectors
    # that keep correctly classified fit images only (she, openmax) would otherwise have none. Also the warm-up.
    sets = {key: dataset if key == "ood" else
            dataset.remove_columns("label").add_column("label", predictions(model, loader(dataset), device))
            for key, dataset in sets.items()}
    loaders = {key: loader(dataset) for key, dataset in sets.items()}
    stem = count_stem_images(model)
    labels = detector_labels(all_detectors(Tap(model)))
    order = [loaders["fit"], loaders["id"], loaders["ood"]]
    plain = plain_forward_seconds(model, order, device, False)
    f32_store = root / f"{name}-float32"
    report.runs.append(evaluate_run("float32, computed and stored", model, labels, loaders, f32_store, device,
                                    False, stem, plain))
    print(f"  {name}: float32 {report.runs[-1].wall:.1f} s", file=sys.stderr)
    report.runs.append(evaluate_run("float32 again, served by the store", model, labels, loaders, f32_store,
                                    device, False, stem, plain))
    print(f"  {name}: rerun {report.runs[-1].wall:.1f} s", file=sys.stderr)
    entries = FeatureStore(f32_store).entries()
    report.store_entries, report.store_bytes = len(entries), sum(e.bytes for e in entries)
    shutil.rmtree(f32_store, ignore_errors=True)  # intermediate maps of 224 px images: gigabytes
    bf16_name = "bfloat16 autocast, computed and stored"
    try:
        plain_forward_seconds(model, [loaders["id"]], device, True)  # warm-up of the bfloat16 kernels
        plain_bf16 = plain_forward_seconds(model, order, device, True)
    except Exception as error:  # recorded: the float32 results stand
        report.runs.append(Run(bf16_name, whole_call_error=f"the plain forward raised {first_line(error)}"))
    else:
        # a store of its own: the store's key has the weights' dtype, not the autocast state
        bf16_store = root / f"{name}-bfloat16-autocast"
        report.runs.append(evaluate_run(bf16_name, model, labels, loaders, bf16_store, device, True, stem,
                                        plain_bf16))
        shutil.rmtree(bf16_store, ignore_errors=True)
    print(f"  {name}: bfloat16 autocast {report.runs[-1].wall:.1f} s", file=sys.stderr)
    report.seconds = time.perf_counter() - start
    return report


# -- the report ------------------------------------------------------------------------------------


def seconds(value: float) -> str:
    return f"{value:.2f}"


def model_section(report: ModelReport) -> str:
    if report.error:
        return f"## {report.name}\n\nNot checked: {report.error}\n"
    run_rows = []
    for run in report.runs:
        detector_seconds = sum(r.fit_seconds + r.score_seconds for r in run.detectors.values())
        memory = "-" if run.peak_memory is None else f"{run.peak_memory / 2**30:.2f}"
        run_rows.append([run.name, seconds(run.wall), seconds(run.forward), seconds(detector_seconds),
                         f"{run.stem_images:,}", seconds(run.plain),
                         f"{run.wall / run.plain:.2f}" if run.plain else "-", memory,
                         len(run.failures) if run.detectors else "-",
                         run.whole_call_error or ""])
    labels = list(dict.fromkeys(label for run in report.runs for label in run.detectors))
    detector_table = []
    for label in labels:
        cells = [label]
        for run in report.runs:
            row = run.detectors.get(label)
            if row is None:
                cells += ["-", "-"]
            elif row.error:
                cells += ["error", "-"]
            else:
                cells += [f"{row.fit_seconds:.2f} + {row.score_seconds:.2f}",
                          ("" if row.finite else "non-finite ") + ("-" if row.auroc is None else f"{row.auroc:.3f}")]
        detector_table.append(cells)
    header = ["detector"]
    for run in report.runs:
        short = run.name.split(",")[0]
        header += [f"{short}: fit + score s", f"{short}: AUROC"]
    failures = [f"- {run.name}, `{label}`: {error}" for run in report.runs for label, error in run.failures.items()]
    return f"""## {report.name} ({report.parameters / 1e6:.1f} M parameters, random weights)

{report.images:,} images per run; {report.store_entries} store entries of {report.store_bytes / 1e6:,.1f} MB after the
float32 runs. "forward s": the shared forwards inside the call (fit and scoring passes; 0 when served by the
store); "stem images": images through the model's first layer during the call (detectors with input gradients
run their own passes); "plain forward s": `model(images)` over the same loaders in the same precision; "ratio":
wall / plain forward. Took {report.seconds:.0f} s in all.

{markdown_table(["run", "wall s", "forward s", "detectors s", "stem images", "plain forward s", "ratio",
                 "peak GPU GiB", "detectors failed", "whole call raised"], run_rows)}

Per detector: fit + score seconds (forwards excluded) and the average AUROC (random weights and noise
images: a check that scores are numbers, not of quality; "non-finite": some score is inf or NaN).

{markdown_table(header, detector_table)}

{"Failures:" + chr(10) + chr(10) + chr(10).join(failures) if failures else "No detector failed."}
"""


def environment_line(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        where = (f"{torch.cuda.get_device_name(device)} ({properties.total_memory / 2**30:.0f} GiB), CUDA "
                 f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, TF32 matmul "
                 f"{torch.backends.cuda.matmul.allow_tf32} / cuDNN {torch.backends.cudnn.allow_tf32}")
    else:
        where = f"CPU only ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads"
    return (f"Device: {where}; {os.cpu_count()} CPU cores. torch {torch.__version__}, timm {timm.__version__}, "
            f"timm-ood {timm_ood.__version__}, Python {platform.python_version()}.")


def tests_section(tests: TestRun | None) -> str:
    if tests is None:
        return "## 1. Device-parametrised tests\n\nNot run (`--skip-tests`).\n"
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tests.counts.items())) or "none reported"
    state = ("stopped at the time limit" if tests.returncode is None else f"exit status {tests.returncode}")
    failed = "\n".join(f"- `{name}`" for name in tests.failed) or "none"
    command = shlex.join(["python", *tests.command[1:]])
    return f"""## 1. Device-parametrised tests

`{command}`

{counts} ({state}, {tests.seconds:.0f} s){"; pytest: " + tests.summary if tests.summary else ""}.

Failed: {failed}

```
{tests.tail}
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS), help="the markdown report")
    parser.add_argument("--quick", action="store_true", help="fewer images and models, a shorter test limit")
    parser.add_argument("--models", nargs="+", default=None,
                        help="timm architectures (default: resnet50 and vit_small_patch16_224 on CUDA, resnet50 "
                             "only with --quick; test_resnet on a CPU)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default 224; 64 on a CPU)")
    parser.add_argument("--images", type=int, nargs=3, default=None, metavar=("FIT", "ID", "OOD"),
                        help="images per set (default 1024 256 256; --quick 512 128 128; CPU 128 64 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (32 on a CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default min(8, cores); 0 on a CPU)")
    parser.add_argument("--test-timeout", type=float, default=None,
                        help="seconds for step 1 (default 240; --quick 120)")
    parser.add_argument("--test-workers", type=int, default=None,
                        help="pytest-xdist processes for step 1 (default on CUDA: up to 4 where pytest-xdist is "
                             "installed; 0 on a CPU)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="a model is skipped when the seconds passed plus the previous model's would exceed this "
                             "(the whole run stays under 8 min)")
    parser.add_argument("--store-dir", default=None,
                        help="where the feature stores go (default: a temporary directory; ~15 GB for resnet50's "
                             "intermediate maps of 1,536 images at 224 px)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU; pass --device cpu for the smoke test")
    gpu = device.type == "cuda"
    if gpu and device.index is not None:
        torch.cuda.set_device(device)
    if gpu:
        args.models = args.models or (["resnet50"] if args.quick else ["resnet50", "vit_small_patch16_224"])
        args.images = args.images or ([512, 128, 128] if args.quick else [1024, 256, 256])
    else:
        args.models = args.models or ["test_resnet"]
        args.images = args.images or [128, 64, 64]
    args.image_size = args.image_size or (224 if gpu else 64)
    args.batch_size = args.batch_size or (128 if gpu else 32)
    args.workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if gpu else 0)
    args.test_timeout = args.test_timeout or (120.0 if args.quick else 240.0)
    if args.test_workers is None:
        has_xdist = importlib.util.find_spec("xdist") is not None
        args.test_workers = min(4, max(1, (os.cpu_count() or 1) // 4)) if gpu and has_xdist else 0
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()

    tests = None
    if not args.skip_tests:
        print(f"step 1: pytest (at most {args.test_timeout:.0f} s)", file=sys.stderr)
        tests = run_tests(args.device, args.test_timeout, args.quick, args.test_workers)
        print(f"  {tests.counts} in {tests.seconds:.0f} s, exit {tests.returncode}", file=sys.stderr)

    print("step 2: data", file=sys.stderr)
    start = time.perf_counter()
    fit, in_distribution, out = args.images
    sets = {"fit": noise_dataset(fit, args.image_size, 0, None, "noise-fit"),
            "id": noise_dataset(in_distribution, args.image_size, 1, None, "noise-id"),
            "ood": noise_dataset(out, args.image_size, 2, OOD_LABEL, "noise-ood")}
    data_seconds = time.perf_counter() - start

    reports = []
    root = Path(tempfile.mkdtemp(prefix="timm-ood-gpu-check-", dir=args.store_dir))
    free_disk = shutil.disk_usage(root).free
    try:
        for name in args.models:
            elapsed = time.perf_counter() - started
            previous = next((r.seconds for r in reversed(reports) if r.seconds), 0.0)
            if elapsed + previous > args.budget:
                reports.append(ModelReport(name, 0, 0, error=(
                    f"skipped: {elapsed:.0f} s had passed and the previous model took {previous:.0f} s "
                    f"(--budget {args.budget:.0f} s)")))
                continue
            print(f"step 3: {name}", file=sys.stderr)
            try:
                reports.append(check_model(name, sets, args, device, root))
            except Exception as error:  # recorded: the report is still written
                reports.append(ModelReport(name, 0, 0, error=first_line(error)))
                print(f"  {name}: {reports[-1].error}", file=sys.stderr)
            if gpu:
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    float32_failed = [f"{r.name}: {r.error}" for r in reports if r.error and not r.error.startswith("skipped")]
    float32_failed += [f"{r.name}, {run.name}, {label}: {error}" for r in reports for run in r.runs
                       if run.name.startswith("float32") for label, error in run.failures.items()]
    bf16_failed = sum(len(run.failures) for r in reports for run in r.runs if run.name.startswith("bfloat16"))
    verdict = (f"Tests: {'not run' if tests is None else 'passed' if tests.ok else 'FAILED'}. Float32 evaluation: "
               f"{'FAILED: ' + '; '.join(float32_failed) if float32_failed else 'no failure'}. bfloat16 autocast: "
               f"{bf16_failed} detector(s) failed (listed above).")
    command = "python benchmarks/gpu_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = f"""# GPU check: device tests, every detector in float32 and bfloat16 autocast, the feature store

Command: `{command.strip()}`

{environment_line(device)}

Data: uniform-noise RGB images of {args.image_size} px made in memory ({fit:,} fit, {in_distribution:,} ID,
{out:,} OOD; {data_seconds:.1f} s to encode), loaded by `make_loader` (batch {args.batch_size},
{args.workers} workers, `crop_pct=1.0`). Fit and ID labels: each model's own float32 predictions (random
weights classify nothing correctly otherwise; `she` and `openmax` keep correctly classified fit images only).
Feature stores under `{root}` ({free_disk / 1e9:,.0f} GB free at the start), each deleted after its runs.
Whole run: {time.perf_counter() - started:.0f} s.

{tests_section(tests)}
{chr(10).join(model_section(r) for r in reports)}
## Verdict

{verdict}
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    return 1 if (tests is not None and not tests.ok) or float32_failed else 0


if __name__ == "__main__":
    sys.exit(main())
