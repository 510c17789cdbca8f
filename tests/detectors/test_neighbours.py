"""``knn`` and ``nnguide``: the scores against their papers, and at scale.

The papers' scores on the hand-made feature model
(``tests/detectors/_feature_model.py``); then banks sharded over ranks,
half-precision banks and the faiss IVF backend: there the detectors are fitted
and scored through their own methods on hand-built
:class:`~timm_ood.tap.Outputs`, so a bank's rows and the queries are known
tensors. Sharded results are compared with one process holding the
concatenated data (two gloo ranks, one spawned process for every case).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.special import logsumexp

import timm_ood
from timm_ood.detectors import neighbours
from timm_ood.detectors.neighbours import exact_search, faiss_available
from timm_ood.serialization import load_detector, save_detector
from timm_ood.tap import Outputs

from .._distributed import GLOO_AVAILABLE, gloo_process_group, run_two_ranks
from .._models import batches
from ._feature_model import (
    CHANNELS,
    FeatureModel,
    fit,
    hand_made_data,
    logits_of,
    pooled,
    queries,
    scores_of,
)

# -- the papers' scores on the hand-made feature model ---------------------------------------------------------


@pytest.mark.parametrize("bank_dtype", ["float32", "float16"])
def test_knn_is_the_distance_to_the_kth_nearest_normalised_training_feature(
    bank_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(neighbours, "CHUNK_ELEMENTS", 40)  # 4 bank rows per chunk for 10 queries
    maps, _ = hand_made_data()
    bank = pooled(maps) / np.linalg.norm(pooled(maps), axis=1, keepdims=True)
    bank = bank.astype(bank_dtype).astype(np.float64)
    x = pooled(queries())
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.sort(np.linalg.norm(x[:, None] - bank[None], axis=2), axis=1)[:, 4]
    ood = fit("knn", k=5, bank_dtype=bank_dtype, backend="torch")
    assert ood.detector.bank.dtype == getattr(torch, bank_dtype) and ood.detector.bank.shape == (36, CHANNELS)
    np.testing.assert_allclose(scores_of(ood, queries()), expected, rtol=1e-12)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (the optional 'faiss' extra)")
@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_faiss_search_of_a_small_bank_gives_the_torch_scores(name: str) -> None:
    maps, labels = hand_made_data()  # 36 rows: one inverted list, searched whole; candidates re-ranked exactly
    model = FeatureModel().float()
    data = batches(maps.float(), labels, 5)
    with_torch = timm_ood.wrap(model, name, k=5, backend="torch").fit(data, progress=False)
    with_faiss = timm_ood.wrap(model, name, k=5, backend="faiss").fit(data, progress=False)
    x = queries().float()
    torch.testing.assert_close(with_faiss.ood_score(x), with_torch.ood_score(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_the_backend_auto_of_earlier_files_reads_as_the_exact_torch_search(name: str) -> None:
    assert timm_ood.create_detector(name).backend == "torch"
    assert timm_ood.create_detector(name, backend="auto").backend == "torch"


def test_nnguide_is_the_energy_times_the_mean_similarity_to_the_scaled_bank() -> None:
    maps, _ = hand_made_data()
    z, x = pooled(maps), pooled(queries())
    energy = logsumexp(logits_of(maps), axis=1)
    bank = (z / np.linalg.norm(z, axis=1, keepdims=True) * energy[:, None]).astype(np.float32)  # bank_dtype
    normalised = x / np.linalg.norm(x, axis=1, keepdims=True)
    guidance = np.sort(normalised @ bank.T, axis=1)[:, -5:].mean(1)
    expected = -logsumexp(logits_of(queries()), axis=1) * guidance
    np.testing.assert_allclose(scores_of(fit("nnguide", k=5, backend="torch"), queries()), expected, rtol=1e-12)


# -- at scale, on hand-built Outputs --------------------------------------------------------------------------


WIDTH, CLASSES = 6, 4
#: (fit rows of rank 0, of rank 1, queries of rank 0, of rank 1): uneven shards, an empty shard, no queries
SHARDINGS = {"uneven": (7, 3, 4, 5), "empty-shard": (10, 0, 3, 2), "no-queries": (6, 4, 6, 0)}
#: k = 4 exceeds rank 1's 3 rows in "uneven": its candidates are padded
DETECTORS = {"knn": {"k": 4}, "nnguide": {"k": 3}}


def outputs(count: int, seed: int, width: int = WIDTH, dtype: torch.dtype = torch.float64) -> Outputs:
    """Pre-logits and logits of ``count`` made-up images (the tap is not needed to fit or score)."""
    generator = torch.Generator().manual_seed(seed)
    pre_logits = torch.randn(count, width, generator=generator, dtype=dtype)
    logits = 3 * torch.randn(count, CLASSES, generator=generator, dtype=dtype)
    return Outputs(pre_logits, None, pre_logits=pre_logits, logits=logits)


def fitted(name: str, data: Outputs, batch_size: int = 3, **hyperparameters) -> neighbours._FeatureBankDetector:
    detector = timm_ood.create_detector(name, **{**DETECTORS.get(name, {}), **hyperparameters})
    detector.reset_fit(None)
    for start in range(0, data.batch_size, batch_size):
        detector.update_fit(data.slice(slice(start, start + batch_size)), None)
    detector.finish_fit()
    detector.is_fitted = True
    return detector


def shard(data: Outputs, rank: int, first: int, second: int) -> Outputs:
    return data.slice(slice(0, first) if rank == 0 else slice(first, first + second))


# -- two ranks ------------------------------------------------------------------------------------------------


def sharded_worker(rank: int, init_file: str, results_dir: str) -> None:
    results = {}
    with gloo_process_group(rank, init_file):
        for case, (fit0, fit1, queries0, queries1) in SHARDINGS.items():
            fit_data, query_data = outputs(fit0 + fit1, seed=0), outputs(queries0 + queries1, seed=1)
            for name in DETECTORS:
                detector = fitted(name, shard(fit_data, rank, fit0, fit1))
                scores = detector(shard(query_data, rank, queries0, queries1))
                path = Path(results_dir) / f"{case}-{name}-rank{rank}.safetensors"
                save_detector(detector, path)  # collective: gathers the whole bank
                whole = detector.fitted_state()["bank"]
                loaded = timm_ood.create_detector(name, **DETECTORS[name])
                loaded.load_fitted_state({"bank": whole})  # a whole bank in a distributed job: searched locally
                results[f"{case}-{name}"] = {
                    "shard": detector.bank.clone(), "bank_size": detector.bank_size, "scores": scores,
                    "whole": whole, "state_dict": detector.state_dict()["bank"],
                    "loaded": loaded(shard(query_data, rank, queries0, queries1)),
                }
        last = detector
    try:  # the process group is gone: a shard cannot be scored alone
        last(outputs(2, seed=1))
    except RuntimeError as error:
        results["outside"] = str(error)
    torch.save(results, Path(results_dir) / f"rank{rank}.pt")


@pytest.mark.slow  # ~10 s: starting the second rank's interpreter
@pytest.mark.skipif(not GLOO_AVAILABLE, reason="gloo backend unavailable")
def test_sharded_banks_score_as_one_process_holding_the_whole_bank(tmp_path: Path) -> None:
    run_two_ranks(sharded_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for case, (fit0, fit1, queries0, queries1) in SHARDINGS.items():
        fit_data, query_data = outputs(fit0 + fit1, seed=0), outputs(queries0 + queries1, seed=1)
        for name in DETECTORS:
            one = fitted(name, fit_data)
            expected = one(query_data)
            key = f"{case}-{name}"
            scores = torch.cat([ranks[0][key]["scores"], ranks[1][key]["scores"]])
            if name == "knn":
                assert torch.equal(scores, expected), key
            else:
                torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0, msg=key)
            for rank in range(2):
                result = ranks[rank][key]
                assert torch.equal(result["shard"], one.bank[:fit0] if rank == 0 else one.bank[fit0:]), key
                assert result["bank_size"] == fit0 + fit1, key
                assert torch.equal(result["whole"], one.bank) and torch.equal(result["state_dict"], one.bank), key
                torch.testing.assert_close(result["loaded"], result["scores"], rtol=1e-12, atol=0, msg=key)
                file, _, _ = load_detector(tmp_path / f"{key}-rank{rank}.safetensors")
                assert torch.equal(file.bank, one.bank), key
    for result in ranks:
        assert "fitted over 2 processes" in result["outside"] and "inside the process group" in result["outside"]


# -- one process ----------------------------------------------------------------------------------------------


def test_zero_queries_give_zero_scores() -> None:
    for name in DETECTORS:
        assert fitted(name, outputs(9, seed=0))(outputs(0, seed=1)).shape == (0,)


@pytest.mark.parametrize("bank_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_a_half_precision_bank_scores_as_a_float32_search_of_its_stored_rows(
    name: str, bank_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(neighbours, "CHUNK_ELEMENTS", 50 * 64)  # candidates from chunks of 64 rows
    fit_data, query_data = outputs(3000, seed=0, width=64, dtype=torch.float32), outputs(50, seed=1, width=64,
                                                                                         dtype=torch.float32)
    detector = fitted(name, fit_data, batch_size=500, k=10, bank_dtype=bank_dtype)
    assert detector.bank.dtype == getattr(torch, bank_dtype)  # the memory is narrow
    stored = detector.bank.float()
    if name == "knn":
        queries = detector.bank_rows(query_data)
        distances = (queries[:, None] - stored[None]).square().sum(-1)
        expected = distances.sort(dim=1).values[:, 9].sqrt()
    else:
        queries = torch.nn.functional.normalize(query_data.pre_logits, dim=1)
        guidance = (queries @ stored.T).topk(10, dim=1).values.mean(1)
        expected = -torch.logsumexp(query_data.logits, dim=1) * guidance
    scores = detector(query_data)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=2e-6, atol=1e-7)


def test_the_candidate_product_is_float32_for_a_float16_bank_on_the_cpu() -> None:
    assert neighbours._candidate_dtype(torch.zeros(1, 2, dtype=torch.float16)) == torch.float32
    assert neighbours._candidate_dtype(torch.zeros(1, 2, dtype=torch.float64)) == torch.float64


def test_a_file_of_an_earlier_version_with_backend_auto_loads_as_the_exact_search(tmp_path: Path) -> None:
    bank = torch.nn.functional.normalize(outputs(8, seed=0).pre_logits, dim=1)
    hyperparameters = {"k": 2, "bank_dtype": "float64", "backend": "auto"}  # no nprobe then
    save_file({"bank": bank}, tmp_path / "old.safetensors", metadata={
        "timm_ood.format": "1", "timm_ood.detector": "knn", "timm_ood.fitted": "1",
        "timm_ood.hyperparameters": json.dumps(hyperparameters)})
    detector, _, _ = load_detector(tmp_path / "old.safetensors")
    assert detector.backend == "torch" and detector.bank_size == 8
    query = outputs(3, seed=1)
    expected = (detector.bank_rows(query)[:, None] - bank[None]).norm(dim=-1).sort(dim=1).values[:, 1]
    torch.testing.assert_close(detector(query), expected, rtol=1e-12, atol=0)


# -- faiss ---------------------------------------------------------------------------------------------------


def clustered(rows: int, width: int, clusters: int, seed: int) -> torch.Tensor:
    """L2-normalised Gaussian clusters (ImageNet-like features, small)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, width, generator=generator)
    members = torch.randint(clusters, (rows,), generator=generator)
    return torch.nn.functional.normalize(centres[members] + 0.6 * torch.randn(rows, width, generator=generator), dim=1)


