"""The feature store through the public API: a rerun makes no forward, gives the same numbers, and never a stale hit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
from datasets import DatasetInfo

import timm_ood
from timm_ood.data import make_loader
from timm_ood.data.images import images_to_dataset
from timm_ood.evaluation import evaluate_loaders
from timm_ood.store import FeatureStore, StoreFullError
from timm_ood.tap import Need, Tap

OVERLAY = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,), "crop_pct": 1.0}


def grey_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", in_chans=1, num_classes=10, pretrained_cfg_overlay=OVERLAY).eval()


def dataset(count: int, seed: int, label: int | None = None):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10 if label is None else np.full(count, label)
    return images_to_dataset(pixels, labels, info=DatasetInfo(dataset_name=f"set-{seed}"))


@pytest.fixture(scope="module")
def sets():
    return {"fit": dataset(150, 0), "id": dataset(70, 1), "ood": dataset(45, 2, label=-1)}


class ForwardCounter:
    """Images through the model's stem: what the store saves."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        model.conv1.register_forward_hook(lambda module, inputs, output: self.count(len(inputs[0])))

    def count(self, images: int) -> None:
        self.images += images


def run(model, sets, detectors, cache_dir, batch_size=32):
    return evaluate_loaders(
        model, detectors, id_data=make_loader(sets["id"], model, batch_size=batch_size),
        ood_data={"noise": make_loader(sets["ood"], model, batch_size=batch_size)},
        fit_data=make_loader(sets["fit"], model, batch_size=batch_size), progress=False, cache_dir=cache_dir,
    )


def test_a_rerun_is_served_by_the_store_with_the_same_numbers(sets, tmp_path) -> None:
    model = grey_model()
    counter = ForwardCounter(model)
    first = run(model, sets, ["msp", "mahalanobis", "knn", "vim", "gram"], tmp_path)
    assert counter.images == 150 + 70 + 45  # one forward per image: the fit pass and each set
    counter.images = 0
    again = run(model, sets, ["knn", "vim", "msp"], tmp_path)
    assert counter.images == 0, "every output came from the store"
    for detector in ("knn", "vim", "msp"):
        assert again.metrics[detector] == first.metrics[detector]  # the very same tensors: exact
        assert torch.equal(again.scored.scores[detector]["noise"], first.scored.scores[detector]["noise"])
    assert again.accuracy == first.accuracy
    # a detector with input gradients still runs the model, on the evaluation sets only
    with_odin = run(model, sets, ["msp", "odin"], tmp_path)
    assert counter.images > 0 and with_odin.metrics["msp"] == first.metrics["msp"]


def test_what_changes_the_outputs_changes_the_key(sets, tmp_path) -> None:
    model = grey_model()
    counter = ForwardCounter(model)
    run(model, sets, ["msp"], tmp_path)
    counter.images = 0
    run(model, sets, ["knn"], tmp_path)  # pre-logits were not stored: computed, with what was stored before
    assert counter.images == 150 + 70 + 45
    store = FeatureStore(tmp_path)
    assert {frozenset(e.needs) for e in store.entries()} >= {frozenset({Need.LOGITS, Need.PRE_LOGITS})}
    counter.images = 0
    run(model, sets, ["msp", "knn"], tmp_path)
    assert counter.images == 0
    with torch.no_grad():
        model.fc.bias[0] += 1e-3  # another weight: another model
    run(model, sets, ["msp"], tmp_path)
    assert counter.images == 70 + 45
    counter.images = 0
    fewer = {**sets, "id": sets["id"].select(range(69))}  # other data
    run(model, fewer, ["msp"], tmp_path)
    assert counter.images == 69
    counter.images = 0
    run(model.to(torch.float64), sets, ["msp"], tmp_path)  # another dtype
    assert counter.images == 70 + 45


def test_data_without_a_fingerprint_is_never_stored(sets, tmp_path) -> None:
    model = grey_model()
    shuffled = make_loader(sets["fit"], model, batch_size=32, shuffle=True, seed=0)
    assert shuffled.fingerprint is None
    own = [(torch.randn(8, 1, 28, 28), torch.arange(8))]
    timm_ood.wrap(model, "knn", k=5).fit(shuffled, progress=False, cache_dir=tmp_path)
    timm_ood.wrap(model, "knn", k=5).fit(own, progress=False, cache_dir=tmp_path)
    assert FeatureStore(tmp_path).entries() == []


