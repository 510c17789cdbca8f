"""OpenOOD v1.5 benchmarks: image lists, groups, validation sets, full-spectrum, group averages."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import Image
from PIL import Image as PILImage
from sklearn.metrics import roc_auc_score

from timm_ood import data
from timm_ood.cli import main
from timm_ood.data.images import encode_png
from timm_ood.data.openood import OPENOOD_DIR_ENV, read_image_list
from timm_ood.evaluation.results import EvaluationResults, metrics_per_set
from timm_ood.scoring import ScoredSets

pytestmark = pytest.mark.usefixtures("data_cache_dir", "data_hub_offline")

#: (data_dir, folder, list (under benchmark_imglist), images listed, label of listed images)
_CIFAR10_LISTS = [
    ("images_classic", "cifar10", "cifar10/train_cifar10", 6, None),
    ("images_classic", "cifar10", "cifar10/val_cifar10", 3, None),
    ("images_classic", "cifar10", "cifar10/test_cifar10", 5, None),
    ("images_classic", "cifar100", "cifar10/test_cifar100", 4, None),
    ("images_classic", "tin", "cifar10/test_tin", 4, -1),
    ("images_classic", "tin", "cifar10/val_tin", 2, -1),
    ("images_classic", "mnist", "cifar10/test_mnist", 3, -1),
    ("images_classic", "svhn", "cifar10/test_svhn", 3, -1),
    ("images_classic", "texture", "cifar10/test_texture", 3, -1),
    ("images_classic", "places365", "cifar10/test_places365", 3, -1),
    ("images_classic", "cifar10c", "cifar10/test_cifar10c", 4, None),
]
_IMAGENET_LISTS = [
    ("images_largescale", "imagenet_1k", "imagenet/train_imagenet", 4, None),
    ("images_largescale", "imagenet_1k", "imagenet/val_imagenet", 2, None),
    ("images_largescale", "imagenet_1k", "imagenet/test_imagenet", 3, None),
    ("images_largescale", "ssb_hard", "imagenet/test_ssb_hard", 2, -1),
    ("images_largescale", "ninco", "imagenet/test_ninco", 2, -1),
    ("images_largescale", "inaturalist", "imagenet/test_inaturalist", 2, -1),
    ("images_classic", "texture", "imagenet/test_textures", 2, -1),
    ("images_largescale", "openimage_o", "imagenet/test_openimage_o", 3, -1),
    ("images_largescale", "openimage_o", "imagenet/val_openimage_o", 2, -1),
    *(("images_largescale", f"imagenet_{s}", f"imagenet/test_imagenet_{s}", 2, None) for s in ("v2", "c", "r", "es")),
]


def _write_root(root: Path, lists: list, side: int, unlisted: int = 2) -> None:
    """An OpenOOD data root: images, plus lists naming all but ``unlisted`` of each folder's images."""
    rng = np.random.default_rng(0)
    for data_dir, folder, name, count, label in lists:
        stem = name.replace("/", "_")
        images = root / data_dir / folder / stem
        images.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count + unlisted):
            PILImage.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(images / f"{i}.png")
            if i < count:
                lines.append(f"{folder}/{stem}/{i}.png {label if label is not None else i % 3}")
        listed = root / "benchmark_imglist" / f"{name}.txt"
        listed.parent.mkdir(parents=True, exist_ok=True)
        listed.write_text("\n".join(lines) + "\n\n")


@pytest.fixture(scope="module")
def openood_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openood")
    _write_root(root, _CIFAR10_LISTS, 32)
    _write_root(root, _IMAGENET_LISTS, 224)
    return root


