"""evaluate / evaluate_loaders: one pass for all detectors gives the numbers each gives alone."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

import timm_ood
from timm_ood.evaluation import EvaluationResults, evaluate_loaders

from .._models import batches, digits_split, noise_images, trained

DETECTORS = ["msp", "energy", ("odin", {"temperature": 100.0, "epsilon": 0.002}), "mahalanobis"]


@pytest.fixture(scope="module")
def sets():
    test_images, test_labels = digits_split()["test"]
    flipped = test_images.flip(2, 3)[:200]
    return {
        "id": batches(test_images, test_labels, 64),
        "ood": {"flipped": batches(flipped, torch.full((200,), -1), 64),
                "noise": batches(noise_images(150), torch.full((150,), -1), 64)},
        "fit": batches(*digits_split()["train"], 128),
    }


@pytest.fixture(scope="module")
def results(sets) -> EvaluationResults:
    return evaluate_loaders(trained("test_resnet"), DETECTORS, id_data=sets["id"], ood_data=sets["ood"],
                            fit_data=sets["fit"], progress=False)


def alone(detector, sets) -> timm_ood.OODModel:
    name, kwargs = detector if isinstance(detector, tuple) else (detector, {})
    return timm_ood.wrap(trained("test_resnet"), name, **kwargs).fit(sets["fit"], progress=False)


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: d if isinstance(d, str) else d[0])
def test_one_pass_equals_each_detector_alone_and_metrics_by_hand(results, sets, detector) -> None:
    model = alone(detector, sets)
    name = detector if isinstance(detector, str) else detector[0]
    id_scores = torch.cat([model.ood_score(x) for x, _ in sets["id"]]).double()
    torch.testing.assert_close(results.scored.scores[name]["id"], id_scores, rtol=1e-5, atol=1e-6)
    for set_name, data in sets["ood"].items():
        ood_scores = torch.cat([model.ood_score(x) for x, _ in data]).double()
        scores = torch.cat([id_scores, ood_scores]).numpy()
        is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
        fpr, tpr, _ = roc_curve(1 - is_ood, -scores, drop_intermediate=False)  # ID positive
        expected_fpr95 = fpr[np.searchsorted(tpr, 0.95)]
        precision_in, recall_in, _ = precision_recall_curve(1 - is_ood, -scores)
        precision_out, recall_out, _ = precision_recall_curve(is_ood, scores)
        got = results.metrics[name][set_name]
        assert got["auroc"] == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-4)
        assert got["fpr_at_tpr"] == pytest.approx(expected_fpr95, abs=1e-4)
        assert got["detection_error"] == pytest.approx(0.5 * (1 - tpr[np.searchsorted(tpr, 0.95)]) + 0.5 * expected_fpr95, abs=1e-4)
        assert got["aupr_in"] == pytest.approx(auc(recall_in, precision_in), abs=1e-4)
        assert got["aupr_out"] == pytest.approx(auc(recall_out, precision_out), abs=1e-4)
    average = results.metrics[name]["average"]["auroc"]
    assert average == pytest.approx(np.mean([results.metrics[name][s]["auroc"] for s in sets["ood"]]))


def test_accuracy_and_timings(results, sets) -> None:
    model = trained("test_resnet")
    images, labels = digits_split()["test"]
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).double().mean().item()
    assert results.accuracy == pytest.approx(expected)
    assert set(results.seconds) == set(results.detectors)
    assert results.fit_seconds["mahalanobis"] > 0 and results.fit_seconds["msp"] == 0
    assert results.score_seconds["odin"] > results.score_seconds["msp"]  # ODIN runs its own passes
    assert results.settings["sizes"] == {"id": 397, "flipped": 200, "noise": 150}


def test_table_and_reports(results, tmp_path) -> None:
    table = results.table()
    assert "FPR@95TPR ↓" in table and "AUPR-Out ↑" in table and "**average**" in table
    assert table.count("\n| msp |") == 3
    paths = results.save(tmp_path, command="pytest")
    saved = json.loads(paths["json"].read_text())
    assert saved["metrics"]["energy"]["noise"]["auroc"] == pytest.approx(results.metrics["energy"]["noise"]["auroc"])
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 * 3 and {"detector", "ood_set", "auroc", "fpr_at_tpr"} <= set(rows[0])
    for detector in results.detectors:
        for kind in ("roc", "histogram"):
            png = paths[f"{kind}:{detector}"]
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "```\npytest\n```" in paths["markdown"].read_text()
    reloaded = EvaluationResults.load(paths["json"])
    assert reloaded.table() == results.table()


def test_repeated_detector_names_get_distinct_labels(sets) -> None:
    results = evaluate_loaders(
        trained("test_resnet"), [("temperature", {"temperature": 1.0}), ("temperature", {"temperature": 1000.0})],
        id_data=sets["id"], ood_data={"noise": sets["ood"]["noise"]}, progress=False,
    )
    assert results.detectors == ["temperature(temperature=1.0)", "temperature(temperature=1000.0)"]


def test_fitted_detectors_need_fit_data(sets) -> None:
    with pytest.raises(ValueError, match="fit_data"):
        evaluate_loaders(trained("test_resnet"), ["mahalanobis"], id_data=sets["id"], ood_data=sets["ood"])


def test_an_empty_set_is_an_error_not_a_metric(sets) -> None:
    with pytest.raises(ValueError, match="'empty' yielded no images"):
        evaluate_loaders(trained("test_resnet"), ["msp"], id_data=sets["id"], ood_data={"empty": []})


def test_full_spectrum_counts_covariate_shifted_sets_as_in_distribution(sets, tmp_path) -> None:
    """OpenOOD v1.5's full-spectrum setting: shifted ID images are positives too, and their accuracy is reported."""
    images, labels = digits_split()["test"]
    shifted_images = (images[:150] + 0.3 * torch.randn(150, *images.shape[1:], generator=torch.Generator()
                                                       .manual_seed(0)))
    shifted = {"noisy": batches(shifted_images, labels[:150], 64)}
    model = trained("test_resnet")
    results = evaluate_loaders(model, ["msp", "energy"], id_data=sets["id"], ood_data=sets["ood"],
                               covariate_shifted_data=shifted, ood_groups={"near": ["flipped"], "far": ["noise"]},
                               progress=False)
    plain = evaluate_loaders(model, ["msp"], id_data=sets["id"], ood_data=sets["ood"], progress=False)
    ood_model = timm_ood.wrap(model, "energy")
    id_scores = torch.cat([ood_model.score_data(data, progress=False)[0] for data in (sets["id"], shifted["noisy"])])
    noise_scores = ood_model.score_data(sets["ood"]["noise"], progress=False)[0]
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(noise_scores))]
    expected = roc_auc_score(1 - is_ood, -torch.cat([id_scores, noise_scores]).numpy())  # ID positive
    assert results.metrics["energy"]["noise"]["auroc"] == pytest.approx(expected, abs=1e-12)
    assert results.metrics["msp"]["noise"]["auroc"] != plain.metrics["msp"]["noise"]["auroc"]
    accuracy = results.settings["full_spectrum_accuracy"]["noisy"]
    with torch.inference_mode():
        predictions = model(shifted_images).argmax(1)
    assert accuracy == pytest.approx(float((predictions == labels[:150]).double().mean()))
    assert results.accuracy == pytest.approx(plain.accuracy)  # the ID test set's own accuracy is unchanged
    # the other metric reading is computed over the same in-distribution images
    ood_reading = results.group_summary("ood")["energy"]["far"]["auroc"]
    assert ood_reading == pytest.approx(expected, abs=1e-12)
    assert results.group_summary()["energy"]["near"] == results.metrics["energy"]["flipped"]
    results.save(tmp_path / "report")
    assert (tmp_path / "report" / "plots" / "energy_roc.png").is_file()


