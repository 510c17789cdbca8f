"""The plugin's detectors against scikit-learn itself, its streaming sample, and its safe persistence."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import skops.io
import timm_ood
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.covariance import EllipticEnvelope
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LinearRegression
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import LocalOutlierFactor
from sklearn.svm import OneClassSVM
from timm_ood.testing import conformance_data, conformance_model

from timm_ood_sklearn import IsolationForestDetector, UntrustedEstimatorError
from timm_ood_sklearn.sampling import FeatureMoments, FeatureReservoir

NAMES = ("isolation-forest", "one-class-svm", "lof", "elliptic-envelope", "sklearn-gmm")
BUILT_OBJECTS: list[object] = []  # what Marker.__setstate__ would record if a file could build one


class Marker:
    """An object a tampered file smuggles in: building it would run ``__setstate__``."""

    def __setstate__(self, state: dict) -> None:
        BUILT_OBJECTS.append(state)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return conformance_model()


@pytest.fixture(scope="module")
def data(model):
    return conformance_data(model)


def fitted(model, data, name: str, **hyperparameters) -> timm_ood.OODModel:
    return timm_ood.wrap(model, name, **hyperparameters).fit(data.fit_batches, progress=False)


def pre_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)


def test_installing_the_plugin_registers_its_detectors_with_its_distribution() -> None:
    listed = timm_ood.list_detectors(with_distribution=True)
    assert {name: listed[name] for name in NAMES} == dict.fromkeys(NAMES, f"timm-ood-sklearn {version('timm-ood-sklearn')}")
    assert listed["msp"].startswith("timm-ood ")


def test_wrap_by_name_fits_and_scores(model, data) -> None:
    ood = fitted(model, data, "isolation-forest", n_estimators=50)
    in_scores, out_scores = ood.ood_score(data.in_distribution), ood.ood_score(data.out_of_distribution)
    assert in_scores.shape == (64,) and in_scores.dtype == torch.float64
    assert (out_scores[:, None] > in_scores[None, :]).double().mean() > 0.9  # higher = more OOD


SKLEARN_MODELS = [
    ("isolation-forest", {"n_estimators": 50}, lambda: IsolationForest(n_estimators=50, random_state=0)),
    ("one-class-svm", {"nu": 0.2}, lambda: OneClassSVM(nu=0.2)),
    ("lof", {"n_neighbors": 10}, lambda: LocalOutlierFactor(n_neighbors=10, novelty=True)),
    ("elliptic-envelope", {}, lambda: EllipticEnvelope(random_state=0)),
    *[
        ("sklearn-gmm", {"n_components": 2, "covariance_type": kind},
         lambda kind=kind: GaussianMixture(n_components=2, covariance_type=kind, random_state=0))
        for kind in ("full", "tied", "diag", "spherical")
    ],
]


@pytest.mark.parametrize(("name", "hyperparameters", "make_estimator"), SKLEARN_MODELS,
                         ids=[f"{name}-{'-'.join(map(str, hp.values()))}" for name, hp, _ in SKLEARN_MODELS])
def test_scores_are_negated_score_samples_of_scikit_learn(model, data, name, hyperparameters, make_estimator) -> None:
    detector = fitted(model, data, name, **hyperparameters).detector
    reservoir = FeatureReservoir(detector.reservoir_size, detector.random_state)
    for images, _ in data.fit_batches:
        reservoir.add(pre_logits(model, images))
    mean, scale = detector.feature_mean.numpy(), detector.feature_scale.numpy()
    estimator = make_estimator().fit((reservoir.sample().double().numpy() - mean) / scale)
    images = torch.cat([data.in_distribution[:16], data.out_of_distribution[:16]])
    expected = -estimator.score_samples((pre_logits(model, images).double().numpy() - mean) / scale)
    scores = timm_ood.wrap(model, detector).ood_score(images)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-7, atol=1e-9)


def test_hyperparameters_pass_through_to_scikit_learn(model, data) -> None:
    assert len(fitted(model, data, "isolation-forest", n_estimators=7).detector._estimator.estimators_) == 7
    assert fitted(model, data, "lof", n_neighbors=5).detector._estimator.n_neighbors_ == 5
    assert fitted(model, data, "sklearn-gmm", n_components=3).detector.weights.shape == (3,)
    assert fitted(model, data, "isolation-forest", reservoir_size=50).detector._estimator.max_samples_ == 50


def test_contamination_is_not_a_hyperparameter() -> None:
    with pytest.raises(TypeError, match=r"no hyperparameter 'contamination'.*n_estimators"):
        timm_ood.create_detector("isolation-forest", contamination=0.1)


def test_moments_are_exact_and_constant_features_keep_their_scale() -> None:
    rows = torch.randn(300, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 5
    rows[:, 3] = 7.0  # a constant feature
    moments = FeatureMoments()
    for start in range(0, 300, 70):
        moments.update(rows[start:start + 70])
    mean, scale = moments.finish()
    torch.testing.assert_close(mean, rows.mean(0))
    torch.testing.assert_close(scale[:3], rows[:, :3].std(0, correction=0))
    assert scale[3] == 1.0


def reservoir_of(ids: torch.Tensor, capacity: int, batch_size: int, seed: int = 0) -> FeatureReservoir:
    reservoir = FeatureReservoir(capacity, seed)
    for start in range(0, len(ids), batch_size):
        reservoir.add(ids[start:start + batch_size, None])
        assert reservoir.held <= 2 * capacity + batch_size
    return reservoir


def test_the_reservoir_sample_does_not_depend_on_the_batch_size() -> None:
    ids = torch.arange(5000, dtype=torch.float32)
    samples = [reservoir_of(ids, 300, batch_size).sample() for batch_size in (1, 64, 999, 5000)]
    assert samples[0].shape == (300, 1)
    assert all(torch.equal(sample, samples[0]) for sample in samples[1:])
    assert not torch.equal(reservoir_of(ids, 300, 64, seed=1).sample(), samples[0])


def test_the_reservoir_is_uniform_and_keeps_everything_when_it_fits() -> None:
    ids = torch.arange(20_000, dtype=torch.float32)
    kept = reservoir_of(ids, 2000, 256).sample().squeeze(1)
    assert kept.unique().numel() == 2000
    per_quarter = torch.bincount((kept // 5000).long(), minlength=4).double()
    assert ((per_quarter - 500).abs() < 5 * (2000 * 0.25 * 0.75) ** 0.5).all()  # binomial: 5 sd
    everything = reservoir_of(ids[:100], 2000, 32).sample().squeeze(1)
    assert torch.equal(everything.sort().values, ids[:100])


def test_fitted_state_is_arrays_or_skops_bytes(model, data, tmp_path: Path) -> None:
    expected = {
        "isolation-forest": ({"n_estimators": 10}, {"feature_mean", "feature_scale", "estimator_skops"}),
        "elliptic-envelope": ({}, {"feature_mean", "feature_scale", "location", "precision"}),
        "sklearn-gmm": ({}, {"feature_mean", "feature_scale", "weights", "means", "precisions_cholesky"}),
    }
    for name, (hyperparameters, keys) in expected.items():
        path = tmp_path / f"{name}.safetensors"
        fitted(model, data, name, **hyperparameters).save_detector(path)
        with safe_open(str(path), framework="pt") as handle:
            assert set(handle.keys()) == keys
            assert handle.metadata()["timm_ood.detector"] == name
            dtypes = {key: handle.get_tensor(key).dtype for key in keys}
        assert dtypes.pop("estimator_skops", torch.uint8) == torch.uint8
        assert set(dtypes.values()) == {torch.float64}


@pytest.mark.parametrize(("name", "hyperparameters"), [
    ("isolation-forest", {"n_estimators": 5}),
    ("lof", {"algorithm": "kd_tree"}),
    ("lof", {"algorithm": "ball_tree"}),
])
def test_skops_state_round_trips_with_the_declared_trusted_types(model, data, tmp_path: Path, name,
                                                                 hyperparameters) -> None:
    ood = fitted(model, data, name, **hyperparameters)
    ood.save_detector(tmp_path / "detector.safetensors")
    loaded = timm_ood.wrap(model, "msp").load_detector(tmp_path / "detector.safetensors")
    images = data.out_of_distribution[:8]
    assert torch.equal(loaded.ood_score(images), ood.ood_score(images))


def tamper(path: Path, estimator: object) -> None:
    """Rewrite a saved isolation forest with another skops payload, keeping everything else."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    tensors["estimator_skops"] = torch.frombuffer(bytearray(skops.io.dumps(estimator)), dtype=torch.uint8)
    save_file(tensors, str(path), metadata=metadata)