def test_the_image_list_format_is_openoods(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("a/0.png 3\nb/1.png -1\n\nc/2.png {'label': 5}\n")
    paths, labels = read_image_list(listed)
    assert paths == ["a/0.png", "b/1.png", "c/2.png"] and labels.tolist() == [3, -1, 0]
    listed.write_text("/abs/0.png 1\n")
    with pytest.raises(ValueError, match="relative path"):
        read_image_list(listed)


def test_openood_cifar10_from_its_lists(openood_root, monkeypatch):
    monkeypatch.setenv(OPENOOD_DIR_ENV, str(openood_root))
    bench = data.load_benchmark("openood-cifar10")
    assert dict(bench.groups) == {"near": ("cifar100", "tin"), "far": ("mnist", "svhn", "texture", "places365")}
    # the lists select exactly the listed images (2 unlisted per folder stay out); nothing is held out
    assert len(bench.id_train) == 6 and len(bench.id_test) == 5
    assert {name: len(ds) for name, ds in bench.ood.items()} == {
        "cifar100": 4, "tin": 4, "mnist": 3, "svhn": 3, "texture": 3, "places365": 3}
    assert bench.id_test["label"][:] == [0, 1, 2, 0, 1]
    assert all(ds["label"][:] == [-1] * len(ds) for ds in bench.ood.values())  # CIFAR-100 relabelled as OOD
    # tuning on OpenOOD's validation lists, not on test images
    assert len(bench.tuning.id) == 3 and list(bench.tuning.ood) == ["tin-val"]
    assert len(bench.tuning.ood["tin-val"]) == 2
    assert bench.tuning.ood["tin-val"][0]["image"].size == (32, 32)
    assert bench.full_spectrum == {}
    assert bench.metadata["groups"]["near"] == ["cifar100", "tin"]
    assert bench.metadata["validation_ood"]["tin-val"]["params"]["imglist"].endswith("cifar10/val_tin.txt")
    shifted = data.load_benchmark("openood-cifar10", full_spectrum=True).full_spectrum
    assert list(shifted) == ["cifar10-c"] and shifted["cifar10-c"]["label"][:] == [0, 1, 2, 0]


def test_openood_imagenet1k_full_spectrum_at_224(openood_root):
    params = {"path": openood_root}
    sources = {name: params for name in data.list_sources("openood-*")}
    bench = data.load_benchmark("openood-imagenet1k", source_params=sources, full_spectrum=True)
    assert dict(bench.groups) == {"near": ("ssb-hard", "ninco"), "far": ("inaturalist", "textures", "openimage-o")}
    assert list(bench.full_spectrum) == ["imagenet-v2", "imagenet-c", "imagenet-r", "imagenet-es"]
    assert bench.full_spectrum["imagenet-r"]["label"][:] == [0, 1]
    assert len(bench.ood["openimage-o"]) == 3 and len(bench.tuning.ood["openimage-o-val"]) == 2
    assert bench.id_test[0]["image"].size == (224, 224)
    assert bench.model_overlay()["input_size"] == (3, 224, 224)
    with pytest.raises(ValueError, match="no covariate-shifted"):
        data.load_benchmark("openood-cifar100", full_spectrum=True)


def test_a_missing_validation_list_falls_back_to_holdouts_with_a_warning(openood_root, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(openood_root / "benchmark_imglist", root / "benchmark_imglist")
    (root / "images_classic").symlink_to(openood_root / "images_classic")
    (root / "benchmark_imglist" / "cifar10" / "val_tin.txt").unlink()
    monkeypatch.setenv(OPENOOD_DIR_ENV, str(root))
    with pytest.warns(UserWarning, match="not OpenOOD's"):
        bench = data.load_benchmark("openood-cifar10")
    assert sorted(bench.tuning.ood) == sorted(bench.ood)  # ODIN's holdouts of each test set
    assert len(bench.tuning.id) == 3  # the ID validation list still loaded
    assert bench.metadata["validation_ood"] == "held out of each OOD test set"


def test_local_mirrors_with_the_hub_schema(tmp_path):
    features = datasets.Features({"img": Image(), "fine_label": datasets.Value("int64")})
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in encode_png(pixels)],
                                "fine_label": [5, 6, 7, 8]}, features=features).to_parquet(str(tmp_path / "c.parquet"))
    cifar100 = data.load_source("openood-cifar100", "test", path=tmp_path / "c.parquet")
    assert cifar100["label"][:] == [5, 6, 7, 8]
    as_ood = data.load_source("openood-cifar100", "test", path=tmp_path / "c.parquet", as_ood=True)
    assert as_ood["label"][:] == [-1] * 4
    flat = tmp_path / "ssb"  # XuZhan1/SSB_hard is a flat set of images
    flat.mkdir()
    for i in range(3):
        PILImage.fromarray(np.full((224, 224, 3), 30 * i, dtype=np.uint8)).save(flat / f"{i}.jpg")
    ssb = data.load_source("openood-ssb-hard", "test", path=flat)
    assert len(ssb) == 3 and ssb["label"][:] == [-1] * 3 and ssb[0]["image"].size == (224, 224)


def test_offline_hub_and_local_only_errors(monkeypatch):
    monkeypatch.delenv(OPENOOD_DIR_ENV, raising=False)
    with pytest.raises(data.HubUnavailableError, match="ILSVRC/imagenet-1k"):
        data.load_source("imagenet-1k", "train")
    with pytest.raises(data.HubUnavailableError, match="XuZhan1/SSB_hard"):
        data.load_source("openood-ssb-hard")
    with pytest.raises(data.DataNotFoundError, match=r"no verified hub copy.*TIMM_OOD_OPENOOD_DIR"):
        data.load_source("openood-ninco")
    with pytest.raises(data.DataNotFoundError, match="serves only train, test"):
        data.load_source("openood-cifar10", "val")
    assert data.get_source("imagenet-1k").hub_id == "ILSVRC/imagenet-1k"