def test_a_group_of_sets_that_are_not_evaluated_is_refused(sets) -> None:
    with pytest.raises(ValueError, match=r"OOD group 'near' names sets that are not evaluated: \['svhn'\]"):
        evaluate_loaders(trained("test_resnet"), ["msp"], id_data=sets["id"], ood_data=sets["ood"],
                         ood_groups={"near": ["svhn"]}, progress=False)


def test_unlabelled_in_distribution_images_give_no_accuracy(sets) -> None:
    images, _ = digits_split()["test"]
    unlabelled = batches(images, torch.full((len(images),), -1), 64)
    results = evaluate_loaders(trained("test_resnet"), ["msp"], id_data=unlabelled, ood_data=sets["ood"],
                               progress=False)
    assert results.accuracy is None


def test_expected_calibration_error_of_the_id_predictions_by_hand(results, sets) -> None:
    """ECE (Guo et al. Eq. 3, 15 equal-width bins) of the ID test set's top-1 predictions, via torchmetrics."""
    model = trained("test_resnet")
    with torch.inference_mode():
        logits = torch.cat([model(images) for images, _ in sets["id"]]).double()
    labels = torch.cat([labels for _, labels in sets["id"]])
    confidences, predictions = torch.softmax(logits, dim=1).max(dim=1)
    correct = (predictions == labels).double().numpy()
    bins = np.minimum((confidences.numpy() * 15).astype(int), 14)
    expected = sum(abs(correct[bins == b].mean() - confidences.numpy()[bins == b].mean()) * (bins == b).sum()
                   for b in range(15) if (bins == b).any()) / len(bins)
    assert results.calibration_error == pytest.approx(expected, abs=1e-9)
    assert "ECE" in results.table()
    assert results.to_dict()["calibration_error"] == results.calibration_error
