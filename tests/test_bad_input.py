"""Bad input is an error that says what was wrong and how to fix it, never a silent number."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from datasets import DatasetInfo

import timm_ood
from timm_ood import data, training
from timm_ood.cli import main
from timm_ood.data.images import images_to_dataset
from timm_ood.detectors import create_detector
from timm_ood.errors import IncompatibleModelError
from timm_ood.metrics import OODMetrics, ood_metrics
from timm_ood.tap import Need

from ._models import batches, create, digits_split, noise_images, trained

# -- 1. fit labels ------------------------------------------------------------------------------------------


def _labels(*values: int) -> torch.Tensor:
    return torch.tensor(values + (0,) * (10 - len(values)))


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (_labels(10, 12, 10), ValueError,
         r"labels must be class indices in \[0, 10\) for this 10-class model, got 10, 12 \(3 of 10 labels\)"
         r".*create the model with num_classes=13"),
        (_labels(-1, -1), ValueError,
         r"the fit data carries the OOD label -1 \(2 of 10 labels.*filter out OOD images \(label -1\) from the fit data"),
        (_labels(-3), ValueError, r"labels must be class indices >= 0, got -3 \(1 of 10 labels\)"),
        (_labels(1).float(), TypeError, r"labels must be integer class indices, got dtype torch.float32.*labels.long\(\)"),
        (torch.eye(10), ValueError, r"labels must have shape \[10\].*got shape \(10, 10\).*labels.argmax\(dim=1\)"),
    ],
    ids=["beyond-classes", "ood-label", "negative", "float", "one-hot"],
)
@pytest.mark.parametrize("detector", ["mahalanobis", "knn-no-labels"])
def test_fit_labels_outside_the_models_classes(labels: torch.Tensor, error: type, message: str, detector: str) -> None:
    images = digits_split()["train"][0][:10]
    if detector == "knn-no-labels":  # a detector that does not fit on labels ignores them
        timm_ood.wrap(trained("test_resnet"), "knn").fit([(images, labels)], progress=False)
        return
    with pytest.raises(error, match=rf"^fitting 'mahalanobis': {message}"):
        timm_ood.wrap(trained("test_resnet"), detector).fit([(images, labels)], progress=False)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (_labels(11), r"^training.fit: labels must be class indices in \[0, 10\).*got 11 .*num_classes=12"),
        (_labels(-1), r"^training.fit: .*OOD label -1.*pass auxiliary outliers as fit\(\.\.\., outliers=\.\.\.\)"),
    ],
    ids=["beyond-classes", "ood-label"],
)
def test_training_labels_outside_the_models_classes(labels: torch.Tensor, message: str) -> None:
    images = digits_split()["train"][0][:10]
    with pytest.raises(ValueError, match=message):
        training.fit(create("test_resnet"), [(images, labels)], progress=False)


# -- 2. logit detectors on a model without classifier ---------------------------------------------------------


def _reads_the_classifier(detector: timm_ood.Detector) -> bool:
    """Logits or the linear classifier, in the shared forward or in its own input-gradient passes."""
    r = detector.requirements
    needs = r.outputs | r.outputs_for_fit
    return Need.LOGITS in needs or r.linear_classifier or (r.input_gradients and not needs)


def test_detectors_reading_logits_refuse_a_model_without_classifier_with_one_message() -> None:
    headless = create("test_resnet", num_classes=0).eval()
    fit_data = batches(*digits_split()["train"], 200)[:2]
    x = digits_split()["test"][0][:4]
    messages, refused, scored = set(), [], []
    for name in timm_ood.list_detectors():
        detector = create_detector(name)
        if name == "deep-ensemble":  # refused for being one model; its members are checked by EnsembleModel
            continue
        r = detector.requirements
        declares = Need.LOGITS in (r.outputs | r.outputs_for_fit) or r.linear_classifier or r.input_gradients
        try:
            wrapped = timm_ood.wrap(headless, detector)
        except IncompatibleModelError as error:
            refused.append(name)
            if declares or "num_classes=0" in str(error):
                messages.add(str(error).replace(repr(name), "<detector>"))
            continue
        assert not _reads_the_classifier(detector), f"{name} reads logits but wrap() accepted num_classes=0"
        scores = wrapped.fit(fit_data, progress=False).ood_score(x)  # feature detectors still work
        assert scores.shape == (4,) and bool(torch.isfinite(scores).all()), name
        scored.append(name)
    assert messages == {
        "detector <detector> needs the model's classifier (its logits), but the model has no classifier "
        "(num_classes=0). Create it with num_classes=<classes> (or model.reset_classifier(<classes>)), or use "
        "a feature detector such as 'mahalanobis'."
    }
    assert {"msp", "odin", "gradnorm", "react", "vim", "energy"} <= set(refused)
    assert {"mahalanobis", "mahalanobis-odin", "knn"} <= set(scored)  # feature-space detectors, gradients included
    with pytest.raises(IncompatibleModelError, match=r"no classifier \(num_classes=0\)"):
        timm_ood.wrap(headless, "mahalanobis").tap.logits(x)  # the own-pass path refuses too


# -- 3. images ----------------------------------------------------------------------------------------------


def _nan_in_one() -> torch.Tensor:
    x = digits_split()["test"][0][:3].clone()
    x[1, 0, :2, :2] = float("nan")
    return x


def _inf_in_two() -> torch.Tensor:
    x = digits_split()["test"][0][:3].clone()
    x[0, 0, 0, 0], x[2, 0, 5, 5] = float("inf"), -float("inf")
    return x


@pytest.mark.parametrize(
    ("architecture", "images", "message"),
    [
        ("strict_vit", lambda: torch.randn(2, 1, 48, 48),
         r"the model takes 32x32 images .* but the batch is 48x48; resize the images with timm's eval transform "
         r"\(timm.data.create_transform\(\*\*timm.data.resolve_data_config\(\{\}, model=model\)\)\), or load them "
         r"with timm_ood.data.make_loader\(dataset, model\)"),
        ("test_resnet", _nan_in_one, r"^1 of 3 images contain NaN or inf \(4 values\);.*Check the loader"),
        ("test_resnet", _inf_in_two, r"^2 of 3 images contain NaN or inf \(2 values\)"),
        ("test_resnet", lambda: torch.zeros(4, 1, 32, 32),
         r"^every value of the batch is 0 \(4 images of \(1, 32, 32\)\): it carries no image content.*Check the loader"),
        ("test_vit", lambda: torch.full((1, 1, 32, 32), -0.75), r"^every value of the batch is -0.75"),
    ],
    ids=["vit-wrong-size", "nan", "inf", "all-zeros", "constant"],
)
def test_bad_images_are_refused(architecture: str, images, message: str) -> None:
    def model() -> torch.nn.Module:  # timm's test_vit takes any size (dynamic_img_size): a strict one here
        strict = architecture == "strict_vit"
        return create("test_vit", dynamic_img_size=False) if strict else create(architecture)

    with pytest.raises(ValueError, match=message):
        timm_ood.wrap(model().eval(), "msp").ood_score(images())
    fitted = timm_ood.wrap(model().eval(), "mahalanobis")
    x = images()
    with pytest.raises(ValueError, match=message):  # the fit path checks the same
        fitted.fit([(x, torch.arange(len(x)) % 10)], progress=False)


def test_images_that_are_fine_pass() -> None:
    dynamic = timm_ood.wrap(create("test_vit").eval(), "msp")
    assert dynamic.model.dynamic_img_size
    assert dynamic.ood_score(torch.randn(2, 1, 48, 48)).shape == (2,)  # no fixed size: any size
    cnn = timm_ood.wrap(create("test_resnet").eval(), "msp")
    assert cnn.ood_score(torch.randn(2, 1, 48, 48)).shape == (2,)
    for x in (noise_images(3), torch.randn(3, 1, 32, 32), torch.rand(1, 1, 32, 32)):  # noise OOD sets
        assert bool(torch.isfinite(cnn.ood_score(x)).all())


# -- 4. datasets --------------------------------------------------------------------------------------------


def _dataset(count: int = 4) -> datasets.Dataset:
    images = np.random.default_rng(0).integers(0, 256, size=(count, 32, 32), dtype=np.uint8)
    return images_to_dataset(images, np.arange(count) % 10, info=DatasetInfo(dataset_name="made-here"))


@pytest.mark.parametrize(
    ("dataset", "error", "message"),
    [
        (lambda: _dataset().remove_columns("label"), ValueError,
         r"dataset 'made-here' has no 'label' column \(its columns: 'image'\).*dataset.rename_column\('<label column>', "
         r"'label'\).*add_column\('label', \[-1\] \* len\(dataset\)\)"),
        (lambda: _dataset().rename_column("image", "img"), ValueError,
         r"dataset 'made-here' has no 'image' column \(its columns: 'img', 'label'\).*rename_column"),
        (lambda: _dataset().remove_columns("label").add_column("label", ["cat", "dog", "cat", "dog"]), TypeError,
         r"the 'label' column of dataset 'made-here' holds string values, not integer class indices \(its columns: "
         r"'image', 'label'\).*class_encode_column\('label'\).*cast_column\('label', ClassLabel"),
        (lambda: _dataset().remove_columns("label").add_column("label", [0.5, 1.0, 2.0, 3.5]), TypeError,
         r"holds float64 values, not integer class indices"),
    ],
    ids=["no-label", "no-image", "string-labels", "float-labels"],
)
def test_datasets_without_integer_labels_are_refused(dataset, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        data.make_loader(dataset(), create("test_resnet"))


def test_a_stream_with_string_labels_is_refused_at_its_first_batch() -> None:
    def examples():
        for example in _dataset():
            yield {"image": example["image"], "label": "cat"}

    stream = datasets.IterableDataset.from_generator(examples)
    loader = data.make_loader(stream, create("test_resnet"), batch_size=2)
    with pytest.raises(TypeError, match=r"labels must be integer class indices, got <U3 values such as \['cat', 'cat'\]"):
        next(iter(loader))


# -- 5. metrics ---------------------------------------------------------------------------------------------

_SCORES = torch.linspace(0, 1, 6)
_IS_OOD = torch.tensor([0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize(
    ("scores", "is_ood", "error", "message"),
    [
        (_SCORES.to(torch.complex64), _IS_OOD, ValueError, r"scores must be real numbers .*got dtype torch.complex64"),
        (_SCORES > 0.5, _IS_OOD, ValueError, r"scores must be real numbers .*got dtype torch.bool"),
        (torch.tensor([0.1, float("nan"), 0.3, 0.4, 0.5, 0.6]), _IS_OOD, ValueError,
         r"scores contain NaN \(1 of 6\); NaN is not a valid OOD score"),
        (_SCORES, _IS_OOD + 1, ValueError,
         r"is_ood must hold only 0 \(ID\) and 1 \(OOD\), but it also holds 2. Map the labels to 0 \(ID\) / 1 \(OOD\)"),
        (_SCORES, _IS_OOD - 1, ValueError, r"is_ood must hold only 0 \(ID\) and 1 \(OOD\), but it also holds -1. Dataset labels mark OOD images with -1: "
         r"use is_ood = \(labels == -1\)"),
        (_SCORES, torch.full((6,), 0.5), ValueError, r"is_ood must hold only 0 \(ID\) and 1 \(OOD\), but it also holds 0.5"),
        (_SCORES, _IS_OOD.to(torch.complex64), ValueError, r"is_ood must hold 0 \(ID\) and 1 \(OOD\), got dtype"),
        (_SCORES, _IS_OOD[:5], ValueError, r"scores and is_ood must have the same shape .*got \(6,\) and \(5,\)"),
        (_SCORES, torch.zeros(6), ValueError,
         r"no OOD \(is_ood == 1\) samples among 6; OOD metrics need at least one ID and one OOD sample"),
        ("0.1 0.2", _IS_OOD, TypeError, r"scores must be a tensor \(or an array / list of numbers\), got str"),
    ],
    ids=["complex", "bool", "nan", "labels-1-2", "labels-minus-1-0", "labels-0.5", "complex-labels", "lengths",
         "one-class", "string"],
)
@pytest.mark.parametrize("form", ["ood_metrics", "OODMetrics"])
def test_bad_metric_inputs(scores, is_ood, error: type, message: str, form: str) -> None:
    with pytest.raises(error, match=rf"^{form}: {message}"):
        if form == "ood_metrics":
            ood_metrics(scores, is_ood)
        else:
            metric = OODMetrics()
            metric.update(scores, is_ood)
            metric.compute()


def test_metrics_take_numpy_and_lists() -> None:
    expected = ood_metrics(_SCORES, _IS_OOD)
    assert ood_metrics(_SCORES.numpy(), _IS_OOD.tolist()) == expected


# -- the command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--checkpoint", "c.safetensors", "--tpr", "1.5"], "argument --tpr: must be a fraction in (0, 1]"),
        (["eval", "--checkpoint", "c.safetensors", "--tpr", "nan"], "argument --tpr: expected a finite number"),
        (["eval", "--checkpoint", "c.safetensors", "--detectors", " , "],
         "argument --detectors: expected comma-separated detector names"),
        (["eval", "--checkpoint", "c.safetensors", "--detectors", "msp,msp"], "argument --detectors: msp listed twice"),
        (["train", "--model", "test_resnet", "--out", "m.safetensors", "--lr", "-0.1"], "argument --lr: must be > 0"),
        (["train", "--model", "test_resnet", "--out", "m.safetensors", "--weight-decay", "-1"],
         "argument --weight-decay: must be >= 0"),
        (["train", "--model", "test_resnet", "--out", "m.safetensors", "--epochs", "two"],
         "argument --epochs: expected a whole number >= 1, got 'two'"),
    ],
    ids=["tpr-above-1", "tpr-nan", "no-detectors", "duplicate-detector", "negative-lr", "negative-decay", "epochs-text"],
)
def test_cli_refuses_bad_arguments_in_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error
