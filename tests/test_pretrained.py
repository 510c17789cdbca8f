"""Fitted detectors as Hub artifacts: save_pretrained / from_pretrained / push_to_hub, all offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import save_file

import timm_ood
from timm_ood import FormatVersionError, HubUnavailableError, IncompatibleModelError
from timm_ood.errors import WeightsUnavailableError
from timm_ood.evaluation import EvaluationResults, evaluate_loaders
from timm_ood.pretrained import CONFIG_NAME, DETECTOR_NAME, FORMAT_VERSION, MODEL_CARD_NAME

from ._models import DIGITS_MEAN, DIGITS_STD, IMAGE_SIZE, create, noise_images

OVERLAY = {"input_size": (1, IMAGE_SIZE, IMAGE_SIZE), "mean": (DIGITS_MEAN,), "std": (DIGITS_STD,), "crop_pct": 1.0}


def random_batches(n: int = 120, seed: int = 0, batch_size: int = 40) -> list:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.arange(n) % 10
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, n, batch_size)]


def weights_file(tmp_path: Path, architecture: str = "test_resnet", seed: int = 0) -> Path:
    """A user's checkpoint of ``architecture`` (random weights, 10 classes, 1 channel)."""
    torch.manual_seed(seed)
    path = tmp_path / f"{architecture}-{seed}.safetensors"
    save_file(create(architecture).state_dict(), str(path))
    return path


def fitted(tmp_path: Path, architecture: str = "test_resnet", detector: str = "mahalanobis", **detector_kwargs):
    """A timm model made from a local weights file (timm's file route), fitted and calibrated at TPR 0.9."""
    file = weights_file(tmp_path, architecture)
    extra = {"img_size": IMAGE_SIZE} if "vit" in architecture else {}
    ood = timm_ood.create_model(
        architecture, detector, detector_kwargs, pretrained=True, num_classes=10, in_chans=1,
        pretrained_cfg_overlay={**OVERLAY, "file": str(file), "num_classes": 10}, **extra)
    ood.fit(random_batches(), progress=False)
    ood.calibrate(random_batches(seed=1), tpr=0.9, progress=False)
    return ood, file


@pytest.mark.parametrize(("architecture", "detector", "kwargs"), [
    ("test_resnet", "mahalanobis", {}),
    ("test_vit", "knn", {"k": 5}),
])
def test_save_and_load_give_identical_scores(tmp_path: Path, architecture: str, detector: str, kwargs) -> None:
    ood, file = fitted(tmp_path, architecture, detector, **kwargs)
    folder = ood.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, DETECTOR_NAME, MODEL_CARD_NAME])

    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format"] == FORMAT_VERSION and config["timm_ood_version"] == timm_ood.__version__
    assert config["model"]["architecture"] == architecture and config["model"]["tag"] == "r160_in1k"
    assert config["model"]["hf_hub_id"] == f"timm/{architecture}.r160_in1k"
    assert (config["model"]["num_classes"], config["model"]["in_chans"]) == (10, 1)
    assert config["model"]["pretrained_cfg_overlay"]["mean"] == [DIGITS_MEAN]
    assert config["model"]["pretrained_file"] == file.name
    assert len(config["model"]["weights_sha256"]) == 64
    # the first 16 digits are the fingerprint's whole-model digest
    assert config["model"]["weights_sha256"][:16] == ood.detector.model_fingerprint.weights["float32"]
    assert config["detector"] == {"name": detector, "hyperparameters": ood.detector.hyperparameters(),
                                  "fitted": True, "file": DETECTOR_NAME}
    assert config["threshold"] == float(ood.threshold) and config["threshold_tpr"] == 0.9

    loaded = timm_ood.from_pretrained(folder, weights=file)  # the vit's img_size comes from the config
    images = random_batches(seed=2)[0][0]
    assert torch.equal(loaded.ood_score(images), ood.ood_score(images))
    assert torch.equal(loaded.threshold, ood.threshold) and loaded.threshold_tpr == 0.9
    assert torch.equal(loaded.predict(images), ood.predict(images))
    assert loaded.pretrained_cfg["mean"] == (DIGITS_MEAN,)
    # the method on the class is the same call, and a loaded model saves again
    again = timm_ood.OODModel.from_pretrained(loaded.save_pretrained(tmp_path / "again"), weights=file)
    assert torch.equal(again.ood_score(images), ood.ood_score(images))


