"""ODIN's tuning protocol and the generic grid search: tuning never sees evaluation images.

The clever ODIN grid itself is checked against the naive loop in tests/detectors/test_odin.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import timm_ood
from timm_ood.evaluation import grid_search
from timm_ood.evaluation.tuning import TuningResult

from .._models import batches, digits_split, noise_images, trained


def test_grid_search_picks_the_lowest_holdout_fpr() -> None:
    images, labels = digits_split()["test"]
    id_data = batches(images[:200], labels[:200])
    ood_data = {"flipped": batches(images[:200].flip(2, 3), torch.full((200,), -1))}
    space = {"temperature": [1, 100], "epsilon": [0.0, 0.002]}
    result = grid_search(trained("test_resnet"), "odin", id_data=id_data, ood_data=ood_data, space=space)
    assert len(result.grid) == 4
    best = result.best["flipped"]
    assert result.values["flipped"][result.grid.index(best)] == min(result.values["flipped"])
    detector = result.make_detector("flipped")
    model = timm_ood.wrap(trained("test_resnet"), detector)
    scores = torch.cat([model.ood_score(images[:200]), model.ood_score(images[:200].flip(2, 3))])
    is_ood = torch.cat([torch.zeros(200), torch.ones(200)])
    assert float(timm_ood.metrics.fpr_at_tpr(scores, is_ood)) == pytest.approx(result.best_value("flipped"), abs=1e-9)


def test_generic_grid_refits_only_when_a_fit_hyperparameter_changes(monkeypatch) -> None:
    from timm_ood.evaluation import tuning

    calls = []
    original = tuning.fit_detectors
    monkeypatch.setattr(tuning, "fit_detectors", lambda *a, **k: calls.append(1) or original(*a, **k))
    images, labels = digits_split()["test"]
    result = grid_search(
        trained("test_resnet"), "mahalanobis", id_data=batches(images[:150], labels[:150]),
        ood_data={"noise": batches(noise_images(100), torch.full((100,), -1))},
        fit_data=batches(*digits_split()["train"]), space={"epsilon": [0.0, 0.001]},
    )
    assert len(calls) == 1  # epsilon does not change what Mahalanobis fits
    assert len(result.values["noise"]) == 2


def test_tuning_result_table_and_average() -> None:
    result = TuningResult("odin", [{"temperature": 1, "epsilon": 0}, {"temperature": 1000, "epsilon": 0.001}],
                          "fpr_at_tpr", {"a": [0.5, 0.2], "b": [0.1, 0.3]})
    assert result.best == {"a": {"temperature": 1000, "epsilon": 0.001}, "b": {"temperature": 1, "epsilon": 0}}
    assert result.best_average == {"temperature": 1000, "epsilon": 0.001}  # mean 0.25 < 0.3
    assert "| a | 1000 | 0.001 | 20.00 |" in result.table()


def test_unknown_protocol_and_criterion() -> None:
    with pytest.raises(ValueError, match="criterion"):
        grid_search(trained("test_resnet"), "odin", id_data=[], ood_data={}, criterion="accuracy")
    with pytest.raises(ValueError, match="protocol"):
        timm_ood.tune(trained("test_resnet"), "odin", protocol="random")


def test_lees_detection_error_is_the_minimum_over_thresholds_and_the_tpr_variant_has_its_own_name():
    """Lee et al. tune on min_t 0.5 (1 - TPR(t)) + 0.5 FPR(t); read at TPR 95% it would rank as FPR@95TPR."""
    from sklearn.metrics import roc_curve

    from timm_ood.evaluation.tuning import CRITERIA, _criterion

    generator = torch.Generator().manual_seed(0)
    id_scores, ood_scores = torch.randn(400, generator=generator), torch.randn(300, generator=generator) + 1.0
    fpr_ood, tpr_ood, _ = roc_curve(np.r_[np.zeros(400), np.ones(300)], torch.cat([id_scores, ood_scores]).numpy())
    # OOD positive: 1 - TPR_ood is the OOD accepted, FPR_ood the ID rejected; the error is symmetric in the reading
    expected = float(np.min(0.5 * (1 - tpr_ood) + 0.5 * fpr_ood))
    assert _criterion(id_scores, ood_scores, "detection_error", 0.95) == pytest.approx(expected, abs=1e-12)
    at_tpr = _criterion(id_scores, ood_scores, "detection_error_at_tpr", 0.95)
    fpr = _criterion(id_scores, ood_scores, "fpr_at_tpr", 0.95)
    assert at_tpr >= _criterion(id_scores, ood_scores, "detection_error", 0.95)
    assert at_tpr == pytest.approx(0.5 * (1 - 0.95) + 0.5 * fpr, abs=0.5 / 400 + 1e-12)
    assert {"detection_error", "detection_error_at_tpr"} <= set(CRITERIA)