def test_a_payload_naming_an_untrusted_type_is_refused_without_running_it(model, data, tmp_path: Path) -> None:
    path = tmp_path / "forest.safetensors"
    fitted(model, data, "isolation-forest", n_estimators=5).save_detector(path)
    with safe_open(str(path), framework="pt") as handle:
        payload = handle.get_tensor("estimator_skops").numpy().tobytes()
    forest = skops.io.loads(payload, trusted=list(IsolationForestDetector.trusted_types))
    forest.marker = Marker()
    tamper(path, forest)
    with pytest.raises(UntrustedEstimatorError, match=r"refusing to load a IsolationForest.*\.Marker.*nothing"):
        timm_ood.wrap(model, "msp").load_detector(path)
    assert BUILT_OBJECTS == []


def test_a_payload_of_another_estimator_class_is_refused(model, data, tmp_path: Path) -> None:
    path = tmp_path / "forest.safetensors"
    fitted(model, data, "isolation-forest", n_estimators=5).save_detector(path)
    tamper(path, LinearRegression().fit(np.eye(3), np.arange(3.0)))
    with pytest.raises(UntrustedEstimatorError, match="holds LinearRegression, not IsolationForest"):
        timm_ood.wrap(model, "msp").load_detector(path)


def test_a_plugin_reusing_a_name_of_this_plugin_is_a_duplicate_name_error() -> None:
    class AnotherLOF(timm_ood.Detector):
        name = "lof"

        def score(self, outputs):
            return outputs.logits.amax(1)

    class Plugin:
        @timm_ood.hookimpl
        def timm_ood_detectors(self):
            return [AnotherLOF]

    timm_ood.register_plugin(Plugin(), name="another-lof")
    try:
        with pytest.raises(timm_ood.DuplicateNameError, match=r"'lof'.*timm-ood-sklearn .*registered at run time"):
            timm_ood.list_detectors()
    finally:
        timm_ood.reload_plugins()
