"""Energy loss, GReg's gradient regulariser and GReg+ sampling: hand computations, finite differences, picks."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from timm_ood import training
from timm_ood.data import photos
from timm_ood.errors import IncompatibleModelError

from .._models import (
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGE_SIZE,
    batches,
    create,
    digits_split,
    noise_images,
    trained,
)


def _energy(row: list[float]) -> float:
    return -math.log(sum(math.exp(z) for z in row))


# -- the energy loss (Liu et al. 2020; GReg Eq. 1) ------------------------------------------------------------
def test_energy_margin_loss_by_hand() -> None:
    logits_in = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # energies -2.127 (below m_in: masked), -0.693 (active)
    logits_out = torch.tensor([[0.0, 0.0], [3.0, 1.0]])  # energies -0.693 (above m_out: masked), -3.127 (active)
    m_in, m_out = -2.0, -1.0
    hinge_in = [max(0.0, _energy(r) - m_in) ** 2 for r in logits_in.tolist()]
    hinge_out = [max(0.0, m_out - _energy(r)) ** 2 for r in logits_out.tolist()]
    assert hinge_in[0] == 0 and hinge_out[0] == 0 and hinge_in[1] > 0 and hinge_out[1] > 0  # both sides exercised
    expected = sum(hinge_in) / 2 + sum(hinge_out) / 2  # each group's mean
    assert float(training.energy_margin_loss(logits_in, logits_out, m_in, m_out)) == pytest.approx(expected, rel=1e-6)
    targets = torch.tensor([0, 1])
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    loss = training.EnergyLoss(m_in=m_in, m_out=m_out, energy_weight=0.1)(logits_in, targets, logits_out)
    assert float(loss) == pytest.approx(ce + 0.1 * expected, rel=1e-6)
    torch.testing.assert_close(training.energy_score(logits_in), torch.tensor([_energy(r) for r in logits_in.tolist()]))


def test_energy_loss_defaults_and_bad_input() -> None:
    loss = training.EnergyLoss()
    assert (loss.m_in, loss.m_out, loss.energy_weight) == (-25.0, -7.0, 0.1)  # the GReg authors' code
    with pytest.raises(ValueError, match="m_in < m_out"):
        training.EnergyLoss(m_in=-5, m_out=-7)
    with pytest.raises(ValueError, match="non-empty"):
        loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="classes"):
        loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="gradient_scaling"):
        training.GRegObjective(gradient_scaling="sum")
    with pytest.raises(ValueError, match="outlier"):
        training.GRegObjective()(nn.Linear(3, 2), torch.zeros(2, 3), torch.tensor([0, 1]))


# -- GReg's gradient regulariser (Eq. 3) against finite differences ---------------------------------------------
def _smooth_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = 3 * torch.randn(6, 1, 3, 4, generator=generator, dtype=torch.float64)  # larger logits: lower energies
    outliers = 0.3 * torch.randn(4, 1, 3, 4, generator=generator, dtype=torch.float64)
    return images, torch.tensor([0, 1, 2, 0, 1, 2]), outliers


def _hinges(model: nn.Module, images: torch.Tensor, outliers: torch.Tensor, m_in: float, m_out: float) -> torch.Tensor:
    energy = training.energy_score(model(torch.cat([images, outliers])))
    return torch.cat([torch.relu(m_in - energy[:len(images)]), torch.relu(energy[len(images):] - m_out)])


def _margins(model: nn.Module, images: torch.Tensor, outliers: torch.Tensor) -> tuple[float, float]:
    """Margins at each group's median energy: about half of each group is beyond its margin."""
    with torch.no_grad():
        energy = training.energy_score(model(torch.cat([images, outliers])))
    m_in, m_out = float(energy[:6].quantile(0.5)), float(energy[6:].quantile(0.5))  # between samples: no kink
    assert m_in < m_out
    return m_in, m_out