def test_half_written_and_foreign_entries_are_never_read(sets, tmp_path) -> None:
    model = grey_model()
    run(model, sets, ["msp"], tmp_path)
    (entry,) = [e for e in FeatureStore(tmp_path).entries() if e.rows == 45]
    # a crashed writer's temporary directory and an entry of another version next to the real one
    crashed = entry.path.parent / ".writing-logits-deadbeef"
    crashed.mkdir()
    (crashed / "part-000000000000-000000000010.safetensors").write_bytes(b"truncated")
    other = entry.path.parent / "logits+pre_logits"
    other.mkdir()
    manifest = json.loads((entry.path / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "version": 0}))
    counter = ForwardCounter(model)
    again = run(model, sets, ["msp"], tmp_path)
    assert counter.images == 0 and again.metrics["msp"]["noise"]["auroc"] >= 0
    assert {e.path.name for e in FeatureStore(tmp_path).entries()} == {"logits"}


def test_two_writers_of_one_entry_keep_the_first_and_leave_no_debris(sets, tmp_path) -> None:
    model = grey_model()
    tap = Tap(model)
    bound = FeatureStore(tmp_path).bind(model)
    loader = make_loader(sets["ood"], model, batch_size=45)
    images, labels = next(iter(loader))
    outputs = tap(images, {Need.LOGITS})
    writers = [bound.store.writer(bound.key, loader.fingerprint, frozenset({Need.LOGITS}), (0, 45), 45)
               for _ in range(2)]
    for writer in writers:
        writer.add(outputs, labels)
    first, second = (writer.commit() for writer in writers)
    assert first is not None and second is not None and first.path == second.path
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["logits"]
    (read, read_labels), = first.read(tap)
    assert torch.equal(read.logits, outputs.logits) and torch.equal(read_labels, labels)


def test_a_store_that_would_not_fit_the_disk_is_refused_before_writing(sets, tmp_path, monkeypatch) -> None:
    model = grey_model()
    real = __import__("shutil").disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=1000)

    monkeypatch.setattr("timm_ood.store.shutil.disk_usage", nearly_full)
    with pytest.raises(StoreFullError, match=r"would need .* GB .* 150 images .* free"):
        timm_ood.wrap(model, "knn", k=5).fit(make_loader(sets["fit"], model, batch_size=32), progress=False,
                                             cache_dir=tmp_path)
    assert not any(path.name.startswith(".writing-") for path in tmp_path.rglob("*"))


def test_a_store_larger_than_a_shard_reads_back_in_order(sets, tmp_path) -> None:
    model = grey_model()
    store = FeatureStore(tmp_path, shard_bytes=4000)  # a few rows of logits + pre-logits per shard
    ood = timm_ood.wrap(model, "knn", k=3).fit(make_loader(sets["fit"], model, batch_size=32), progress=False,
                                                cache_dir=store)
    (entry,) = store.entries()
    assert len(entry.manifest["shards"]) > 3
    assert [s["start"] for s in entry.manifest["shards"]] == sorted(s["start"] for s in entry.manifest["shards"])
    fresh = timm_ood.wrap(model, "knn", k=3).fit(make_loader(sets["fit"], model, batch_size=32), progress=False)
    assert torch.equal(ood.detector.bank, fresh.detector.bank)


def test_cache_dir_must_be_a_directory(tmp_path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        FeatureStore(path)
    assert os.path.isfile(path)


def test_fitted_states_are_stored_and_loaded_for_the_same_model_data_and_hyperparameters(sets, tmp_path) -> None:
    model = grey_model()
    loader = make_loader(sets["fit"], model, batch_size=32)
    first = timm_ood.wrap(model, "vim").fit(loader, progress=False, cache_dir=tmp_path)
    fitted = sorted(path.name for path in tmp_path.rglob("fitted/*.safetensors"))
    assert len(fitted) == 1 and fitted[0].startswith("vim-")
    again = timm_ood.wrap(model, "vim")
    again.detector.update_fit = None  # a fit would fail: the state must come from the store
    again.fit(loader, progress=False, cache_dir=tmp_path)
    for name, tensor in first.detector.fitted_state().items():
        assert torch.equal(again.detector.fitted_state()[name], tensor), name
    assert again.detector.model_fingerprint == first.detector.model_fingerprint
    images = next(iter(make_loader(sets["id"], model, batch_size=16)))[0]
    assert torch.equal(again.ood_score(images), first.ood_score(images))
    timm_ood.wrap(model, "vim", principal_dim=3).fit(loader, progress=False, cache_dir=tmp_path)  # refits
    assert len(list(tmp_path.rglob("fitted/*.safetensors"))) == 2


def test_outputs_computed_under_autocast_have_their_own_key(sets, tmp_path) -> None:
    model = grey_model()
    counter = ForwardCounter(model)
    plain = run(model, sets, ["msp"], tmp_path)
    counter.images = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run(model, sets, ["msp"], tmp_path)
    assert counter.images == 70 + 45, "bfloat16 outputs are not the float32 ones: computed again"
    counter.images = 0
    again = run(model, sets, ["msp"], tmp_path)
    assert counter.images == 0 and again.metrics == plain.metrics
    assert not torch.equal(autocast.scored.scores["msp"]["noise"], plain.scored.scores["msp"]["noise"])
