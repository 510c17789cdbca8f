"""Recall of ``knn``'s approximate faiss search, and exactness of half-precision banks, on ImageNet-like features.

Synthetic features: ``--rows`` bank rows and ``--queries`` queries of width
``--width``, drawn from ``--clusters`` isotropic Gaussian clusters (centres
``N(0, I/D)``, noise ``N(0, σ² I/D)``), then L2-normalised as ``knn`` does.
The queries come from the same clusters (in-distribution test images).

For the faiss IVF-Flat backend (``backend="faiss"``) at several ``nprobe``,
against the exact torch search of the same float32 bank:

- recall@k: the fraction of each query's true k nearest rows found, averaged;
- the relative error of the k-th distance (the ``knn`` score), mean and max;
- the time to build the index (k-means on the seeded sample, then adding the
  bank) and to search all queries (re-rank included).

Times are CPU seconds of this process (``time.process_time``): with
``OMP_NUM_THREADS=1`` that is the single-core time, unaffected by other
processes on a shared machine.

For ``bank_dtype="float16"`` / ``"bfloat16"`` (exact search: candidates from
the library's product, float32 of upcast chunks on a CPU, then the float32
re-rank), and for comparison candidates from a bfloat16 product: the fraction
of ``--half-queries`` queries whose k-th distance equals, bit for bit, a
float32 search of the stored rows ``bank.float()``, and the search time.

Usage::

    python benchmarks/bench_knn_recall.py                     # 200,000 x 2,048, 2,000 queries, k = 50
    python benchmarks/bench_knn_recall.py --rows 20000 --width 256 --output -   # a quick look
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import timm_ood
from timm_ood._runtime import numerics_environment
from timm_ood.detectors import neighbours
from timm_ood.detectors.neighbours import exact_search
from timm_ood.tap import Outputs

RESULTS = Path(__file__).resolve().parent / "results" / "knn_recall.md"


def features(rows: int, queries: int, width: int, clusters: int, noise: float, seed: int) -> torch.Tensor:
    """Bank rows then queries, [rows + queries, width] float32, normalised; drawn in blocks to bound memory."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, width, generator=generator) / math.sqrt(width)
    out = torch.empty(rows + queries, width)
    for start in range(0, len(out), 1 << 15):
        block = out[start:start + (1 << 15)]
        members = torch.randint(clusters, (len(block),), generator=generator)
        block.copy_(centres[members] + noise / math.sqrt(width) * torch.randn(block.shape, generator=generator))
    return F.normalize(out, dim=1, out=out)


def fitted(bank: torch.Tensor, **hyperparameters) -> neighbours.KNN:
    detector = timm_ood.create_detector("knn", **hyperparameters)
    detector.reset_fit(None)
    detector.update_fit(Outputs(bank, None, pre_logits=bank), None)
    detector.finish_fit()
    detector.is_fitted = True
    return detector