@pytest.mark.parametrize("scaling", ["per-sample", "batch-mean"])
def test_gradient_regulariser_matches_finite_differences(scaling: str) -> None:
    model, (images, targets, outliers) = _smooth_model(), _batch()
    m_in, m_out = _margins(model, images, outliers)
    objective = training.GRegObjective(m_in, m_out, gradient_scaling=scaling)
    penalty = objective.terms(model, images, targets, outliers).gradient

    inputs, step = torch.cat([images, outliers]), 1e-6
    flat = inputs.flatten(1)
    gradients = torch.zeros_like(flat)
    with torch.no_grad():
        for j in range(flat.shape[1]):  # perturbing input element j of every sample at once: samples are independent
            shift = torch.zeros_like(flat)
            shift[:, j] = step
            up = _hinges(model, *(flat + shift).view_as(inputs).split([6, 4]), m_in, m_out)
            down = _hinges(model, *(flat - shift).view_as(inputs).split([6, 4]), m_in, m_out)
            gradients[:, j] = (up - down) / (2 * step)
    norms = gradients.norm(dim=1)
    active = _hinges(model, images, outliers, m_in, m_out) > 0
    assert 0 < int(active.sum()) < len(active) and bool((norms[~active] == 0).all())  # the mask is exercised
    if scaling == "batch-mean":  # the authors' code: each norm carries 1 / (its group's batch size)
        norms = norms / torch.tensor([6.0] * 6 + [4.0] * 4, dtype=torch.float64)
    assert float(penalty.detach()) == pytest.approx(float(norms.mean()), rel=1e-6)


def test_gradient_regulariser_is_differentiable_in_the_parameters() -> None:
    """Double backprop: d L_∇S / dθ along a random direction against a central difference."""
    model, (images, targets, outliers) = _smooth_model(), _batch()
    objective = training.GRegObjective(*_margins(model, images, outliers), gradient_scaling="per-sample")
    parameters = list(model.parameters())
    penalty = objective.terms(model, images, targets, outliers).gradient
    analytic = torch.autograd.grad(penalty, parameters)
    generator = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in parameters]
    step, values = 1e-6, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(parameters, direction, strict=True):
                p.add_(sign * step * d)
        values.append(float(objective.terms(model, images, targets, outliers).gradient.detach()))
        with torch.no_grad():
            for p, d in zip(parameters, direction, strict=True):
                p.sub_(sign * step * d)
    along = sum(float((g * d).sum()) for g, d in zip(analytic, direction, strict=True))
    assert abs(along) > 1e-3
    assert along == pytest.approx((values[0] - values[1]) / (2 * step), rel=1e-5)


def test_greg_loss_is_the_weighted_sum_of_its_terms() -> None:
    model, (images, targets, outliers) = _smooth_model(), _batch()
    objective = training.GRegObjective(m_in=-3.0, m_out=-0.5, energy_weight=0.1, gradient_weight=1.0)
    terms = objective.terms(model, images, targets, outliers)
    logits = model(torch.cat([images, outliers]))
    torch.testing.assert_close(terms.cross_entropy, nn.functional.cross_entropy(logits[:6], targets))
    torch.testing.assert_close(terms.energy, training.energy_margin_loss(logits[:6], logits[6:], -3.0, -0.5))
    total = objective(model, images, targets, outliers)
    torch.testing.assert_close(total, terms.cross_entropy + 0.1 * terms.energy + terms.gradient)


def test_greg_names_the_architecture_without_double_backward() -> None:
    model = create("test_vit").train()  # fused attention on CPU has no double backward
    images, outliers = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    objective = training.GRegObjective(m_in=-30.0, m_out=30.0)  # every sample active, so the penalty has a graph
    with pytest.raises(IncompatibleModelError, match=r"test_vit.*fused_attn"):
        objective(model, images, torch.tensor([0, 1]), outliers)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    objective(model, images, torch.tensor([0, 1]), outliers).backward()  # the suggested fix works


# -- GReg+ sampling (Algorithm 1) ----------------------------------------------------------------------------
def test_cluster_energy_extremes_by_hand() -> None:
    assignments = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    energies = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 7.0, 2.5])
    # cluster 0: lowest index 1, highest index 0; cluster 1: 4 and 3; cluster 2 is a singleton: 5 once
    assert training.cluster_energy_extremes(assignments, energies).tolist() == [0, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="equally long"):
        training.cluster_energy_extremes(assignments, energies[:3])


