"""Nearest-neighbour detectors over a bank of training features: ``knn`` and ``nnguide``.

The fit keeps one row per training image (the method needs them all): the
bank, a buffer [N, D] stored in ``bank_dtype`` on the model's device, saved and
loaded with the detector. Search is exact and never forms an N x N (or
queries x N) matrix at once: the bank is read in chunks of at most
``2**26 / B`` rows, each chunk's top k merged into the running top k, so
1.2M x 2048 training features (4.9 GB in float16, 9.8 GB in float32) and a
batch of queries fit in memory. When ``faiss`` is installed (the ``faiss``
extra: ``pip install timm-ood[faiss]``) a CPU float32 bank is searched by
faiss's exact flat index instead (``backend="auto"``), with the same results
up to float32 rounding.
"""

from __future__ import annotations

import importlib.util
from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, score_dtype
from .collect import gather_rows

__all__ = ["KNN", "NNGuide", "top_k_inner_products", "top_k_nearest"]

#: Queries x bank rows compared at once (256 MB of float32 similarities).
CHUNK_ELEMENTS = 1 << 26
BANK_DTYPES = ("float16", "bfloat16", "float32", "float64")
BACKENDS = ("auto", "torch", "faiss")


def _chunks(bank: torch.Tensor, queries: int, k: int):
    rows = max(k, CHUNK_ELEMENTS // max(queries, 1))
    for start in range(0, bank.shape[0], rows):
        yield bank[start:start + rows]


def _merge_top_k(best: torch.Tensor | None, keys: torch.Tensor, k: int) -> torch.Tensor:
    keys = keys if best is None else torch.cat([best, keys], dim=1)
    return keys.topk(min(k, keys.shape[1]), dim=1).values


def top_k_inner_products(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest inner products ``⟨q, b_i⟩`` of each query with the bank, [B, k] in descending order.

    Exact, in chunks of the bank, in the wider of the two dtypes.
    """
    dtype = torch.promote_types(queries.dtype, bank.dtype)
    queries = queries.to(dtype)
    best = None
    for chunk in _chunks(bank, len(queries), k):
        best = _merge_top_k(best, queries @ chunk.to(dtype).T, k)
    return best


def top_k_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Squared Euclidean distances to the ``k`` nearest bank rows, [B, k] in ascending order.

    Exact, in chunks of the bank: ``‖q - b‖² = ‖q‖² + ‖b‖² - 2⟨q, b⟩``, ranked by
    ``2⟨q, b⟩ - ‖b‖²`` so that rows stored in a narrow dtype rank by their stored values.
    """
    dtype = torch.promote_types(queries.dtype, bank.dtype)
    queries = queries.to(dtype)
    best = None
    for chunk in _chunks(bank, len(queries), k):
        chunk = chunk.to(dtype)
        best = _merge_top_k(best, 2 * queries @ chunk.T - chunk.square().sum(1), k)
    return (queries.square().sum(1, keepdim=True) - best).clamp_min(0)


def faiss_available() -> bool:
    """Whether ``import faiss`` would work (the optional ``faiss`` extra)."""
    return importlib.util.find_spec("faiss") is not None


class _FeatureBankDetector(Detector):
    """A bank of one row per training image, searched exactly; subclasses say what a row is and how to score."""

    requirements: ClassVar[Requirements]
    fit_hyperparameters: ClassVar = frozenset({"bank_dtype"})

    def __init__(self, k: int, bank_dtype: str, backend: str) -> None:
        super().__init__()
        self.k = k
        self.bank_dtype = bank_dtype
        self.backend = backend
        self.check_hyperparameters()
        self.register_buffer("bank", None)
        self._rows: list[torch.Tensor] = []
        self._faiss: tuple[torch.Tensor, Any] | None = None  # (the bank it indexes, the index)

    def check_hyperparameters(self) -> None:
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"{self.name}: k must be an int >= 1, got {self.k!r}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ValueError(f"{self.name}: bank_dtype must be one of {BANK_DTYPES}, got {self.bank_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "faiss" and not faiss_available():
            raise ValueError(f"{self.name}: backend='faiss' needs faiss: pip install timm-ood[faiss]")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_faiss"] = None  # a faiss index cannot be copied or pickled; it is rebuilt from the bank
        return state

    @abstractmethod
    def bank_rows(self, outputs: Outputs) -> torch.Tensor:
        """The bank rows [B, D] of a batch of training images."""

    def reset_fit(self, tap: Tap) -> None:
        self._rows = []

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        self._rows.append(self.bank_rows(outputs).detach().to(getattr(torch, self.bank_dtype)))

    def finish_fit(self) -> None:
        bank = torch.cat(self._rows)
        self._rows = []
        self.bank = gather_rows(bank)

    def _check_k(self) -> None:
        if self.k > self.bank.shape[0]:
            raise ValueError(
                f"{self.name}: k={self.k} exceeds the {self.bank.shape[0]} images of the bank; fit on more "
                "in-distribution images or lower k"
            )

    def _use_faiss(self) -> bool:
        if self.backend == "faiss":
            return True
        return (self.backend == "auto" and self.bank.device.type == "cpu"
                and self.bank.dtype == torch.float32 and faiss_available())

    def _faiss_search(self, queries: torch.Tensor, index_type: str) -> torch.Tensor:
        """faiss's exact search of the bank (an ``IndexFlat`` built once per bank), [B, k] float32."""
        import faiss

        if self._faiss is None or self._faiss[0] is not self.bank:
            index = getattr(faiss, index_type)(self.bank.shape[1])
            index.add(self.bank.detach().to("cpu", torch.float32).contiguous().numpy())
            self._faiss = (self.bank, index)
        values, _ = self._faiss[1].search(queries.detach().to("cpu", torch.float32).contiguous().numpy(), self.k)
        return torch.from_numpy(values).to(queries.device)


class KNN(_FeatureBankDetector):
    """Deep nearest neighbours (Sun, Ming, Zhu & Li, ICML 2022, Sec. 3): the k-th neighbour's distance.

    Fit (no labels): the bank of L2-normalised pre-logits features
    ``z_i = f(x_i) / ‖f(x_i)‖`` of the in-distribution training images. Paper
    score ``-‖z - z_(k)‖₂`` for ``z = f(x) / ‖f(x)‖`` and its k-th nearest bank
    row (higher = in-distribution); returned negated, the distance itself.

    The paper's k: 50 on CIFAR-10 (200 on CIFAR-100; 1000 on ImageNet with a
    1% random sample of the training set as the bank, which you get by fitting
    on such a sample).

    Args:
        k: which neighbour, >= 1 (the bank must hold at least k images).
        bank_dtype: dtype the bank is stored in ("float16" halves its memory).
        backend: "torch" (exact chunked search), "faiss" (faiss's exact
            ``IndexFlatL2`` on the CPU) or "auto" (faiss when it is installed
            and the bank is a CPU float32 one).
    """

    name = "knn"
    paper = "Sun, Ming, Zhu & Li, Out-of-Distribution Detection with Deep Nearest Neighbors, ICML 2022, Sec. 3"
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS}), fit=True)
    search_space: ClassVar = {"k": (1, 5, 10, 20, 50, 100, 200, 500, 1000)}

    def __init__(self, k: int = 50, bank_dtype: str = "float32", backend: str = "auto") -> None:
        super().__init__(k, bank_dtype, backend)

    def bank_rows(self, outputs: Outputs) -> torch.Tensor:
        return F.normalize(outputs.pre_logits.flatten(1), dim=1)

    def score(self, outputs: Outputs) -> torch.Tensor:
        self._check_k()
        queries = self.bank_rows(outputs)
        if self._use_faiss():
            squared = self._faiss_search(queries, "IndexFlatL2")[:, -1].clamp_min(0)
        else:
            squared = top_k_nearest(queries, self.bank, self.k)[:, -1]
        return score_dtype(squared.sqrt().to(queries.dtype))


