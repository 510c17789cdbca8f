"""Lee et al.'s joint confidence training: the DCGAN, Algorithm 1's three updates, and the fit function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_ood import training

from .._models import DIGITS_MEAN, DIGITS_STD, batches, create, digits_split


@pytest.mark.parametrize("input_size", [(1, 28, 28), (1, 32, 32), (3, 64, 64), (3, 33, 30)])
def test_dcgan_is_sized_to_the_input_and_emits_normalised_images(input_size) -> None:
    channels = input_size[0]
    mean, std = [0.5, 0.4, 0.3][:channels], [0.2, 0.25, 0.3][:channels]
    generator = training.DCGANGenerator(input_size, mean, std, width=8)
    discriminator = training.DCGANDiscriminator(input_size, width=8)
    z = generator.latent(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels, images = generator.pixels(z), generator(z)
    assert pixels.shape == images.shape == (3, *input_size)
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1  # sigmoid: [0, 1] pixel space
    expected = (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(images, expected)  # mapped into the classifier's normalised space
    with torch.no_grad():
        assert discriminator(images).shape == (3,)


def test_dcgan_for_model_reads_the_data_config() -> None:
    model = create("test_resnet")
    generator = training.DCGANGenerator.for_model(model, width=8)
    assert generator.input_size == (1, 32, 32)
    assert float(generator.mean) == pytest.approx(DIGITS_MEAN) and float(generator.std) == pytest.approx(DIGITS_STD)
    assert training.DCGANDiscriminator.for_model(model, width=8).input_size == (1, 32, 32)


def _trainer(beta: float = 1.0, generator_loss: str = "paper", lr: float = 1e-3):
    torch.manual_seed(0)
    model = create("test_resnet")
    generator = training.DCGANGenerator.for_model(model, latent_dim=16, width=8)
    discriminator = training.DCGANDiscriminator.for_model(model, width=8)
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in (model, generator, discriminator)]
    trainer = training.JointConfidenceTrainer(model, generator, discriminator, *optimizers, beta=beta,
                                              generator_loss=generator_loss, noise=torch.Generator().manual_seed(1))
    generator.train()
    discriminator.train()
    return trainer


def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _no_gradients(*modules: nn.Module) -> bool:
    return all(p.grad is None for module in modules for p in module.parameters())


def _same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], after[k]) for k in before)


def test_one_joint_step_moves_each_module_along_its_own_objective_only() -> None:
    trainer = _trainer()
    model, generator, discriminator = trainer.model, trainer.generator, trainer.discriminator
    steps: list[str] = []
    for name, optimizer in (("classifier", trainer.classifier_optimizer), ("generator", trainer.generator_optimizer),
                            ("discriminator", trainer.discriminator_optimizer)):
        original = optimizer.step

        def counted(*args, _name=name, _original=original, **kwargs):
            steps.append(_name)
            return _original(*args, **kwargs)

        optimizer.step = counted
    images, labels = (t[:16] for t in digits_split()["train"])
    z = trainer.latent(16)

    # 1. D ascends log D(x) + log(1 - D(G(z))); nothing else changes
    before = float(trainer.discriminator_objective(images, z).detach())
    g, d, c = _parameters(generator), _parameters(discriminator), _state(model)
    trainer.discriminator_step(images, z)
    assert steps == ["discriminator"]
    assert float(trainer.discriminator_objective(images, z).detach()) > before
    assert not _same(d, _parameters(discriminator)) and _same(g, _parameters(generator)) and _same(c, _state(model))
    assert _no_gradients(generator, model)

    # 2. G descends its GAN term + beta KL through the classifier, which stays untouched (BatchNorm statistics too)
    before = float(trainer.generator_objective(z).detach())
    discriminator.zero_grad(set_to_none=True)
    g, d, c = _parameters(generator), _parameters(discriminator), _state(model)
    trainer.generator_step(16, z)
    assert steps == ["discriminator", "generator"]
    assert float(trainer.generator_objective(z).detach()) < before
    assert not _same(g, _parameters(generator)) and _same(d, _parameters(discriminator)) and _same(c, _state(model))
    assert _no_gradients(model, discriminator)  # nothing leaked into the classifier or D

    # 3. the classifier descends CE + beta KL on detached samples; G and D do not move
    model.train()
    before = float(trainer.classifier_objective(images, labels, z).detach())
    generator.zero_grad(set_to_none=True)
    g, d, c = _parameters(generator), _parameters(discriminator), _parameters(model)
    trainer.classifier_step(images, labels, z)
    assert steps == ["discriminator", "generator", "classifier"]
    model.train()
    assert float(trainer.classifier_objective(images, labels, z).detach()) < before
    assert not _same(c, _parameters(model)) and _same(g, _parameters(generator)) and _same(d, _parameters(discriminator))
    assert _no_gradients(generator, discriminator)


class _FixedDiscriminator(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits + 0 * images.sum()


@pytest.mark.parametrize("generator_loss", ["paper", "non-saturating"])
def test_generator_objective_by_hand(generator_loss: str) -> None:
    trainer = _trainer(beta=0.0, generator_loss=generator_loss)
    logits = torch.tensor([-1.0, 0.5, 2.0])
    trainer.discriminator = _FixedDiscriminator(logits)
    z = trainer.latent(3)
    d = torch.sigmoid(logits)
    expected = torch.log(1 - d).mean() if generator_loss == "paper" else -torch.log(d).mean()
    torch.testing.assert_close(trainer.generator_objective(z), expected)
    # beta adds beta * KL(U || P(y | G(z))) of the classifier in eval mode
    trainer.beta = 2.0
    trainer.model.train()
    with torch.no_grad():
        probabilities = trainer.model.eval()(trainer.generator(z)).softmax(1)
    trainer.model.train()
    kl = (0.1 * torch.log(0.1 / probabilities)).sum(1).mean()
    torch.testing.assert_close(trainer.generator_objective(z), expected + 2.0 * kl, rtol=1e-5, atol=1e-6)
    assert trainer.model.training  # the objective restores the classifier's mode


def test_discriminator_objective_by_hand() -> None:
    trainer = _trainer()
    images = digits_split()["train"][0][:3]
    z = trainer.latent(3)
    real, fake = trainer.discriminator(images), trainer.discriminator(trainer.generator(z))
    expected = torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(trainer.discriminator_objective(images, z), expected, rtol=1e-5, atol=1e-6)


def test_fit_joint_confidence_runs_seeded_and_records_the_gan() -> None:
    images, labels = digits_split()["train"]
    data = batches(images[:48], labels[:48], 16)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create("test_resnet")
        run = training.fit_joint_confidence(model, data, beta=1.0, epochs=1, latent_dim=16, gan_width=8,
                                            generator_loss="non-saturating", lr=1e-3, seed=3, progress=False,
                                            eval_data=data)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    record = run.history.epochs[0]
    assert isinstance(record, training.JointEpochRecord) and record.accuracy is not None
    assert all(torch.isfinite(torch.tensor(v)) for v in (record.loss, record.discriminator_objective,
                                                          record.generator_objective))
    assert not model.training and not run.generator.training and not run.discriminator.training
    assert run.generator.input_size == (1, 32, 32)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="non-saturating"):
        training.fit_joint_confidence(model, data, generator_loss="minimax")


def test_fit_joint_confidence_is_fit_with_the_joint_objective() -> None:
    images, labels = digits_split()["train"]
    data = batches(images[:48], labels[:48], 16)
    runs = []
    for by_hand in (False, True):
        torch.manual_seed(0)
        model = create("test_resnet")
        if by_hand:
            objective = training.JointConfidenceObjective(beta=0.5, latent_dim=16, gan_width=8)
            history = training.fit(model, data, loss=objective, epochs=2, optimizer="adam", lr=1e-3,
                                   weight_decay=0.0, schedule="step", milestones=(0.6,), seed=3, progress=False)
            generator, discriminator = objective.generator, objective.discriminator
        else:
            run = training.fit_joint_confidence(model, data, beta=0.5, epochs=2, latent_dim=16, gan_width=8,
                                                lr=1e-3, seed=3, progress=False)
            history, generator, discriminator = run.history, run.generator, run.discriminator
        runs.append(([{**vars(e), "seconds": 0} for e in history.epochs],
                     [_state(m) for m in (model, generator, discriminator)]))
    assert runs[0][0] == runs[1][0]  # loss, rate and the GAN's mean objectives per epoch
    for first, second in zip(runs[0][1], runs[1][1], strict=True):
        assert first.keys() == second.keys() and _same(first, second)
    # G and D are the objective's, stepped by their own optimisers on fit's schedule, never by fit's optimiser
    assert list(objective.fit_parameters()) == [] and len(list(objective.parameters())) > 0
    assert not generator.training and not discriminator.training
    assert history.epochs[1].lr == pytest.approx(1e-4)  # x0.1 at 60% of training
    for optimizer in (objective.trainer.generator_optimizer, objective.trainer.discriminator_optimizer):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="classifier_optimizer"):
        objective.trainer.classifier_step(images[:4], labels[:4])


def test_classifier_step_is_the_confidence_loss_on_generated_samples() -> None:
    trainer = _trainer(beta=0.5)
    images, labels = (t[:8] for t in digits_split()["train"])
    z = trainer.latent(8)
    trainer.model.train()
    with torch.no_grad():
        fake = trainer.generator(z)
        logits = trainer.model(torch.cat([images, fake]))
        expected = F.cross_entropy(logits[:8], labels) + 0.5 * training.kl_to_uniform(logits[8:]).mean()
        torch.testing.assert_close(trainer.classifier_objective(images, labels, z), expected)
