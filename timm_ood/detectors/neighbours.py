"""Nearest-neighbour detectors over a bank of training pre-logits: ``knn`` and ``nnguide``.

**The bank.** The fit keeps one row per training image (the methods need them
all): the buffer ``bank`` [N, D], stored in ``bank_dtype`` on the model's
device, saved and loaded with the detector. ``float16`` / ``bfloat16`` halve
its memory (1.28M x 2048: 5.2 GB instead of 10.5 GB in float32) at no cost in
exactness of the scores against the stored rows (below).

**Exact search** (``backend="torch"``, the default) runs in two stages, neither
of which forms a queries x N matrix:

1. *candidates*: the bank is read in chunks (at most :data:`CHUNK_ELEMENTS`
   query-row products and bank elements at a time) and each query keeps its
   :func:`rerank_candidates` ``(k) = k + max(k, 16)`` best rows by a matrix
   product: ``⟨q, b⟩`` (``nnguide``) or ``2⟨q, b⟩ - ‖b‖²`` (``knn``). A
   float16 bank multiplies in float16 on a GPU; elsewhere a narrow chunk is
   upcast to float32: CPU float16 products measured 2.5x slower than
   upcasting, and bfloat16's rounding of the product (8-bit mantissa) lost
   the exact k-th neighbour of 2.4% of queries among 2k candidates
   (``benchmarks/results/knn_recall.md``).
2. *exact re-rank*: for those rows only, ``‖q - b‖²`` / ``⟨q, b⟩`` are
   recomputed directly in the wider of float32 and the queries' dtype from the
   stored rows, and the k best kept.

The values returned are thus exact for the stored rows (a float16 bank scores
as a float32 search of ``bank.float()``); the candidate stage only picks which
rows, and the 2k candidates absorb its rounding.

**Approximate search** (``backend="faiss"``, ``pip install timm-ood[faiss]``): a
faiss IVF-Flat index (:data:`IVF_LISTS_PER_SQRT_ROW` ``· sqrt(N)`` inverted
lists, k-means trained on a seeded sample of :data:`IVF_TRAINING_ROWS_PER_LIST`
rows per list, ``nprobe`` lists searched) over a float32 copy of the bank
gives each query's k best candidates by its float32 distances, re-ranked
exactly as above; queries whose searched lists hold fewer than k rows get the
exact search instead. The index is built lazily once per bank
(on the GPU with ``faiss-gpu`` when the bank is on CUDA), never saved nor
pickled: the bank is the state. It costs a second, float32, copy of the bank.
Recall against the exact search: ``benchmarks/results/knn_recall.md``.

**torch.distributed.** Each process keeps the rows of its own fit shard (no
gather at the end of the fit; only the row counts are gathered, so ``k`` is
checked against the whole bank). Scoring is collective
(``Requirements.collective_scores``): every rank calls :meth:`score` in
lockstep (with 0 queries once out of data); the queries of all ranks are
gathered (the bank never moves), every rank finds the k best of its shard for
all of them, and the ranks' candidates are merged into the k best overall,
each rank keeping its own queries' rows. The scores equal one process holding
the whole bank. ``fitted_state()`` and ``state_dict()`` of a sharded bank
gather the shards in rank order and return the whole bank: every rank must
call them (as any collective), then one rank writes. A whole bank loaded into
a distributed job stays whole on every rank and is searched without
collectives (correct, not sharded).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..distributed import all_gather_rows, all_gather_rows_and_counts, all_gather_stacked, world
from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, score_dtype

__all__ = [
    "KNN", "NNGuide", "candidate_rows", "exact_search", "rerank", "rerank_candidates",
    "top_k_inner_products", "top_k_nearest",
]

#: Queries x bank rows compared at once, and bank elements upcast or gathered at once (256 MB of float32).
CHUNK_ELEMENTS = 1 << 26
BANK_DTYPES = ("float16", "bfloat16", "float32", "float64")
BACKENDS = ("torch", "faiss")
#: backends of earlier versions, read as today's ones (saved files carry their hyperparameters);
#: "auto" was faiss's exact flat index when installed, else the exact torch search: both are "torch" now
LEGACY_BACKENDS = {"auto": "torch"}
#: the IVF index has round(IVF_LISTS_PER_SQRT_ROW * sqrt(N)) inverted lists, at most N / IVF_TRAINING_ROWS_PER_LIST
IVF_LISTS_PER_SQRT_ROW = 4
#: rows per inverted list in the seeded k-means training sample of the IVF quantiser (faiss's minimum)
IVF_TRAINING_ROWS_PER_LIST = 39
IVF_SEED = 0


def rerank_candidates(k: int) -> int:
    """Rows per query the candidate stage keeps for the exact re-rank: ``k + max(k, 16)``."""
    return k + max(k, 16)


# -- exact search -------------------------------------------------------------------------------------------------


def _candidate_dtype(bank: torch.Tensor) -> torch.dtype:
    """The dtype of the candidate product: float16 on a GPU, else at least float32 (a narrow chunk is upcast)."""
    if bank.dtype == torch.float16 and bank.device.type != "cpu":
        return torch.float16
    return torch.promote_types(bank.dtype, torch.float32)


def _keys(queries: torch.Tensor, rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Ranking keys [Q, R] from a matrix product, higher = nearer: ``⟨q, b⟩`` or ``2⟨q, b⟩ - ‖b‖²``."""
    products = queries @ rows.T
    return products if metric == "ip" else 2 * products - rows.square().sum(1)


