"""The command line on a timm user's own job: pretrained weights from a local file, their own data, offline.

Local mirrors stand in for the hub: an ImageNet-like image folder at 224 px
(train/ and val/ of class folders), CIFAR-schema parquet files at 32 px, and a
flat folder of grey images; the weights are a timm state dict saved to a file
and loaded through ``--weights`` (timm's ``pretrained_cfg_overlay=dict(file=...)``).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_ood
from timm_ood.cli import main
from timm_ood.data import load_data, make_loader

from .data.test_arguments import cifar_like_parquet, write_folder

pytestmark = pytest.mark.usefixtures("data_cache_dir", "data_hub_offline")


def weights_file(tmp_path_factory, name: str) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / f"{name}.safetensors"
    save_file(timm.create_model(name).state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirrors")
    return {
        "imagenet": write_folder(root / "imagenet", ("train", "val"), ("n01440764", "n01443537"), 6, 224),
        "dtd": write_folder(root / "dtd", (), ("banded", "woven"), 3, 224),
        "grey": write_folder(root / "grey", (), (), 6, 96, mode="L"),
        "cifar": cifar_like_parquet(root / "cifar10-test.parquet", 24),
    }


def test_eval_a_pretrained_resnet_at_224px_on_own_folders(tmp_path, tmp_path_factory, mirrors, capsys):
    weights = weights_file(tmp_path_factory, "resnet18")
    report = tmp_path / "report"
    code = main(["eval", "--model", "resnet18.a1_in1k", "--weights", weights,
                 "--id-train", str(mirrors["imagenet"]), "--id-test", str(mirrors["imagenet"]),
                 "--ood", f"textures={mirrors['dtd']}", "--ood", f"grey={mirrors['grey']}",
                 "--detectors", "msp,energy,mahalanobis", "--batch-size", "8", "--out", str(report), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| mahalanobis | textures |" in captured.out and "| energy | grey |" in captured.out
    assert "timm-ood: warning: dataset 'custom/grey' holds 'L' (grey) images" in captured.err
    assert "converted to RGB" in captured.err and "Generating" not in captured.err  # --quiet: no bars
    saved = json.loads((report / "results.json").read_text())
    assert saved["settings"]["sizes"] == {"id": 12, "textures": 6, "grey": 6}
    assert saved["accuracy"] is None  # two folder classes are not resnet18's 1,000
    assert "No ID accuracy" in (report / "results.md").read_text()


def test_eval_matches_the_python_api_on_the_same_datasets(tmp_path_factory, mirrors, capsys, tmp_path):
    weights = weights_file(tmp_path_factory, "test_vit")
    code = main(["eval", "--model", "test_vit.r160_in1k", "--weights", weights, "--id-test", str(mirrors["cifar"]),
                 "--ood", f"textures={mirrors['dtd']}", "--detectors", "msp,maxlogit", "--quiet",
                 "--out", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    from_cli = json.loads((tmp_path / "cli" / "results.json").read_text())["metrics"]
    model = timm_ood.timm_models.create_timm_model("test_vit.r160_in1k", weights=weights)
    results = timm_ood.evaluate(model, ["msp", "maxlogit"], id_data=load_data(str(mirrors["cifar"]), "test"),
                                ood_data={"textures": load_data(str(mirrors["dtd"]), "ood")}, progress=False)
    assert results.metrics["msp"]["textures"] == pytest.approx(from_cli["msp"]["textures"], abs=1e-12)
    assert results.metrics["maxlogit"]["textures"] == pytest.approx(from_cli["maxlogit"]["textures"], abs=1e-12)


def test_evaluate_takes_hugging_face_datasets_loaders_and_batches_alike(tmp_path_factory, mirrors):
    weights = weights_file(tmp_path_factory, "test_convnext")
    model = timm_ood.timm_models.create_timm_model("test_convnext.r160_in1k", weights=weights)
    id_data, ood_data = load_data(str(mirrors["cifar"]), "test"), load_data(str(mirrors["dtd"]), "ood")
    from_datasets = timm_ood.evaluate(model, ["energy"], id_data=id_data, ood_data={"dtd": ood_data},
                                      batch_size=5, progress=False)
    loaders = {"id": make_loader(id_data, model, batch_size=7), "dtd": make_loader(ood_data, model, batch_size=4)}
    from_loaders = timm_ood.evaluate(model, ["energy"], id_data=loaders["id"], ood_data={"dtd": loaders["dtd"]},
                                     progress=False)
    from_batches = timm_ood.evaluate(model, ["energy"], id_data=list(loaders["id"]),
                                     ood_data={"dtd": list(loaders["dtd"])}, progress=False)
    for other in (from_loaders, from_batches):
        assert other.metrics["energy"]["dtd"] == pytest.approx(from_datasets.metrics["energy"]["dtd"], abs=1e-9)
    assert from_datasets.settings["sizes"] == {"id": 24, "dtd": 6}
    with pytest.raises(ValueError, match="not both"):
        timm_ood.evaluate(model, ["energy"], "fashion-mnist", id_data=id_data, ood_data={"dtd": ood_data})
    with pytest.raises(ValueError, match="needs both id_data"):
        timm_ood.evaluate(model, ["energy"], id_data=id_data)


def test_a_benchmark_source_reads_its_local_copy(tmp_path_factory, mirrors, capsys):
    """``--source-path SOURCE=PATH``: a registered hub source named as data reads the local mirror instead."""
    weights = weights_file(tmp_path_factory, "test_resnet")
    code = main(["eval", "--model", "test_resnet.r160_in1k", "--weights", weights,
                 "--source-path", f"cifar10={mirrors['cifar']}", "--id-test", "cifar10:test",
                 "--ood", f"dtd={mirrors['dtd']}", "--detectors", "msp", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "| msp | dtd |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "resnet81"], "did you mean resnet18"),
        (["--model", "resnet18.a1_in1k"], "--weights FILE"),
        (["--model", "test_resnet.r160_in1k", "--weights", "/no/such/file.safetensors"], "not found"),
        (["--model", "test_resnet.r160_in1k", "--ood", "dtd"], "expected NAME=DATA"),
        (["--model", "test_resnet.r160_in1k", "--id-test", "./no/such/folder", "--ood", "x=gaussian"],
         "not an existing path"),
        (["--model", "test_resnet.r160_in1k", "--id-test", "gaussian", "--ood", "x=my-org/outliers:test"],
         "cannot be reached"),
        (["--benchmark", "fashion-mnist", "--id-test", "gaussian", "--ood", "x=gaussian"], "not both"),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(arguments, message, capsys, mirrors):
    assert main(["eval", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert main(["eval", "--model", "test_resnet.r160_in1k", "--weights", str(junk)]) == 2
    assert "is not a weights file timm can read" in capsys.readouterr().err


def test_an_empty_image_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    assert main(["eval", "--model", "test_resnet", "--id-test", str(tmp_path / "empty"), "--ood", "x=gaussian"]) == 2
    assert "has no images" in capsys.readouterr().err


def test_fit_writes_a_folder_that_from_pretrained_rebuilds_with_the_same_scores(tmp_path, tmp_path_factory, mirrors,
                                                                                 capsys):
    """``timm-ood fit`` on a registered source read from its local mirror, then ``from_pretrained``."""
    weights = weights_file(tmp_path_factory, "test_convnext")
    out = tmp_path / "convnext-knn"
    code = main(["fit", "--model", "test_convnext.r160_in1k", "--weights", weights, "--detector", "knn",
                 "--detector-args", '{"k": 2}', "--source-path", f"imagenet-1k={mirrors['imagenet']}",
                 "--id-train", "imagenet-1k:train", "--id-val", f"{mirrors['imagenet']}:val", "--calibrate-tpr", "0.9",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "detector.safetensors"]
    assert "threshold" in capsys.readouterr().out

    loaded = timm_ood.from_pretrained(out, weights=weights)
    assert loaded.detector.name == "knn" and loaded.detector.k == 2 and loaded.threshold_tpr == 0.9
    expected = timm_ood.create_model("test_convnext.r160_in1k", "knn", {"k": 2}, weights=weights)
    # fit and calibrate take the Hugging Face datasets themselves, prepared with the model's data config
    expected.fit(load_data(str(mirrors["imagenet"]), "train"), progress=False)
    val = load_data(f"{mirrors['imagenet']}:val", "test")
    assert float(loaded.threshold) == expected.calibrate(val, tpr=0.9, progress=False)
    images = next(iter(make_loader(val, expected.model)))[0]
    assert torch.equal(loaded.ood_score(images), expected.ood_score(images))


def test_fit_holds_out_calibration_images_it_does_not_fit_on(tmp_path, tmp_path_factory, mirrors, capsys):
    weights = weights_file(tmp_path_factory, "test_resnet")
    code = main(["fit", "--model", "test_resnet.r160_in1k", "--weights", weights, "--detector", "mahalanobis",
                 "--id-train", f"{mirrors['imagenet']}:train", "--calibrate-tpr", "0.95", "--calibration-images", "4",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "accepts 95% of 4 held-out in-distribution images" in out and "fitted on 8 images" in out