def test_other_weights_are_refused(tmp_path: Path) -> None:
    ood, _ = fitted(tmp_path)
    folder = ood.save_pretrained(tmp_path / "saved")
    other = weights_file(tmp_path, seed=1)
    with pytest.raises(IncompatibleModelError, match=r"fitted on other weights.*weights"):
        timm_ood.from_pretrained(folder, weights=other)
    with pytest.warns(UserWarning, match="strict=False"):
        loaded = timm_ood.from_pretrained(folder, weights=other, strict=False)
    assert loaded.detector.is_fitted


def test_own_weights_need_weights(tmp_path: Path) -> None:
    ood = timm_ood.create_model("test_resnet", "mahalanobis", pretrained=False, num_classes=10, in_chans=1,
                                pretrained_cfg_overlay=OVERLAY)
    ood.fit(random_batches(), progress=False)
    folder = ood.save_pretrained(tmp_path / "saved")
    assert json.loads((folder / CONFIG_NAME).read_text())["model"]["pretrained"] is False
    with pytest.raises(ValueError, match=r"weights of its own .*weights='checkpoint.safetensors'"):
        timm_ood.from_pretrained(folder)
    file = tmp_path / "own.safetensors"
    save_file(ood.model.state_dict(), str(file))
    loaded = timm_ood.from_pretrained(folder, weights=file)
    images = random_batches(seed=2)[0][0]
    assert torch.equal(loaded.ood_score(images), ood.ood_score(images))
    assert loaded.threshold is None and loaded.threshold_tpr is None
    assert "weights=\"checkpoint.safetensors\"" in (folder / MODEL_CARD_NAME).read_text()


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    ood, file = fitted(tmp_path)
    folder = ood.save_pretrained(tmp_path / "saved")
    config = json.loads((folder / CONFIG_NAME).read_text())
    for format_version, fix in ((FORMAT_VERSION + 1, r"install timm-ood>=9\.0"), (0, "save it again")):
        config.update(format=format_version, timm_ood_version="9.0")
        (folder / CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(FormatVersionError, match=fix) as error:
            timm_ood.from_pretrained(folder, weights=file)
        assert "\n" not in str(error.value) and "9.0" in str(error.value)


def test_not_a_saved_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        timm_ood.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        timm_ood.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs a timm model"):
        timm_ood.wrap(torch.nn.Linear(4, 3), "msp").save_pretrained(tmp_path / "x")


def _results(ood: timm_ood.OODModel, tpr: float) -> EvaluationResults:
    return evaluate_loaders(ood.model, [ood.detector], id_data=random_batches(seed=3),
                            ood_data={"noise": [(noise_images(60), torch.full((60,), -1))],
                                      "shifted": [(b[0] + 3, b[1]) for b in random_batches(60, seed=4)]},
                            tpr=tpr, benchmark="digits", progress=False)


def test_model_card_has_the_results_and_the_expected_fpr(tmp_path: Path) -> None:
    ood, _ = fitted(tmp_path)
    results = _results(ood, tpr=0.9)
    folder = ood.save_pretrained(tmp_path / "saved", results=results)
    card = ModelCard.load(folder / MODEL_CARD_NAME)
    assert card.data.library_name == "timm-ood"
    assert card.data.tags == ["timm", "out-of-distribution-detection", "timm-ood"]
    assert card.data.base_model == "timm/test_resnet.r160_in1k"
    by_metric = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    for ood_set in ("noise", "shifted"):
        metrics = results.metrics["mahalanobis"][ood_set]
        assert by_metric[(ood_set, "auroc")] == round(100 * metrics["auroc"], 2)
        assert by_metric[(ood_set, "fpr@90tpr")] == round(100 * metrics["fpr_at_tpr"], 2)
    fpr = results.metrics["mahalanobis"]["noise"]["fpr_at_tpr"]
    assert "Expected false-positive rate at the stored threshold" in card.text
    assert f"{100 * fpr:.1f}% on `noise`" in card.text
    assert "distributed like the evaluation" in card.text
    assert 'timm_ood.from_pretrained("path/to/folder")' in card.text

    # results at another TPR: the FPR at the threshold's TPR comes from the raw scores, or is said to be unknown
    other = _results(ood, tpr=0.95)
    text = ModelCard.load(ood.save_pretrained(tmp_path / "other", results=other) / MODEL_CARD_NAME).text
    assert f"{100 * fpr:.1f}% on `noise`" in text
    other.scored = None
    text = ModelCard.load(ood.save_pretrained(tmp_path / "unscored", results=other) / MODEL_CARD_NAME).text
    assert "evaluate with `tpr=0.9`" in text

    wrong = evaluate_loaders(ood.model, ["msp"], id_data=random_batches(seed=3),
                             ood_data={"noise": [(noise_images(60), torch.full((60,), -1))]}, progress=False)
    with pytest.raises(ValueError, match="'mahalanobis'"):
        ood.save_pretrained(tmp_path / "wrong", results=wrong)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))


