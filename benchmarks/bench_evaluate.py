"""Speed of evaluation and tuning, as ratios measured in one run (BENCHMARK.md, "Speed").

1. ``evaluate`` with the seeds' non-gradient detectors, divided by one plain
   forward pass of the model over the same images (the fit data and every
   evaluation set, loaded through the same loaders): the physical floor is
   1.0, the goal at most 1.3. Then all post-hoc detectors without input
   gradients on a first run that writes the feature store (goal at most 1.5
   forwards) and on a rerun the store serves (goal at most 0.15), and
   ``timm-ood eval`` under ``torchrun`` with two processes against one.
2. ODIN's (T, epsilon) grid search (one forward with autograd, one backward
   per T, one forward per (T, epsilon > 0) of the images whose gradient sign
   changed from the previous T) divided by the naive loop of one full ODIN
   pass per grid point, on the same images: goal at most 0.3. Also timed
   without the sign reuse, whose scores are checked to be identical to the
   naive loop's.

Usage::

    python benchmarks/bench_evaluate.py                    # the reference ResNet-18 (trained and cached on first use)
    python benchmarks/bench_evaluate.py --fast             # the small stand-in model, small sets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from timm_ood import data
from timm_ood.evaluation import evaluate, naive_odin_grid_scores, odin_grid_scores
from timm_ood.evaluation.results import markdown_table
from timm_ood.reference import FAST_RECIPE, RECIPE, checkpoint_path, reference_model
from timm_ood.store import FeatureStore
from timm_ood.tap import Tap

NON_GRADIENT = ["msp", "temperature", "maxlogit", "energy", "entropy", "mahalanobis"]
#: every built-in post-hoc detector that needs no input gradient and no special model; left out: the
#: gradient ones (odin, mahalanobis-odin), mc-dropout and deep-ensemble (a model with dropout / an ensemble),
#: rankfeat (the 28 px ResNet-18's final map is 1 x 1: it refuses it), and the training heads' detectors
ALL_POST_HOC = [*NON_GRADIENT, "gen", "kl-matching", "weighted-energy", "temperature-scaling", "react", "ash-p",
                "ash-b", "ash-s", "scale", "lts", "dice", "vra", "gradnorm", "rmd", "multi-mahalanobis", "gmm",
                "knn", "nnguide", "vim", "fdbd", "nci", "she", "openmax", "gram"]
TEMPERATURES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
EPSILONS = tuple(round(0.0002 * i, 4) for i in range(21))


def plain_forward_seconds(model, loaders) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for loader in loaders:
            for images, _ in loader:
                model(images)
    return time.perf_counter() - start


def two_processes(recipe, args, max_images) -> dict:
    """``timm-ood eval`` under torchrun with N processes against one process: wall time and metric difference."""
    checkpoint = checkpoint_path(recipe)
    threads = max(1, torch.get_num_threads() // args.processes)
    out = Path(tempfile.mkdtemp(prefix="timm-ood-torchrun-"))
    arguments = ["eval", "--checkpoint", str(checkpoint), "--detectors", ",".join(ALL_POST_HOC), "--quiet",
                 "--device", "cpu", "--batch-size", str(args.batch_size), "--no-plots"]
    if max_images is not None:
        arguments += ["--max-images", str(max_images), "--max-fit-images", str(4 * max_images)]
    seconds = {}
    for name, launcher, count in (("single", [sys.executable, "-m", "timm_ood.cli"], threads * args.processes),
                                  ("distributed", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", str(args.processes), "-m", "timm_ood.cli"],
                                   threads)):
        start = time.perf_counter()
        subprocess.run([*launcher, *arguments, "--out", str(out / name)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(count)}, capture_output=True)
        seconds[name] = time.perf_counter() - start
    one, many = (json.loads((out / name / "results.json").read_text())["metrics"] for name in ("single", "distributed"))
    difference = max(abs(one[d][s][m] - many[d][s][m]) for d in one for s in one[d] for m in one[d][s])
    shutil.rmtree(out, ignore_errors=True)
    return {**seconds, "difference": difference, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="the small stand-in model and small sets")
    parser.add_argument("--max-images", type=int, default=None, help="images per evaluation set")
    parser.add_argument("--grid-images", type=int, default=128, help="images in the ODIN grid comparison")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2,
                        help="also run timm-ood eval under torchrun with this many processes (1: skip)")
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = FAST_RECIPE if args.fast else RECIPE
    model = reference_model(recipe).eval()
    bench = data.load_benchmark("fashion-mnist")
    max_images = args.max_images or (500 if args.fast else None)

    def limited(dataset):
        return dataset if max_images is None or len(dataset) <= max_images else dataset.select(range(max_images))

    sets = {"id_train": bench.id_train if max_images is None else bench.id_train.select(range(4 * max_images)),
            "id_test": limited(bench.id_test), **{n: limited(d) for n, d in bench.ood.items()}}
    loaders = [data.make_loader(d, model, batch_size=args.batch_size) for d in sets.values()]
    images = sum(len(d) for d in sets.values())

    # warm both paths once (allocator, caches), then measure
    plain_forward_seconds(model, loaders[1:2])
    forward = plain_forward_seconds(model, loaders)
    start = time.perf_counter()
    results = evaluate(model, NON_GRADIENT, bench, batch_size=args.batch_size, max_images=max_images,
                       max_fit_images=None if max_images is None else 4 * max_images, progress=False)
    evaluation = time.perf_counter() - start
    store = tempfile.mkdtemp(prefix="timm-ood-store-")
    start = time.perf_counter()
    every = evaluate(model, ALL_POST_HOC, bench, batch_size=args.batch_size, max_images=max_images,
                     max_fit_images=None if max_images is None else 4 * max_images, progress=False, cache_dir=store)
    every_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rerun = evaluate(model, ALL_POST_HOC, bench, batch_size=args.batch_size, max_images=max_images,
                     max_fit_images=None if max_images is None else 4 * max_images, progress=False, cache_dir=store)
    rerun_seconds = time.perf_counter() - start
    differing = [d for d in every.detectors
                 if not all(torch.equal(rerun.scored.scores[d][s], every.scored.scores[d][s]) for s in every.scored.scores[d])]
    store_bytes = sum(entry.bytes for entry in FeatureStore(store).entries())
    shutil.rmtree(store, ignore_errors=True)
    two = two_processes(recipe, args, max_images) if args.processes > 1 else None

    grid_loader = data.make_loader(bench.tuning.id.select(range(args.grid_images)), model,
                                   batch_size=args.grid_images)
    x = next(iter(grid_loader))[0]
    tap = Tap(model)
    forwarded: list[int] = []
    model.get_classifier().register_forward_hook(lambda module, inputs, output: forwarded.append(len(inputs[0])))
    start = time.perf_counter()
    clever = odin_grid_scores(tap, x, TEMPERATURES, EPSILONS)
    clever_seconds = time.perf_counter() - start
    clever_rows = sum(forwarded)
    forwarded.clear()
    start = time.perf_counter()
    exact = odin_grid_scores(tap, x, TEMPERATURES, EPSILONS, reuse_repeated_signs=False)
    exact_seconds = time.perf_counter() - start
    exact_rows = sum(forwarded)
    start = time.perf_counter()
    with torch.no_grad():
        naive = naive_odin_grid_scores(tap, x, TEMPERATURES, EPSILONS)
    naive_seconds = time.perf_counter() - start

    print(f"# Evaluation and tuning speed ({recipe.architecture} on fashion-mnist)\n")
    print("Command: `python benchmarks/bench_evaluate.py" + "".join(f" {a}" for a in sys.argv[1:]) + "`\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, Python {sys.version.split()[0]}\n")
    rows = [
        ["evaluate: " + ", ".join(NON_GRADIENT) + f" ({images} images)", f"{evaluation:.2f}",
         f"plain forward over the same images: {forward:.2f} s", f"{evaluation / forward:.3f}", "<= 1.3"],
        [f"evaluate: all {len(ALL_POST_HOC)} post-hoc detectors without input gradients, first run, writing the "
         f"store ({images} images)", f"{every_seconds:.2f}", f"plain forward over the same images: {forward:.2f} s",
         f"{every_seconds / forward:.3f}", "<= 1.5"],
        [f"the same, rerun served by the store (no forward; {store_bytes / 1e6:.0f} MB stored)", f"{rerun_seconds:.2f}",
         f"plain forward over the same images: {forward:.2f} s", f"{rerun_seconds / forward:.3f}", "<= 0.15"],
        [f"ODIN grid, {len(TEMPERATURES)} T x {len(EPSILONS)} eps, {len(x)} images ({clever_rows} images "
         "forwarded: repeated signs reuse logits)", f"{clever_seconds:.2f}",
         f"naive loop, one ODIN pass per point: {naive_seconds:.2f} s", f"{clever_seconds / naive_seconds:.3f}",
         "<= 0.3"],
        [f"ODIN grid without sign reuse ({exact_rows} images forwarded)", f"{exact_seconds:.2f}",
         f"naive loop: {naive_seconds:.2f} s", f"{exact_seconds / naive_seconds:.3f}", "-"],
    ]
    print(markdown_table(["what", "seconds", "against", "ratio", "goal"], rows))
    print(f"\nRerun served by the store gives the first run's scores bit for bit: "
          f"{'yes, for every detector' if not differing else 'not for ' + ', '.join(differing)}")
    if two is not None:
        print(f"\n`timm-ood eval` of the same {len(ALL_POST_HOC)} detectors under `torchrun --nproc-per-node "
              f"{args.processes}` (gloo, {two['threads']} thread(s) per process) against one process with "
              f"{two['threads'] * args.processes} threads: wall {two['distributed']:.1f} s against "
              f"{two['single']:.1f} s; largest metric difference {two['difference']:.1e}\n")
    print(f"\nODIN grid without sign reuse, scores identical to the naive loop: {torch.equal(exact, naive)}; "
          f"with sign reuse, largest score difference {float((clever - naive).abs().max()):.1e} "
          f"(float32 forwards of a smaller batch)")
    print(f"\nID accuracy of the model: {100 * results.accuracy:.2f}%; inside evaluate: fit forward "
          f"{results.settings['fit_forward_seconds']:.2f} s, scoring forward {results.forward_seconds:.2f} s, "
          "detectors " + ", ".join(f"{d} {s:.2f} s" for d, s in results.seconds.items()))
    print(f"\nAll post-hoc detectors: fit forward {every.settings['fit_forward_seconds']:.2f} s, scoring forward "
          f"{every.forward_seconds:.2f} s; seconds per detector (fit and scoring, forwards excluded):\n")
    print(markdown_table(["detector", "seconds"], [[d, f"{t:.2f}"] for d, t in
                                                   sorted(every.seconds.items(), key=lambda item: -item[1])]))


if __name__ == "__main__":
    main()
