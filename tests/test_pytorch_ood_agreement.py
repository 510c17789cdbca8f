"""Where pytorch-ood implements a detector with the same definition, both libraries rank inputs alike.

Runs only where pytorch-ood is installed (the benchmark environment; it is not
a dependency of timm-ood). The detectors and how pytorch-ood's are built from a
timm model come from one table, ``COUNTERPARTS`` in
``benchmarks/bench_detectors.py``; entries whose definitions differ say how
there and are left out here (listed by :func:`test_every_exclusion_says_why`).

On the kit's small ResNet trained on digits, with held-out digits as
in-distribution and inverted digits plus uniform noise as OOD, the AUROC of
timm-ood's scores equals pytorch-ood's to 1e-6 and the scores' Spearman
correlation is 1 up to float ties (> 0.999).
"""

from __future__ import annotations

import functools
from types import ModuleType

import pytest
import torch

import timm_ood
from timm_ood.metrics import ood_metrics
from timm_ood.testing import conformance_data, conformance_model

from ._benchmarks import benchmark_module

pytest.importorskip("pytorch_ood")



def harness() -> ModuleType:
    return benchmark_module("bench_detectors")


SAME_DEFINITION = [name for name, counterpart in harness().COUNTERPARTS.items() if counterpart.differs is None]


@functools.cache
def task() -> tuple[torch.nn.Module, tuple, torch.Tensor, torch.Tensor]:
    """The kit's ResNet, its fit batches, and 64 ID + 64 OOD images with their OOD labels."""
    model = conformance_model("test_resnet")
    data = conformance_data(model)
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    inverted = (1 - 2 * mean) / std - data.in_distribution[32:]  # pixels 1 - p, normalised
    images = torch.cat([data.in_distribution, inverted, data.out_of_distribution[:32]])
    is_ood = torch.cat([torch.zeros(len(data.in_distribution)), torch.ones(64)]).long()
    return model, data.fit_batches, images, is_ood


def test_every_exclusion_says_why() -> None:
    excluded = {name: c.differs for name, c in harness().COUNTERPARTS.items() if c.differs is not None}
    assert {"mc-dropout", "multi-mahalanobis", "mahalanobis", "mahalanobis-odin"} <= set(excluded)
    assert all(len(reason) > 40 for reason in excluded.values())


def assert_same_ranking(name: str, fit_batches: list, images: torch.Tensor, is_ood: torch.Tensor) -> None:
    counterpart = harness().COUNTERPARTS[name]
    fit_batches = [(counterpart.inputs(x), y) for x, y in fit_batches]  # resized where the table says so
    images = counterpart.inputs(images)
    model = conformance_model("test_resnet")
    ours = timm_ood.wrap(model, name)
    if ours.detector.requirements.fit:
        ours.fit(fit_batches, progress=False)
    torch.manual_seed(0)
    theirs = counterpart.build(harness().Parts.of(model), ours.detector)
    with torch.no_grad():
        if theirs.requires_fit:
            theirs.fit(fit_batches)
        their_scores = theirs.predict(images).detach().double()
    our_scores = ours.ood_score(images).double()
    our_auroc, their_auroc = (float(ood_metrics(s, is_ood)["auroc"]) for s in (our_scores, their_scores))
    assert abs(our_auroc - their_auroc) <= 1e-6, f"AUROC {our_auroc:.6f} (timm-ood) vs {their_auroc:.6f} (pytorch-ood)"
    assert harness().spearman(our_scores, their_scores) > 0.999


@pytest.mark.parametrize("name", SAME_DEFINITION)
def test_ranking_equals_pytorch_oods(name: str) -> None:
    if name not in timm_ood.list_detectors():
        pytest.skip(f"{name} is not registered in this timm-ood")
    _, fit_batches, images, is_ood = task()
    assert_same_ranking(name, list(fit_batches), images, is_ood)


@pytest.mark.parametrize("name", ["mahalanobis", "mahalanobis-odin"])
def test_mahalanobis_ranking_equals_pytorch_oods_on_a_full_rank_covariance(name: str) -> None:
    """Excluded above for singular covariances only: with noise images in the fit data no unit is dead."""
    model, fit_batches, images, is_ood = task()
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    noise = (torch.rand(256, 1, 32, 32, generator=torch.Generator().manual_seed(5)) - mean) / std
    labels = torch.arange(128) % 10  # any labels: the point is that every unit varies
    with torch.no_grad():
        fit_features = torch.cat([harness().Parts.of(model).encoder(x) for x, _ in fit_batches] +
                                 [harness().Parts.of(model).encoder(noise)])
    assert bool((fit_features.var(dim=0) > 0).all())
    assert_same_ranking(name, [*fit_batches, (noise[:128], labels), (noise[128:], labels)], images, is_ood)