class NNGuide(_FeatureBankDetector):
    """Nearest neighbour guidance (Park, Jung & Teoh, ICCV 2023): energy scaled by the similarity to a bank.

    Fit (no labels): the bank ``{E(x_i) ẑ_i}`` of the training images'
    L2-normalised pre-logits features ``ẑ_i`` scaled by their confidence, the
    energy ``E(x) = log Σ_j exp(l_j(x))`` of the logits. Guidance ``G(x)``: the
    mean of the k largest inner products of ``ẑ(x)`` with the bank. Paper score
    ``E(x) · G(x)`` (higher = in-distribution); returned negated.

    Defaults are the authors' released configuration (k = 10); the paper's
    ImageNet bank is a 1% random sample of the training set: fit on such a
    sample to reproduce it.

    Args:
        k: neighbours averaged, >= 1 (the bank must hold at least k images).
        bank_dtype: dtype the bank is stored in ("float16" halves its memory).
        backend: "torch" (exact chunked search), "faiss" (faiss's exact
            ``IndexFlatIP`` on the CPU) or "auto" (faiss when it is installed
            and the bank is a CPU float32 one).
    """

    name = "nnguide"
    paper = "Park, Jung & Teoh, Nearest Neighbor Guidance for Out-of-Distribution Detection, ICCV 2023, Sec. 3"
    requirements = Requirements(outputs=frozenset({Need.PRE_LOGITS, Need.LOGITS}), fit=True)
    search_space: ClassVar = {"k": (1, 5, 10, 20, 50, 100)}

    def __init__(self, k: int = 10, bank_dtype: str = "float32", backend: str = "auto") -> None:
        super().__init__(k, bank_dtype, backend)

    @staticmethod
    def _energy(outputs: Outputs) -> torch.Tensor:
        return torch.logsumexp(score_dtype(outputs.logits), dim=1)

    def bank_rows(self, outputs: Outputs) -> torch.Tensor:
        features = F.normalize(score_dtype(outputs.pre_logits.flatten(1)), dim=1)
        return features * self._energy(outputs)[:, None]

    def score(self, outputs: Outputs) -> torch.Tensor:
        self._check_k()
        queries = F.normalize(score_dtype(outputs.pre_logits.flatten(1)), dim=1)
        if self._use_faiss():
            similarities = self._faiss_search(queries, "IndexFlatIP")
        else:
            similarities = top_k_inner_products(queries, self.bank, self.k)
        guidance = similarities.to(queries.dtype).mean(dim=1)
        return -(self._energy(outputs).to(queries.dtype) * guidance)


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [KNN, NNGuide]
