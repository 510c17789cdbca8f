"""load_benchmark: the offline benchmarks, tuning holdouts, determinism, hub benchmark definitions."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import DatasetInfo, Image

from timm_ood import UnknownNameError, data
from timm_ood.data.benchmarks import tuning_holdout_size
from timm_ood.data.images import OOD_LABEL, images_to_dataset, label_array

pytestmark = pytest.mark.usefixtures("data_cache_dir")

SMALL_SETS = {name: {"size": 2000} for name in ("natural-crop", "natural-resize", "glyphs", "gaussian", "uniform")}


def image_bytes(dataset) -> set[bytes]:
    return {image["bytes"] for image in dataset.cast_column("image", Image(decode=False))["image"]}


@pytest.fixture(scope="module")
def fashion_benchmark(data_fashion_mnist):
    return data.load_benchmark("fashion-mnist", source_params=SMALL_SETS)


def test_tuning_holdout_size_follows_odin():
    assert tuning_holdout_size(10_000, 1000) == 1000
    assert tuning_holdout_size(8925, 1000) == 1000  # iSUN
    assert tuning_holdout_size(1797, 1000) == 179  # a tenth of a small set
    assert tuning_holdout_size(100, 1000) == 10


def test_the_offline_benchmark_has_id_ood_and_tuning_sets(fashion_benchmark):
    benchmark = fashion_benchmark
    assert benchmark.num_classes == 10 and len(benchmark.id_train) == 60_000
    assert len(benchmark.id_test) == 9000 and len(benchmark.tuning.id) == 1000
    assert set(benchmark.ood) == {"digits", "natural-crop", "natural-resize", "glyphs", "faces", "gaussian", "uniform"}
    assert set(benchmark.tuning.ood) == set(benchmark.ood)
    for name, dataset in benchmark.ood.items():
        tuning = benchmark.tuning.ood[name]
        full = benchmark.metadata["ood"][name]["size"]
        assert len(dataset) + len(tuning) == full and len(tuning) == tuning_holdout_size(full, 1000), name
        assert set(label_array(dataset)) == set(label_array(tuning)) == {OOD_LABEL}
    assert benchmark.metadata["ood"]["gaussian"]["params"] == {"size": 2000}
    assert benchmark.metadata["id_train"]["licence"] == "MIT"
    assert benchmark.model_overlay() == data.model_overlay("fashion-mnist")


def test_tuning_images_are_excluded_from_evaluation(fashion_benchmark):
    for name in ("gaussian", "natural-crop"):
        assert not image_bytes(fashion_benchmark.ood[name]) & image_bytes(fashion_benchmark.tuning.ood[name])
    id_test = label_array(fashion_benchmark.id_test)
    assert len(id_test) + len(fashion_benchmark.tuning.id) == 10_000


def test_the_holdouts_are_deterministic(fashion_benchmark):
    again = data.load_benchmark("fashion-mnist", source_params=SMALL_SETS)
    assert image_bytes(again.tuning.ood["uniform"]) == image_bytes(fashion_benchmark.tuning.ood["uniform"])
    assert np.array_equal(label_array(again.tuning.id), label_array(fashion_benchmark.tuning.id))
    reseeded = data.load_benchmark("fashion-mnist", source_params=SMALL_SETS, seed=1)
    assert image_bytes(reseeded.tuning.ood["uniform"]) != image_bytes(fashion_benchmark.tuning.ood["uniform"])


def test_the_auxiliary_outliers_load_on_request(fashion_benchmark):
    outliers = fashion_benchmark.outliers(size=300)
    assert len(outliers) == 300 and set(label_array(outliers)) == {OOD_LABEL}


@pytest.mark.usefixtures("data_fashion_mnist")
def test_fashion_mnist_6_trains_on_six_classes_with_the_other_four_as_near_ood():
    benchmark = data.load_benchmark("fashion-mnist-6", source_params=SMALL_SETS)
    assert benchmark.num_classes == 6
    assert set(label_array(benchmark.id_train)) == set(range(6)) and len(benchmark.id_train) == 36_000
    assert set(label_array(benchmark.id_test)) <= set(range(6))
    assert len(benchmark.id_test) + len(benchmark.tuning.id) == 6000
    holdout = benchmark.ood["fashion-holdout"]
    assert len(holdout) == 3000 and len(benchmark.tuning.ood["fashion-holdout"]) == 1000
    assert set(label_array(holdout)) == {OOD_LABEL}


def test_the_hub_benchmarks_are_defined_by_name():
    hub = data.list_benchmarks(offline=False)
    openood = set(data.list_benchmarks("openood-*"))  # OpenOOD v1.5's four: tests/data/test_openood.py
    assert set(hub) - openood == {"cifar10", "cifar100", "svhn", "mnist"}
    cifar10 = hub["cifar10"]
    assert set(cifar10.ood) == {
        "svhn", "tin-crop", "tin-resize", "lsun-crop", "lsun-resize", "isun", "textures", "gaussian", "uniform",
    }  # fmt: skip
    assert cifar10.ood["gaussian"].params == {"image_size": 32, "channels": 3}
    assert cifar10.ood["svhn"].params == {"as_ood": True}
    sources = data.list_sources()
    for spec in hub.values():
        for ref in (spec.id_train, spec.id_test, *spec.ood.values()):
            assert ref.source in sources and ref.split in sources[ref.source].splits
    assert set(data.list_benchmarks(offline=True)) == {"fashion-mnist", "fashion-mnist-6"}


def test_an_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match=r"unknown benchmark 'cifar-10'.*Did you mean 'cifar10'"):
        data.load_benchmark("cifar-10")


@pytest.mark.usefixtures("data_hub_offline")
def test_a_streamed_set_is_refused_it_cannot_be_held_out(tmp_path):
    images = np.zeros((3, 32, 32, 3), np.uint8)
    images_to_dataset(images, np.arange(3), info=DatasetInfo()).save_to_disk(str(tmp_path / "cifar10"))
    local_stream = {"cifar10": {"path": tmp_path / "cifar10", "streaming": True}}
    with pytest.raises(TypeError, match=r"ID train \(source 'cifar10'\) loaded as a stream"):
        data.load_benchmark("cifar10", source_params=local_stream)