def _fpr_by_hand(id_scores: np.ndarray, ood_scores: np.ndarray, positive: str) -> float:
    """FPR at 95% TPR, written out from the definitions in methods/metrics.md (no ties here)."""
    if positive == "id":  # accept as ID when score <= t; t: 95% of ID accepted
        t = np.sort(id_scores)[math.ceil(0.95 * len(id_scores)) - 1]
        return float(np.mean(ood_scores <= t))
    t = np.sort(ood_scores)[::-1][math.ceil(0.95 * len(ood_scores)) - 1]  # flag as OOD when score >= t
    return float(np.mean(id_scores >= t))


def test_near_and_far_averages_in_both_readings():
    rng = np.random.default_rng(0)
    sets = {"id": rng.normal(0, 1, 400), "a": rng.normal(0.5, 1, 300), "b": rng.normal(1, 1, 200),
            "c": rng.normal(2, 1, 100)}
    scores = {name: torch.tensor(v, dtype=torch.float64) for name, v in sets.items()}
    ood_sets = ["a", "b", "c"]
    results = EvaluationResults(
        benchmark="openood-test", model="m", detectors=["det"], ood_sets=ood_sets,
        metrics={"det": metrics_per_set(scores, "id", ood_sets, tpr=0.95, positive="id")},
        accuracy=0.9, fit_seconds={}, score_seconds={}, forward_seconds=0.0,
        settings={"tpr": 0.95, "positive": "id", "ood_groups": {"near": ["a", "b"], "far": ["c"]},
                  "full_spectrum_accuracy": {"imagenet-v2": 0.5}},
        scored=ScoredSets(scores={"det": scores}),
    )

    def auroc(name: str) -> float:
        y = np.r_[np.zeros(len(sets["id"])), np.ones(len(sets[name]))]
        return roc_auc_score(y, np.r_[sets["id"], sets[name]])

    for positive in ("id", "ood"):
        summary = results.group_summary(positive)["det"]
        assert summary["near"]["auroc"] == pytest.approx((auroc("a") + auroc("b")) / 2, abs=1e-12)
        assert summary["far"]["auroc"] == pytest.approx(auroc("c"), abs=1e-12)
        fprs = {n: _fpr_by_hand(sets["id"], sets[n], positive) for n in ood_sets}
        assert summary["near"]["fpr_at_tpr"] == pytest.approx((fprs["a"] + fprs["b"]) / 2, abs=1e-12)
        assert summary["far"]["fpr_at_tpr"] == pytest.approx(fprs["c"], abs=1e-12)
    id_reading, ood_reading = results.group_summary("id")["det"], results.group_summary("ood")["det"]
    assert id_reading["near"]["fpr_at_tpr"] != ood_reading["near"]["fpr_at_tpr"]
    assert id_reading["near"]["aupr_in"] == pytest.approx(ood_reading["near"]["aupr_in"])
    assert "**near-OOD**" in results.table() and "**far-OOD**" in results.table()
    report = results.markdown()
    assert "OOD positive (OpenOOD)" in report and "ID positive" in report and "imagenet-v2 | 50.00" in report
    saved = json.loads(json.dumps(results.to_dict(), default=str))
    assert set(saved["groups"]) == {"id", "ood"}
    reloaded = EvaluationResults(**{k: saved[k] for k in ("benchmark", "model", "detectors", "ood_sets", "metrics",
                                                          "accuracy", "fit_seconds", "score_seconds",
                                                          "forward_seconds", "settings")},
                                 group_metrics=saved["groups"])
    assert reloaded.group_summary("ood")["det"]["far"]["fpr_at_tpr"] == ood_reading["far"]["fpr_at_tpr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = EvaluationResults(benchmark="b", model="m", detectors=["det"], ood_sets=ood_sets,
                                  metrics=results.metrics, accuracy=None, fit_seconds={}, score_seconds={},
                                  forward_seconds=0.0, settings={"tpr": 0.95})
        assert plain.group_summary() == {} and "near" not in plain.table() and "groups" not in plain.to_dict()


def test_list_benchmarks_shows_openood_groups_and_sources(capsys):
    assert main(["list", "benchmarks"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| openood-imagenet1k "))
    assert "near: ssb-hard = openood-ssb-hard:test (XuZhan1/SSB_hard), ninco = openood-ninco:test (local copy only)" in row
    assert "far: inaturalist = openood-inaturalist:test (torch-uncertainty/inaturalist)" in row
    assert "tuning: openimage-o-val = openood-openimage-o:val (local copy only)" in row
    assert "full-spectrum: imagenet-v2, imagenet-c, imagenet-r, imagenet-es" in row
    for name in ("openood-cifar10", "openood-cifar100", "openood-imagenet200"):
        assert f"| {name} |" in out
