"""``timm_ood.fitting``: fits of several passes over the data, and the held-out steps.

On the hand-made feature model (``tests/detectors/_feature_model.py``) and on
the conformance kit's trained model.
"""

from __future__ import annotations

import pytest
import torch

import timm_ood
from timm_ood.fitting import fit_detectors

from ._models import batches, digits_split, noise_images
from .detectors._feature_model import FeatureModel, fit, hand_made_data
from .detectors._kit import kit_model_and_fit_data


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    from timm_ood.metrics import ood_metrics

    scores = torch.cat([in_scores.double().cpu(), out_scores.double().cpu()])
    return float(ood_metrics(scores, torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]))["auroc"])


def test_a_second_pass_serves_only_the_detectors_that_declare_it() -> None:
    maps, labels = hand_made_data()
    tap = timm_ood.wrap(FeatureModel(), "msp").tap
    together = [timm_ood.create_detector(name) for name in ("rmd", "vim", "openmax")]
    seen = {name: 0 for name in ("rmd", "vim", "openmax")}
    for detector in together:
        update = detector.update_fit

        def counting(outputs, labels, update=update, name=detector.name):
            seen[name] += len(outputs)
            update(outputs, labels)

        detector.update_fit = counting
    fit_detectors(tap, together, batches(maps, labels, 5), progress=False)
    assert seen == {"rmd": 36, "vim": 72, "openmax": 72}
    for detector in together:
        alone = fit(detector.name).detector.fitted_state()
        for key, value in detector.fitted_state().items():
            torch.testing.assert_close(value, alone[key], rtol=0, atol=0, msg=f"{detector.name}.{key}")


def test_two_pass_fits_refuse_a_one_shot_iterator() -> None:
    maps, labels = hand_made_data()
    with pytest.raises(ValueError, match=r"read the fit data 2 times.*one-shot iterator"):
        timm_ood.wrap(FeatureModel(), "vim").fit(iter(batches(maps, labels, 5)), progress=False)


def test_held_out_steps_separate_held_out_digits_from_noise() -> None:
    model, fit_data = kit_model_and_fit_data()
    digits = digits_split()["test"][0]
    held_out, evaluation = (digits[:100], noise_images(100, seed=1)), (digits[100:300], noise_images(200, seed=2))
    for name in ("multi-mahalanobis", "gram"):
        ood = timm_ood.wrap(model, name).fit(fit_data, progress=False)
        before = ood.detector.fitted_state()
        ood.fit_held_out([held_out[0]], [held_out[1]], progress=False)  # gram reads only the ID set
        changed = {key for key, value in ood.detector.fitted_state().items() if not torch.equal(value, before[key])}
        assert changed == ({"layer_weights", "weights_bias"} if name == "multi-mahalanobis" else {"layer_normalisers"})
        assert auroc(ood.ood_score(evaluation[0]), ood.ood_score(evaluation[1])) > 0.9, name