def test_the_faiss_ivf_index_finds_the_neighbours_and_returns_exact_distances() -> None:
    pytest.importorskip("faiss")
    features = clustered(8200, 32, 50, seed=0)
    features, queries = features[:8000], features[8000:]
    detector = fitted("knn", Outputs(features, None, pre_logits=features), batch_size=4000, k=10, backend="faiss")
    exact_keys, exact_rows = exact_search(queries, detector.bank, 10, "l2")
    recalls = []
    for nprobe in (1, 4, 16, 205):
        detector.set_hyperparameters(nprobe=nprobe)
        keys, rows = detector.search(queries)
        recalls.append((rows[:, :, None] == exact_rows[:, None, :]).any(dim=2).float().mean().item())
        # each value is the exact distance of the row it names
        torch.testing.assert_close(keys, -(queries[:, None] - detector.bank[rows]).square().sum(-1), rtol=0, atol=0)
    assert detector._faiss[1].nlist == 205  # min(4 sqrt(8000), 8000 / 39)
    assert recalls == sorted(recalls) and recalls[0] > 0.3 and recalls[2] > 0.95, recalls
    assert recalls[-1] == 1.0  # every list searched: the exact neighbours
    torch.testing.assert_close(detector.search(queries)[0], exact_keys, rtol=0, atol=0)


def test_queries_the_faiss_index_finds_too_few_rows_for_get_the_exact_search() -> None:
    pytest.importorskip("faiss")
    features = clustered(4000, 16, 8, seed=0)
    detector = fitted("nnguide", Outputs(features, None, pre_logits=features, logits=torch.zeros(4000, 3)),
                      batch_size=4000, k=200, backend="faiss", nprobe=1)
    keys, rows = detector.search(features[:20])  # 1 of 102 lists holds ~40 rows, fewer than k = 200
    assert (rows >= 0).all() and rows.shape == (20, 200)
    expected, _ = exact_search(features[:20], detector.bank, 200, "ip")
    torch.testing.assert_close(keys, expected, rtol=1e-6, atol=1e-6)
