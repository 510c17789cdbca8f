"""The timm-ood command line end to end on tiny data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from timm_ood.cli import main


def test_help_and_list(capsys) -> None:
    completed = subprocess.run([sys.executable, "-m", "timm_ood.cli", "--help"], capture_output=True, text=True,
                               check=True)
    assert "demo" in completed.stdout and "tune" in completed.stdout
    assert main(["list", "detectors"]) == 0
    out = capsys.readouterr().out
    assert "| odin | timm-ood" in out and "mahalanobis" in out


def test_errors_are_one_line_and_exit_2(capsys, tmp_path) -> None:
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("timm-ood: error: checkpoint") and "Traceback" not in err
    assert main(["train", "--model", "test_resnet", "--data", "no-such-source", "--out", str(tmp_path / "x")]) == 2
    assert "unknown source 'no-such-source'" in capsys.readouterr().err
    assert main(["eval"]) == 2  # --checkpoint is optional: the model is named by --model
    assert "name the model: --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--ood"])  # argparse: --ood without its NAME=DATA
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_train_eval_tune_end_to_end(tmp_path, capsys, data_fashion_mnist) -> None:
    checkpoint = tmp_path / "ckpt.safetensors"
    assert main(["train", "--model", "test_resnet", "--data", "fashion-mnist", "--epochs", "1", "--max-images",
                 "512", "--batch-size", "64", "--out", str(checkpoint), "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    report = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(checkpoint), "--detectors", "msp,energy,mahalanobis",
                 "--max-images", "120", "--max-fit-images", "256", "--out", str(report), "--quiet"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["detectors"] == ["msp", "energy", "mahalanobis"]
    assert set(results["ood_sets"]) >= {"digits", "gaussian", "natural-crop"}
    assert 0 <= results["metrics"]["mahalanobis"]["average"]["auroc"] <= 1
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert len(rows) == 3 * (len(results["ood_sets"]) + 1)
    assert (report / "plots" / "energy_roc.png").stat().st_size > 1000
    assert "timm-ood eval --checkpoint" in (report / "results.md").read_text()
    out = tmp_path / "tuned.json"
    assert main(["tune", "--checkpoint", str(checkpoint), "--detector", "temperature", "--max-images", "100",
                 "--out", str(out), "--quiet"]) == 0
    tuned = json.loads(out.read_text())
    assert set(tuned["best"]) == set(results["ood_sets"])


@pytest.mark.slow
def test_demo_fast(tmp_path, capsys, data_fashion_mnist) -> None:
    assert main(["demo", "--fast", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| mahalanobis | **average** |" in out and "ID accuracy" in out
    assert (tmp_path / "demo" / "plots" / "odin_histogram.png").exists()