def test_kmeans_recovers_separated_clusters_and_is_seeded() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    points = (centres[:, None] + 0.01 * torch.randn(8, 12, 16, generator=generator)).reshape(-1, 16)
    truth = torch.arange(8).repeat_interleave(12)
    found = training.kmeans(points, 8, generator=torch.Generator().manual_seed(3))
    assert len(set(zip(truth.tolist(), found.tolist(), strict=True))) == 8  # the same partition, relabelled
    again = training.kmeans(points, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(found, again)
    with pytest.raises(ValueError, match="k <="):
        training.kmeans(points, 97)


class _Encoded(nn.Module):
    """A stand-in timm model whose input row is (embedding x, embedding y, -energy)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features[:, :2] if pre_logits else features[:, 2:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _candidates(sizes: list[int]) -> tuple[torch.Tensor, list[set[int]]]:
    """Clusters around 3 directions (different norms: the normalisation must merge them), distinct energies."""
    generator = torch.Generator().manual_seed(0)
    rows, expected, start = [], [], 0
    for cluster, size in enumerate(sizes):
        angle = torch.full((size,), 2 * math.pi * cluster / 3) + 0.05 * torch.randn(size, generator=generator)
        radius = 1 + 4 * torch.rand(size, generator=generator)
        energy = torch.randperm(100, generator=generator)[:size].float()
        rows.append(torch.stack([radius * angle.cos(), radius * angle.sin(), -energy], dim=1))
        expected.append({start + int(energy.argmin()), start + int(energy.argmax())})
        start += size
    return torch.cat(rows)[:, None, None, :], expected


def test_sampler_picks_the_lowest_and_highest_energy_of_each_cluster() -> None:
    pool, expected = _candidates([4, 4, 4])
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))  # clusters interleaved
    sampler = training.EnergyClusterSampler([pool[order[:5]], pool[order[5:]]], pool_ratio=4.0, seed=0)
    picked = sampler.next_batch(_Encoded(), id_batch_size=3)  # k = 3 clusters, 2k = 6 outliers
    wanted = pool[sorted(set().union(*expected))]
    assert picked.shape == (6, 1, 1, 3)
    assert sorted(map(tuple, picked.flatten(1).tolist())) == sorted(map(tuple, wanted.flatten(1).tolist()))
    assert sampler.timings.steps == 1 and sampler.timings.kmeans_seconds > 0


def test_sampler_fills_the_singleton_shortfall_at_random() -> None:
    pool, expected = _candidates([6, 5, 1])  # the singleton gives 1 pick: 5 extremes, 1 random fill
    sampler = training.EnergyClusterSampler([pool], pool_ratio=4.0, seed=0)
    picked = [tuple(row) for row in sampler.next_batch(_Encoded(), id_batch_size=3).flatten(1).tolist()]
    extremes = {tuple(pool[i].flatten().tolist()) for i in set().union(*expected)}
    assert len(picked) == 6 and len(set(picked)) == 6 and extremes <= set(picked)
    with pytest.raises(ValueError, match="pool_ratio"):
        training.EnergyClusterSampler([pool], pool_ratio=1.5)
    with pytest.raises(IncompatibleModelError, match="forward_features"):
        sampler.next_batch(nn.Linear(3, 1), id_batch_size=3)


def test_greg_plus_trains_a_timm_model_through_fit() -> None:
    model = create("test_resnet")
    images, labels = digits_split()["train"]
    sampler = training.EnergyClusterSampler([torch.randn(40, 1, 32, 32)], pool_ratio=3.0, seed=0)
    history = training.fit(model, batches(images[:32], labels[:32], 16), loss=training.GRegObjective(),
                           outliers=sampler, epochs=1, optimizer="adam", lr=1e-3, progress=False)
    assert math.isfinite(history.epochs[0].loss) and sampler.timings.steps == 2


# -- a seeded short run: GReg against the plain energy loss ---------------------------------------------------
#: Margins for the tiny digits model: its cross-entropy energies are about -5.4 on digits and on the auxiliary
#: photos, so m_in / m_out sit below / above them, as Liu et al. set theirs from their pre-trained models'.
TINY_MARGINS = {"m_in": -12.0, "m_out": -4.0}


@functools.cache
def _fine_tuned(method: str) -> nn.Module:
    """The cross-entropy digits model fine-tuned 2 epochs (as GReg fine-tunes) with auxiliary photo crops."""
    model = trained("test_resnet", epochs=4)
    images, labels = digits_split()["train"]
    aux = _photo_crops(photos.AUXILIARY_PHOTOS, len(images), seed=0)
    loss = (training.EnergyLoss(**TINY_MARGINS) if method == "energy"
            else training.GRegObjective(**TINY_MARGINS, gradient_scaling="per-sample"))
    training.fit(model, batches(images, labels, 64), loss=loss, outliers=batches(aux, torch.full((len(aux),), -1), 64),
                 epochs=2, optimizer="adam", lr=1e-3, weight_decay=0.0, seed=0, progress=False)
    return model


def _photo_crops(names: tuple[str, ...], count: int, seed: int) -> torch.Tensor:
    crops = photos.random_crops(names, count, IMAGE_SIZE, np.random.default_rng(seed))
    return (torch.tensor(crops, dtype=torch.float32)[:, None] / 255 - DIGITS_MEAN) / DIGITS_STD


def _energy_input_gradient_norm(model: nn.Module, images: torch.Tensor) -> float:
    """Mean over images of ``||∇_x S(x)||_2``, the free energy's input gradient (GReg Fig. 3), in eval mode."""
    return float(training.energy_input_gradient_norms(model, images).mean())


def test_energy_input_gradient_norms_are_each_images_own_and_leave_the_model_as_it_was() -> None:
    """Per image, as if differentiated alone (BatchNorm in eval mode couples nothing); mode and .grad untouched."""
    torch.manual_seed(0)
    model = create("test_resnet").train()
    images = noise_images(5, seed=3)
    norms = training.energy_input_gradient_norms(model, images, batch_size=2)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    for image, norm in zip(images, norms, strict=True):
        alone = image[None].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(training.energy_score(model(alone)).sum(), alone)
        assert float(norm) == pytest.approx(float(gradient.norm()), rel=1e-4)


@pytest.mark.slow
def test_greg_shrinks_the_energy_input_gradient_that_the_energy_loss_leaves() -> None:
    """GReg's mechanism (Fig. 3): with the gradient penalty the energy's input gradient stays far smaller.

    Measured over 5 fine-tunings (this one, unshuffled, and 4 seeded shuffles of the training order), the
    mean ``||∇_x S||`` on held-out auxiliary crops was 2.52 ± 0.07 (sd) with the energy loss and
    0.79 ± 0.02 with GReg (ratio 0.30 to 0.32 per run); on ID test digits 8.23 ± 0.12 against 5.06 ± 0.04
    (ratio 0.61 to 0.63). The asserted ratios, 0.5 and 0.8, sit more than 20 run-to-run sds of the
    difference away from what was measured.

    What this test asserted before, GReg's higher AUROC on unseen inverted digits, is not asserted: on
    this machine GReg was lower in all 5 runs (-0.006 to -0.002, energy 0.982 ± 0.003), on the machine
    where the old test was written higher in all 6 (+0.004 to +0.009), and a third machine saw it lower
    (the failure that retired it): the sign of that small difference moves with the machine's arithmetic
    (thread count, CPU kernels), so it says nothing about the method at this scale. Both models keep about
    the same accuracy (0.981 ± 0.002 and 0.983 ± 0.002).
    """
    test_images, test_labels = digits_split()["test"]
    held_out_aux = _photo_crops(photos.AUXILIARY_PHOTOS, 400, seed=1)  # crops the fine-tuning never saw
    norms, accuracies = {}, {}
    for method in ("energy", "greg"):
        model = _fine_tuned(method)
        accuracies[method] = training.accuracy(model, batches(test_images, test_labels))
        norms[method] = {"id": _energy_input_gradient_norm(model, test_images),
                         "aux": _energy_input_gradient_norm(model, held_out_aux)}
    assert min(accuracies.values()) > 0.95, accuracies
    assert norms["greg"]["aux"] < 0.5 * norms["energy"]["aux"], norms
    assert norms["greg"]["id"] < 0.8 * norms["energy"]["id"], norms