def _exact_keys(queries: torch.Tensor, rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact keys [Q, C] of each query's own rows [Q, C, D], higher = nearer: ``⟨q, b⟩`` or ``-‖q - b‖²``.

    ``rows`` is scratch (a gathered copy): overwritten in place, 2x faster than new tensors.
    """
    if metric == "ip":
        return rows.mul_(queries[:, None]).sum(-1)
    return -rows.sub_(queries[:, None]).square_().sum(-1)


def _search_dtype(queries: torch.Tensor, bank: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(queries.dtype, bank.dtype), torch.float32)


def candidate_rows(queries: torch.Tensor, bank: torch.Tensor, count: int, metric: str) -> torch.Tensor:
    """Indices [Q, min(count, N)] of each query's ``count`` best bank rows by the chunked matrix product."""
    dtype = _candidate_dtype(bank)
    queries = queries.to(dtype)
    step = max(1, min(CHUNK_ELEMENTS // max(len(queries), 1), CHUNK_ELEMENTS // max(bank.shape[1], 1)))
    best = queries.new_empty(len(queries), 0)
    index = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], step):
        keys, found = _keys(queries, bank[start:start + step].to(dtype), metric).topk(
            min(count, min(step, bank.shape[0] - start)), dim=1)
        best, position = torch.cat([best, keys], 1).topk(min(count, best.shape[1] + keys.shape[1]), dim=1)
        index = torch.cat([index, found + start], 1).gather(1, position)
    return index


def rerank(
    queries: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of each query's candidate rows ``index`` [Q, C] by exact keys: keys and rows [Q, min(k, C)].

    Keys (``-‖q - b‖²`` for ``metric="l2"``, ``⟨q, b⟩`` for ``"ip"``, best
    first) are computed directly from the stored rows in the wider of float32
    and the inputs' dtypes, a chunk of queries at a time; a negative index is no
    candidate (key ``-inf``).
    """
    dtype = _search_dtype(queries, bank)
    queries = queries.to(dtype)
    step = max(1, CHUNK_ELEMENTS // max(index.shape[1] * bank.shape[1], 1))
    keys = torch.cat([queries.new_empty(0, index.shape[1])] + [
        _exact_keys(queries[s:s + step], bank[index[s:s + step].clamp_min(0)].to(dtype), metric)
        for s in range(0, len(queries), step)
    ])
    keys, position = keys.masked_fill(index < 0, -math.inf).topk(min(k, index.shape[1]), dim=1)
    return keys, index.gather(1, position)


def exact_search(queries: torch.Tensor, bank: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact keys and rows [Q, min(k, N)] of each query's ``k`` nearest bank rows (:func:`rerank`'s keys)."""
    return rerank(queries, bank, candidate_rows(queries, bank, min(bank.shape[0], rerank_candidates(k)), metric),
                  k, metric)


def top_k_inner_products(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest inner products ``⟨q, b_i⟩`` of each query with the bank, [B, k] in descending order.

    Exact for the stored rows (candidates by a chunked product, then the exact
    re-rank of the module's docstring), in the wider of float32 and the inputs' dtypes.
    """
    return exact_search(queries, bank, k, "ip")[0]


def top_k_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Squared Euclidean distances to the ``k`` nearest bank rows, [B, k] in ascending order.

    Exact for the stored rows: candidates ranked by ``2⟨q, b⟩ - ‖b‖²`` in
    chunks, then ``‖q - b‖²`` recomputed directly for them, in the wider of
    float32 and the inputs' dtypes.
    """
    return -exact_search(queries, bank, k, "l2")[0]


def faiss_available() -> bool:
    """Whether ``import faiss`` works (the optional ``faiss`` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# -- the detectors ------------------------------------------------------------------------------------------------


def _concatenated(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(rows)`` that frees each batch once copied: the peak is the bank plus one batch, not twice the bank."""
    bank = rows[0].new_empty(sum(len(r) for r in rows), *rows[0].shape[1:])
    start = 0
    rows.reverse()  # pop from the end, in the original order
    while rows:
        batch = rows.pop()
        bank[start:start + len(batch)] = batch
        start += len(batch)
    return bank


class _FeatureBankDetector(Detector):
    """A bank of one row per training image, sharded over ranks; subclasses say what a row is and how to score."""

    requirements: ClassVar[Requirements]
    fit_hyperparameters: ClassVar = frozenset({"bank_dtype"})
    metric: ClassVar[str]  # "l2": nearest by Euclidean distance, "ip": by inner product

    def __init__(self, k: int, bank_dtype: str, backend: str, nprobe: int) -> None:
        super().__init__()
        self.k = k
        self.bank_dtype = bank_dtype
        self.backend = backend
        self.nprobe = nprobe
        self.check_hyperparameters()
        self.register_buffer("bank", None)
        self._rows: list[torch.Tensor] = []
        self._shards = 1  # processes the bank is split over; 1: this process holds it whole
        self._bank_rows = 0  # rows of the whole bank (all shards)
        self._faiss: tuple[Any, ...] | None = None  # (the bank it indexes, the index, what it keeps alive)

    def check_hyperparameters(self) -> None:
        self.backend = LEGACY_BACKENDS.get(self.backend, self.backend)
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"{self.name}: k must be an int >= 1, got {self.k!r}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ValueError(f"{self.name}: bank_dtype must be one of {BANK_DTYPES}, got {self.bank_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (isinstance(self.nprobe, int) and self.nprobe >= 1):
            raise ValueError(f"{self.name}: nprobe must be an int >= 1, got {self.nprobe!r}")
        if self.backend == "faiss" and not faiss_available():
            raise ValueError(f"{self.name}: backend='faiss' needs faiss, which is not installed: "
                             "pip install timm-ood[faiss] (or use backend='torch', the exact search)")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_faiss"] = None  # a faiss index cannot be copied or pickled; it is rebuilt from the bank
        return state

    @abstractmethod
    def bank_rows(self, outputs: Outputs) -> torch.Tensor:
        """The bank rows [B, D] of a batch of training images."""

    # -- fit: each rank keeps its shard --------------------------------------------------------------------------
    def reset_fit(self, tap: Tap) -> None:
        self._rows = []

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        self._rows.append(self.bank_rows(outputs).detach().to(getattr(torch, self.bank_dtype)))

    def finish_fit(self) -> None:
        rows, self._rows = self._rows, []
        has_rows = bool(rows)
        bank = _concatenated(rows) if has_rows else torch.empty(0, 0, dtype=getattr(torch, self.bank_dtype))
        self._shards = world()[1]
        self._bank_rows = bank.shape[0]
        if self._shards > 1:  # the row counts (k is checked against the whole bank), and the width for empty ranks
            counts = all_gather_stacked(torch.tensor([bank.shape[0], bank.shape[1] if has_rows else -1], device=bank.device))
            self._bank_rows = int(counts[:, 0].sum())
            if not has_rows:  # no fit data on this rank: an empty shard of the right width, on the CPU
                bank = bank.new_empty(0, int(counts[:, 1].max()))
        self.bank = bank

    @property
    def bank_size(self) -> int:
        """Rows of the whole bank (over every rank's shard); 0 before a fit."""
        if self._shards > 1:
            return self._bank_rows
        return 0 if self.bank is None else self.bank.shape[0]

    # -- state: a sharded bank is saved whole ---------------------------------------------------------------------
    def _check_shards(self, doing: str) -> None:
        if self._shards > 1 and world()[1] != self._shards:
            raise RuntimeError(
                f"{self.name}: this bank is one shard of a bank fitted over {self._shards} processes, which "
                f"are gone (world size now {world()[1]}); {doing} inside the process group that fitted it "
                "(every rank calls it), or save it there (fitted_state / save_detector gather the whole bank) "
                "and load the file"
            )

    def _whole_bank(self) -> torch.Tensor:
        self._check_shards("save it")
        return all_gather_rows(self.bank)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The fitted state; a sharded bank is gathered whole (collective: every rank must call it)."""
        state = super().fitted_state()
        if self._shards > 1 and "bank" in state:
            state["bank"] = self._whole_bank()
        return state

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._shards > 1 and self.bank is not None:  # collective: every rank calls state_dict()
            destination[prefix + "bank"] = self._whole_bank()

    def load_fitted_state(
        self, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> None:
        super().load_fitted_state(state, device)
        self._shards = 1  # a loaded bank is whole, on every rank

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "bank" in state_dict:
            self._shards = 1

    # -- search ----------------------------------------------------------------------------------------------
    def _check_k(self) -> None:
        self._check_shards("score it")
        if self.k > self.bank_size:
            raise ValueError(
                f"{self.name}: k={self.k} exceeds the {self.bank_size} images of the bank; fit on more "
                "in-distribution images or lower k"
            )

    def top_k(self, queries: torch.Tensor) -> torch.Tensor:
        """Exact keys [B, k] of each query's k nearest bank rows, nearest first: ``-‖q - b‖²`` or ``⟨q, b⟩``.

        Collective when the bank is sharded (every rank calls it, 0 queries allowed).
        """
        self._check_k()
        if self._shards == 1:
            return self.search(queries)[0]
        everyone, counts = all_gather_rows_and_counts(queries)
        if len(everyone) == 0:  # no rank has queries (every rank knows it): nothing to merge
            return queries.new_empty(0, self.k, dtype=_search_dtype(queries, self.bank))
        keys = self.search(everyone)[0]
        keys = F.pad(keys, (0, self.k - keys.shape[1]), value=-math.inf)  # a shard with fewer than k rows
        merged = all_gather_stacked(keys).permute(1, 0, 2).reshape(len(everyone), -1)
        start = sum(counts[:world()[0]])
        return merged[start:start + len(queries)].topk(self.k, dim=1).values

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and rows [Q, min(k, rows)] of each query's k nearest rows of this process's bank (shard).

        Keys as :meth:`top_k`'s, nearest first; rows index ``self.bank``. The
        backend's search, no collectives.
        """
        # faiss ranks its candidates by float32 distances already: no margin for a narrow product needed
        count = min(self.bank.shape[0], self.k if self.backend == "faiss" else rerank_candidates(self.k))
        if count == 0 or len(queries) == 0:
            empty = torch.empty(len(queries), min(self.k, count), dtype=torch.long, device=queries.device)
            return empty.to(_search_dtype(queries, self.bank)), empty
        if self.backend == "faiss":
            index = self._faiss_candidates(queries, count)
        else:
            index = candidate_rows(queries, self.bank, count, self.metric)
        return rerank(queries, self.bank, index, self.k, self.metric)

    def _faiss_candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """Candidate rows [Q, count] from the IVF index; queries it finds fewer for get the exact ones."""
        index = self._faiss_index()
        if hasattr(index, "nprobe"):
            index.nprobe = self.nprobe
        _, found = index.search(queries.detach().to("cpu", torch.float32).contiguous().numpy(), count)
        found = torch.from_numpy(found).to(queries.device)
        short = (found < 0).any(dim=1)
        if bool(short.any()):
            found[short] = candidate_rows(queries[short], self.bank, count, self.metric)
        return found

    def _faiss_index(self) -> Any:
        """The IVF-Flat index of this bank (shard), built on first use (seeded k-means sample)."""
        if self._faiss is not None and self._faiss[0] is self.bank:
            return self._faiss[1]
        import faiss

        bank = self.bank.detach().to("cpu", torch.float32).contiguous()
        rows, width = bank.shape
        lists = max(1, min(round(IVF_LISTS_PER_SQRT_ROW * math.sqrt(rows)), rows // IVF_TRAINING_ROWS_PER_LIST))
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        quantiser = faiss.IndexFlat(width, metric)
        keep: tuple[Any, ...] = (quantiser,)
        index: faiss.Index
        if lists == 1:  # under 78 rows: one list is a flat index, searched whole
            index = quantiser
        else:
            index = faiss.IndexIVFFlat(quantiser, width, lists, metric)
            sample = torch.randperm(rows, generator=torch.Generator().manual_seed(IVF_SEED))
            index.train(bank[sample[:IVF_TRAINING_ROWS_PER_LIST * lists]].numpy())
        index.add(bank.numpy())
        if self.bank.device.type == "cuda" and faiss.get_num_gpus() > 0:
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, self.bank.device.index or 0, index)
            keep += (resources,)
        self._faiss = (self.bank, index, keep)
        return index


class KNN(_FeatureBankDetector):
    """Deep nearest neighbours (Sun, Ming, Zhu & Li, ICML 2022, Sec. 3): the k-th neighbour's distance.

    Fit (no labels): the bank of L2-normalised pre-logits
    ``z_i = f(x_i) / ‖f(x_i)‖`` of the in-distribution training images. Paper
    score ``-‖z - z_(k)‖₂`` for ``z = f(x) / ‖f(x)‖`` and its k-th nearest bank
    row (higher = in-distribution); returned negated, the distance itself,
    computed as ``‖z - b‖`` from the stored row ``b``.

    The paper's k: 50 on CIFAR-10 (200 on CIFAR-100; 1000 on ImageNet with a
    1% random sample of the training set as the bank, which you get by fitting
    on such a sample). Search, sharding over ranks and saving: see
    :mod:`timm_ood.detectors.neighbours`.

    Args:
        k: which neighbour, >= 1 (the whole bank must hold at least k images).
        bank_dtype: dtype the bank is stored in: "float16" / "bfloat16" halve
            its memory, and the scores stay exact for the stored rows (an
            exact float32 re-rank of the candidates).
        backend: "torch" (default): the exact chunked search; "faiss": candidates from
            an approximate faiss IVF-Flat index (``pip install
            timm-ood[faiss]``), re-ranked exactly. "auto", of files saved by
            earlier versions, reads as "torch".
        nprobe: inverted lists the faiss index searches per query
            (``backend="faiss"`` only): more finds more of the true
            neighbours, and takes longer.
    """

    name = "knn"
    paper = "Sun, Ming, Zhu & Li, Out-of-Distribution Detection with Deep Nearest Neighbors, ICML 2022, Sec. 3"
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), fit=True, collective_scores=True)
    search_space: ClassVar = {"k": (1, 5, 10, 20, 50, 100, 200, 500, 1000)}
    metric = "l2"

    def __init__(self, k: int = 50, bank_dtype: str = "float32", backend: str = "torch", nprobe: int = 32) -> None:
        super().__init__(k, bank_dtype, backend, nprobe)

    def bank_rows(self, outputs: Outputs) -> torch.Tensor:
        return F.normalize(outputs.pre_logits.flatten(1), dim=1)

    def score(self, outputs: Outputs) -> torch.Tensor:
        queries = self.bank_rows(outputs)
        distances = (-self.top_k(queries)[:, -1]).sqrt()
        return distances.to(torch.promote_types(queries.dtype, torch.float32))


class NNGuide(_FeatureBankDetector):
    """Nearest neighbour guidance (Park, Jung & Teoh, ICCV 2023): energy scaled by the similarity to a bank.

    Fit (no labels): the bank ``{E(x_i) ẑ_i}`` of the training images'
    L2-normalised pre-logits ``ẑ_i`` scaled by their confidence, the
    energy ``E(x) = log Σ_j exp(l_j(x))`` of the logits. Guidance ``G(x)``: the
    mean of the k largest inner products of ``ẑ(x)`` with the bank. Paper score
    ``E(x) · G(x)`` (higher = in-distribution); returned negated.

    Defaults are the authors' released configuration (k = 10); the paper's
    ImageNet bank is a 1% random sample of the training set: fit on such a
    sample to reproduce it. Search, sharding over ranks and saving: see
    :mod:`timm_ood.detectors.neighbours`.

    Args:
        k: neighbours averaged, >= 1 (the whole bank must hold at least k images).
        bank_dtype: dtype the bank is stored in: "float16" / "bfloat16" halve
            its memory, and the scores stay exact for the stored rows (an
            exact float32 re-rank of the candidates).
        backend: "torch" (default): the exact chunked search; "faiss": candidates from
            an approximate faiss IVF-Flat index (``pip install
            timm-ood[faiss]``), re-ranked exactly. "auto", of files saved by
            earlier versions, reads as "torch".
        nprobe: inverted lists the faiss index searches per query
            (``backend="faiss"`` only): more finds more of the true
            neighbours, and takes longer.
    """

    name = "nnguide"
    paper = "Park, Jung & Teoh, Nearest Neighbor Guidance for Out-of-Distribution Detection, ICCV 2023, Sec. 3"
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS, Need.LOGITS}), fit=True,
                                collective_scores=True)
    search_space: ClassVar = {"k": (1, 5, 10, 20, 50, 100)}
    metric = "ip"

    def __init__(self, k: int = 10, bank_dtype: str = "float32", backend: str = "torch", nprobe: int = 32) -> None:
        super().__init__(k, bank_dtype, backend, nprobe)

    @staticmethod
    def _energy(outputs: Outputs) -> torch.Tensor:
        return torch.logsumexp(score_dtype(outputs.logits), dim=1)

    def bank_rows(self, outputs: Outputs) -> torch.Tensor:
        pre_logits = F.normalize(score_dtype(outputs.pre_logits.flatten(1)), dim=1)
        return pre_logits * self._energy(outputs)[:, None]

    def score(self, outputs: Outputs) -> torch.Tensor:
        queries = F.normalize(score_dtype(outputs.pre_logits.flatten(1)), dim=1)
        guidance = self.top_k(queries).mean(dim=1).to(queries.dtype)
        return -(self._energy(outputs) * guidance)


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [KNN, NNGuide]