@pytest.mark.usefixtures("offline")
def test_offline_hub_calls_fail_fast_and_clearly(tmp_path: Path) -> None:
    ood, _ = fitted(tmp_path)
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"HF_HUB_OFFLINE.*save_pretrained") as error:
        timm_ood.from_pretrained("my-org/x")
    assert "\n" not in str(error.value)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE") as error:
        ood.push_to_hub("my-org/x")
    assert "\n" not in str(error.value)
    # a local folder loads offline; the tag's weights are not cached: the error names weights=FILE
    folder = ood.save_pretrained(tmp_path / "saved")
    with pytest.raises(WeightsUnavailableError, match="weights=FILE"):
        timm_ood.from_pretrained(folder)
    assert time.perf_counter() - started < 10


class _Commit:
    commit_url = "https://huggingface.co/my-org/x/commit/0123"


def test_push_to_hub_uploads_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi, RepoUrl

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = (repo_id, kwargs)

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = kwargs
        calls["files"] = {p.name: p.read_bytes() for p in folder.iterdir()}
        return _Commit()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    ood, file = fitted(tmp_path)
    url = ood.push_to_hub("my-org/x", private=True, revision="v1", commit_message="detector")
    assert url == _Commit.commit_url
    assert calls["create_repo"] == ("my-org/x", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["create_branch"][1]["branch"] == "v1"
    assert calls["upload_folder"]["repo_id"] == "my-org/x" and calls["upload_folder"]["revision"] == "v1"
    assert calls["upload_folder"]["commit_message"] == "detector"
    assert sorted(calls["files"]) == sorted([CONFIG_NAME, DETECTOR_NAME, MODEL_CARD_NAME])
    assert b'timm_ood.from_pretrained("my-org/x")' in calls["files"][MODEL_CARD_NAME]
    # the uploaded folder loads back
    for name, data in calls["files"].items():
        (tmp_path / "pulled").mkdir(exist_ok=True)
        (tmp_path / "pulled" / name).write_bytes(data)
    loaded = timm_ood.from_pretrained(tmp_path / "pulled", weights=file)
    images = random_batches(seed=2)[0][0]
    assert torch.equal(loaded.ood_score(images), ood.ood_score(images))


def test_push_to_hub_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def create_repo(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    ood, _ = fitted(tmp_path)
    with pytest.raises(HubUnavailableError, match="cannot be reached"):
        ood.push_to_hub("my-org/x")


def test_threshold_tpr_travels_and_state_dict_takes_the_threshold(tmp_path: Path) -> None:
    ood, _ = fitted(tmp_path)
    ood.save_detector(tmp_path / "d.safetensors")
    fresh = timm_ood.wrap(ood.model, "mahalanobis")
    fresh.load_detector(tmp_path / "d.safetensors")
    assert torch.equal(fresh.threshold, ood.threshold) and fresh.threshold_tpr == 0.9
    # a calibrated state loads into an uncalibrated model (the threshold key used to be "unexpected")
    other = timm_ood.wrap(create("test_resnet"), "mahalanobis")
    other.load_state_dict(ood.state_dict())
    assert torch.equal(other.threshold, ood.threshold)
    images = random_batches(seed=2)[0][0]
    assert torch.equal(other.ood_score(images), ood.ood_score(images))


def test_no_pickle() -> None:
    import timm_ood.pretrained
    import timm_ood.serialization

    for module in (timm_ood.pretrained, timm_ood.serialization):
        source = Path(module.__file__).read_text()
        assert "torch.load" not in source and "import pickle" not in source


def test_push_to_hub_without_a_login_says_how_to_log_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    # the HTTP client huggingface_hub is built on: httpx2 in 2.x, httpx in 1.x
    httpx = next(importlib.import_module(m) for m in ("httpx2", "httpx") if importlib.util.find_spec(m))

    def create_repo(self, repo_id, **kwargs):
        response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    ood, _ = fitted(tmp_path)
    with pytest.raises(PermissionError, match=r"HTTP 401.*hf auth login"):
        ood.push_to_hub("my-org/x")
