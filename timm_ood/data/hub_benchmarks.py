"""The seeds' benchmarks on Hugging Face hub datasets (CIFAR, SVHN, MNIST, TinyImageNet, LSUN, ...).

A built-in plugin, registered through the same hooks as third-party ones. Every
source loads with ``datasets.load_dataset`` from its hub id, or from a local
copy given as ``path=`` (see :class:`~timm_ood.data.hub.HubDataset`); offline,
without a local copy, loading fails with :class:`~timm_ood.data.HubUnavailableError`.
The LSUN and iSUN sets are the crop/resize folders ODIN's authors distributed,
as mirrored on the hub by the ``detectors`` library (Dadalto, 2023).
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from .benchmarks import BenchmarkSpec, SourceRef
from .hub import HubDataset, OdinResampled
from .sources import SourceSpec

__all__ = ["timm_ood_benchmarks", "timm_ood_sources"]

_CROP_PCT_ONE = 1.0  # train and test at the native size: timm's eval transform crops nothing


def _overlay(channels: int, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    return {"input_size": (channels, size, size), "mean": mean, "std": std, "crop_pct": _CROP_PCT_ONE}


_TINY_IMAGENET = HubDataset("tiny-imagenet", "zh-plus/tiny-imagenet", split_names={"test": "valid"})
_ODIN_OOD_PROVENANCE = "ODIN's OOD folders (Liang et al. 2018), mirrored on the hub by the detectors library"


def _hub_source(
    name: str,
    loader: HubDataset | OdinResampled,
    description: str,
    licence: str,
    *,
    hub_id: str | None,
    splits: tuple[str, ...] = ("test",),
    num_classes: int | None = None,
    model_overlay: dict | None = None,
    provenance: str | None = None,
) -> SourceSpec:
    where = f"Hugging Face hub {hub_id!r}" if hub_id else "a local copy only (path=...)"
    return SourceSpec(
        name,
        loader,
        description,
        f"{provenance}; {where}" if provenance else where,
        licence,
        splits=splits,
        offline=False,
        num_classes=num_classes,
        hub_id=hub_id,
        model_overlay=model_overlay,
    )


_SOURCES = (
    _hub_source(
        "cifar10",
        HubDataset("cifar10", "uoft-cs/cifar10", image_column="img"),
        "CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes.",
        "no licence stated (Krizhevsky 2009; research use)",
        hub_id="uoft-cs/cifar10",
        splits=("train", "test"),
        num_classes=10,
        model_overlay=_overlay(3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ),
    _hub_source(
        "cifar100",
        HubDataset("cifar100", "uoft-cs/cifar100", image_column="img", label_column="fine_label"),
        "CIFAR-100: 50,000 train / 10,000 test 32x32 colour images, 100 fine classes.",
        "no licence stated (Krizhevsky 2009; research use)",
        hub_id="uoft-cs/cifar100",
        splits=("train", "test"),
        num_classes=100,
        model_overlay=_overlay(3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ),
    _hub_source(
        "svhn",
        HubDataset("svhn", "ufldl-stanford/svhn", config="cropped_digits"),
        "SVHN cropped digits: 73,257 train / 26,032 test / 531,131 extra 32x32 colour images, 10 classes.",
        "non-commercial use only (SVHN terms)",
        hub_id="ufldl-stanford/svhn",
        splits=("train", "test", "extra"),
        num_classes=10,
        model_overlay=_overlay(3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    ),
    _hub_source(
        "mnist",
        HubDataset("mnist", "ylecun/mnist"),
        "MNIST: 60,000 train / 10,000 test 28x28 grey handwritten digits.",
        "CC BY-SA 3.0 per the MNIST site (LeCun, Cortes & Burges); the hub card says MIT",
        hub_id="ylecun/mnist",
        splits=("train", "test"),
        num_classes=10,
        model_overlay=_overlay(1, 28, (0.1307,), (0.3081,)),
    ),
    _hub_source(
        "tiny-imagenet",
        _TINY_IMAGENET,
        "TinyImageNet: 100,000 train / 10,000 validation ('test' here) 64x64 colour images, 200 classes.",
        "ImageNet terms of access (non-commercial research)",
        hub_id="zh-plus/tiny-imagenet",
        splits=("train", "test"),
        num_classes=200,
    ),
    _hub_source(
        "tin-crop",
        OdinResampled(_TINY_IMAGENET, "crop"),
        "TinyImageNet (crop): a random 32x32 patch of each of the 10,000 validation images (ODIN Sec. 4.2).",
        "ImageNet terms of access (non-commercial research)",
        hub_id="zh-plus/tiny-imagenet",
    ),
    _hub_source(
        "tin-resize",
        OdinResampled(_TINY_IMAGENET, "resize"),
        "TinyImageNet (resize): the 10,000 validation images downsampled to 32x32 (ODIN Sec. 4.2).",
        "ImageNet terms of access (non-commercial research)",
        hub_id="zh-plus/tiny-imagenet",
    ),
    _hub_source(
        "lsun-crop",
        HubDataset("lsun-crop", "detectors/lsun_c-ood", label_column=None, split_names={"test": "train"}),
        "LSUN (crop): 10,000 32x32 patches of LSUN test scenes, as built for ODIN.",
        "unknown (LSUN: research use)",
        hub_id="detectors/lsun_c-ood",
        provenance=_ODIN_OOD_PROVENANCE,
    ),
    _hub_source(
        "lsun-resize",
        HubDataset("lsun-resize", "detectors/lsun_r-ood", label_column=None, split_names={"test": "train"}),
        "LSUN (resize): 10,000 LSUN test scenes downsampled to 32x32, as built for ODIN.",
        "unknown (LSUN: research use)",
        hub_id="detectors/lsun_r-ood",
        provenance=_ODIN_OOD_PROVENANCE,
    ),
    _hub_source(
        "isun",
        HubDataset("isun", "detectors/isun-ood", label_column=None, split_names={"test": "train"}),
        "iSUN: all 8,925 images downsampled to 32x32, as built for ODIN.",
        "unknown (iSUN: research use)",
        hub_id="detectors/isun-ood",
        provenance=_ODIN_OOD_PROVENANCE,
    ),
    _hub_source(
        "textures",
        HubDataset("textures", "tanganke/dtd", label_column=None, split_names={"test": "train+test"}),
        "Describable Textures (DTD): its 5,640 texture photos (the hub's train and test splits).",
        "research use (DTD terms, Cimpoi et al. 2014)",
        hub_id="tanganke/dtd",
    ),
    _hub_source(
        "places365",
        HubDataset("places365", None, label_column=None),
        "Places365 validation scenes, from a local copy (no hub copy has been verified).",
        "research use (Places365 terms, Zhou et al. 2017)",
        hub_id=None,
        provenance="http://places2.csail.mit.edu (val_256.tar), loaded as an image folder",
    ),
)


def _far_ood(image_size: int, channels: int) -> dict[str, SourceRef]:
    noise = {"image_size": image_size, "channels": channels}
    return {
        "tin-crop": SourceRef("tin-crop"),
        "tin-resize": SourceRef("tin-resize"),
        "lsun-crop": SourceRef("lsun-crop"),
        "lsun-resize": SourceRef("lsun-resize"),
        "isun": SourceRef("isun"),
        "textures": SourceRef("textures"),
        "gaussian": SourceRef("gaussian", params=noise),
        "uniform": SourceRef("uniform", params=noise),
    }


def _labelled_as_ood(source: str) -> SourceRef:
    return SourceRef(source, "test", {"as_ood": True})


@hookimpl
def timm_ood_sources() -> list[SourceSpec]:
    """The hub sources."""
    return list(_SOURCES)


@hookimpl
def timm_ood_benchmarks() -> list[BenchmarkSpec]:
    """``cifar10``, ``cifar100`` and ``svhn`` (ODIN, IsoMax) and ``mnist`` (ODIN appendix A)."""
    cifar_ood = {"svhn": _labelled_as_ood("svhn"), **_far_ood(32, 3)}

    def benchmark(name: str, ood: dict[str, SourceRef], num_classes: int, description: str) -> BenchmarkSpec:
        return BenchmarkSpec(
            name,
            description,
            id_train=SourceRef(name, "train"),
            id_test=SourceRef(name, "test"),
            ood=ood,
            num_classes=num_classes,
            offline=False,
        )

    return [
        benchmark("cifar10", cifar_ood, 10, "CIFAR-10 against SVHN, TinyImageNet, LSUN, iSUN, Textures and noise."),
        benchmark("cifar100", cifar_ood, 100, "CIFAR-100 against SVHN, TinyImageNet, LSUN, iSUN, Textures and noise."),
        benchmark(
            "svhn",
            {"cifar10": _labelled_as_ood("cifar10"), **_far_ood(32, 3)},
            10,
            "SVHN against CIFAR-10, TinyImageNet, LSUN, iSUN, Textures and noise.",
        ),
        benchmark(
            "mnist",
            {
                "fashion-mnist": _labelled_as_ood("fashion-mnist"),
                "glyphs": SourceRef("glyphs"),
                "cifar10-grey": _labelled_as_ood("cifar10"),
                "gaussian": SourceRef("gaussian"),
                "uniform": SourceRef("uniform"),
            },
            10,
            "MNIST against Fashion-MNIST, notMNIST-like glyphs, CIFAR-10 in grey and noise.",
        ),
    ]