def timed(function, *args):
    """``function(*args)`` and the CPU seconds it took (this process, all threads): steady on a shared machine."""
    start = time.process_time()
    result = function(*args)
    return result, time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--width", type=int, default=2_048)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--noise", type=float, default=0.5, help="σ: within-cluster spread relative to the centres")
    parser.add_argument("--half-queries", type=int, default=500, help="queries for the half-precision banks")
    parser.add_argument("-k", type=int, default=50)
    parser.add_argument("--nprobe", default="1,4,16,32,64", help="comma-separated nprobe values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS), help="markdown file to write ('-': print only)")
    args = parser.parse_args(argv)
    k = args.k

    data, seconds = timed(features, args.rows, args.queries, args.width, args.clusters, args.noise, args.seed)
    bank, queries = data[:args.rows], data[args.rows:]
    print(f"features: {seconds:.1f} s", file=sys.stderr)

    exact = fitted(bank, k=k)
    (exact_keys, exact_rows), exact_seconds = timed(exact.search, queries)
    exact_distance = (-exact_keys[:, -1]).sqrt()
    print(f"exact torch search: {exact_seconds:.1f} s", file=sys.stderr)

    approximate = fitted(bank, k=k, backend="faiss")
    index, build_seconds = timed(approximate._faiss_index)
    lists = index.nlist if hasattr(index, "nlist") else 1
    print(f"faiss index: {build_seconds:.1f} s", file=sys.stderr)
    faiss_rows = []
    for nprobe in (int(value) for value in args.nprobe.split(",")):
        approximate.set_hyperparameters(nprobe=nprobe)
        (keys, rows), seconds = timed(approximate.search, queries)
        recall = (rows[:, :, None] == exact_rows[:, None, :]).any(dim=2).float().mean().item()
        error = ((-keys[:, -1]).sqrt() - exact_distance).abs() / exact_distance
        faiss_rows.append(f"| faiss IVF-Flat, nprobe={nprobe} | {recall:.4f} | {error.mean().item():.2e} | "
                          f"{error.max().item():.2e} | {seconds:.2f} | {exact_seconds / seconds:.1f}x |")
        print(faiss_rows[-1], file=sys.stderr)
    del approximate, index

    half_rows = []
    few = queries[:args.half_queries]
    for dtype, product in (("float16", None), ("bfloat16", None), ("bfloat16", torch.bfloat16)):
        detector = fitted(bank, k=k, bank_dtype=dtype)
        chosen = neighbours._candidate_dtype
        if product is not None:  # what the library does not do, for comparison
            neighbours._candidate_dtype = lambda bank, product=product: product
        try:
            (keys, _), seconds = timed(detector.search, few)
            used = neighbours._candidate_dtype(detector.bank)
        finally:
            neighbours._candidate_dtype = chosen
        reference, _ = exact_search(few, detector.bank.float(), k, "l2")
        same = (keys[:, -1] == reference[:, -1]).float().mean().item()
        stored = (-reference[:, -1]).sqrt()
        error = ((-keys[:, -1]).sqrt() - stored).abs() / stored
        half_rows.append(f"| {dtype} | {str(used).removeprefix('torch.')}{' (comparison)' if product else ''} | "
                         f"{same:.4f} | {error.max().item():.2e} | {seconds:.2f} | "
                         f"{detector.bank.nbytes / 2**30:.2f} GiB |")
        print(half_rows[-1], file=sys.stderr)
        del detector

    environment = numerics_environment()
    command = "python benchmarks/bench_knn_recall.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = f"""# knn: recall of the faiss IVF backend, exactness of half-precision banks

Command: `OMP_NUM_THREADS=1 {command.strip()}`

Features: {args.rows:,} bank rows and {args.queries:,} queries of width {args.width:,}, from
{args.clusters:,} isotropic Gaussian clusters (centres N(0, I/D), noise σ = {args.noise} relative to them),
L2-normalised; the queries come from the same clusters. k = {k}.
CPU: {environment["cpu"]} ({environment["cpu_capability"]}), {torch.get_num_threads()} thread(s); torch {torch.__version__},
faiss {__import__("faiss").__version__}, Python {platform.python_version()}.

## faiss IVF-Flat against the exact torch search (float32 bank)

Exact torch search of all queries: {exact_seconds:.2f} CPU s. Index: {lists:,} inverted lists
(round(4 sqrt(N)), at most N / 39), k-means on a seeded sample of {min(args.rows, 39 * lists):,} rows,
built in {build_seconds:.1f} CPU s (once per bank; a float32 copy of the bank, {bank.nbytes / 2**30:.2f} GiB).
Every value returned is the exact distance of the row found (candidates re-ranked exactly), so the
k-th distance can only be too large, by missing neighbours.

| search | recall@{k} | k-th distance rel. error, mean | max | search CPU s | speed-up |
| --- | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(faiss_rows)}

nprobe=1 is slower than nprobe=4: queries whose one list holds fewer than k rows get the exact
search instead. Well-separated synthetic clusters are easy for an IVF index; features of a real
network overlap more, and the default nprobe=32 leaves a margin for them.

## Half-precision banks (exact search, float32 re-rank)

The first {len(few):,} queries. Candidates: the best {neighbours.rerank_candidates(k)} rows per query
(k + max(k, 16)) from the product in the dtype shown (the library's choice on this CPU: a float32
product of upcast chunks; the bfloat16 product is shown for comparison), then `‖q - b‖²` recomputed
in float32 from the stored rows. "Same": the share of queries whose k-th distance equals, bit for bit,
a float32 exact search of the stored rows `bank.float()`. The float32 bank takes {bank.nbytes / 2**30:.2f} GiB.

| bank_dtype | candidate product | same k-th distance | max rel. error | search CPU s | bank memory |
| --- | --- | ---: | ---: | ---: | ---: |
{chr(10).join(half_rows)}
"""
    print(report)
    if args.output != "-":
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
