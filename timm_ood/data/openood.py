"""OpenOOD v1.5's four benchmarks: CIFAR-10, CIFAR-100, ImageNet-200 and ImageNet-1K.

A built-in plugin, registered through the same hooks as third-party ones
(Zhang et al. 2023, "OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution
Detection"). Each benchmark has OpenOOD's near-OOD and far-OOD groups, its ID
and OOD validation sets (tuning happens on them, never on test images) and,
where OpenOOD has them, its covariate-shifted ID sets for full-spectrum
detection. The sets are those of OpenOOD's evaluator
(``openood/evaluation_api/datasets.py``, ``DATA_INFO``).

Every set has two routes:

* **OpenOOD's own image lists** (exact): ``path=`` (or ``$TIMM_OOD_OPENOOD_DIR``)
  is an OpenOOD data root, the folder OpenOOD's download script fills, with
  ``benchmark_imglist/<benchmark>/<split>_<set>.txt`` and the images under
  ``images_classic/`` and ``images_largescale/``. The list selects exactly
  OpenOOD's images, including its removals of images that overlap the ID
  classes (e.g. TinyImageNet for CIFAR, Places365).
* **A hub copy** where one has been verified (see ``docs/openood.md``), loaded
  through :class:`~timm_ood.data.hub.HubDataset`; ``path=`` to a folder that
  is not an OpenOOD root is a local mirror of that hub dataset (an image
  folder, parquet files, or a ``save_to_disk`` folder). A hub copy is the
  whole set, so it cannot pick out OpenOOD's validation lists; a benchmark
  then falls back to holding out tuning images, with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..hookspecs import hookimpl
from .benchmarks import BenchmarkSpec, SourceRef
from .errors import DataNotFoundError
from .hub import HubDataset
from .sources import SourceSpec

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

__all__ = [
    "OPENOOD_DIR_ENV",
    "OpenOODImageList",
    "is_openood_root",
    "read_image_list",
    "timm_ood_benchmarks",
    "timm_ood_sources",
]

#: an OpenOOD data root (``benchmark_imglist/``, ``images_classic/``, ``images_largescale/``)
OPENOOD_DIR_ENV = "TIMM_OOD_OPENOOD_DIR"
_IMAGE_LISTS = "benchmark_imglist"
_CLASSIC: Literal["images_classic"] = "images_classic"
_LARGESCALE: Literal["images_largescale"] = "images_largescale"
_IMAGENET_OVERLAY = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
}
_CIFAR10_OVERLAY = {"input_size": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465),
                    "std": (0.2470, 0.2435, 0.2616), "crop_pct": 1.0}
_CIFAR100_OVERLAY = {"input_size": (3, 32, 32), "mean": (0.5071, 0.4865, 0.4409),
                     "std": (0.2673, 0.2564, 0.2762), "crop_pct": 1.0}
_OPENOOD = "OpenOOD v1.5 (Zhang et al. 2023)"


def is_openood_root(path: str | os.PathLike) -> bool:
    """True when ``path`` is an OpenOOD data root (it holds ``benchmark_imglist/``)."""
    return (Path(path) / _IMAGE_LISTS).is_dir()


def read_image_list(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read an OpenOOD image list: one ``<relative path> <label>`` per line.

    OpenOOD's ``ImglistDataset`` splits each line at its first space; the rest
    is an integer label, or a dict of extras (label 0 then). Blank lines are skipped.

    Args:
        path: the ``.txt`` list.

    Returns:
        The relative image paths and their labels (int64).

    Raises:
        ValueError: a line has no label, or an absolute image path.
    """
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    parts = [line.strip().split(" ", 1) for line in lines]
    bad = [i for i, p in enumerate(parts) if len(p) != 2 or p[0].startswith("/")]
    if bad:
        raise ValueError(
            f"{path}, line {bad[0] + 1}: {lines[bad[0]]!r} is not '<relative path> <label>' (OpenOOD's list format)"
        )
    labels = np.array([int(p[1]) if p[1].strip().lstrip("-").isdigit() else 0 for p in parts], dtype=np.int64)
    return [p[0] for p in parts], labels


def _openood_root(path: str | os.PathLike | None) -> Path | None:
    if path is not None:
        return Path(path) if is_openood_root(path) else None
    env = os.environ.get(OPENOOD_DIR_ENV)
    return Path(env) if env and is_openood_root(env) else None


@dataclass(frozen=True)
class OpenOODImageList:
    """One OpenOOD set: its image lists against an OpenOOD data root, or its hub copy.

    Attributes:
        source: the source name, for messages.
        folder: OpenOOD's folder of the images (``tin``, ``ssb_hard``, ...).
        data_dir: ``images_classic`` or ``images_largescale``: the folder
            under the root that the list's paths are relative to.
        lists: OpenOOD's lists that select from this folder (for messages).
        hub: the hub copy (``hub_id`` None: none verified); also reads local mirrors.
        hub_splits: the splits the hub copy serves; OpenOOD's validation lists
            pick images a whole hub copy cannot.
        ood_only: every image is OOD (label -1) whatever the list says.
    """

    source: str
    folder: str
    data_dir: Literal["images_classic", "images_largescale"]
    lists: tuple[str, ...]
    hub: HubDataset
    hub_splits: tuple[str, ...] = ("test",)
    ood_only: bool = True

    def __call__(
        self,
        split: str,
        *,
        imglist: str | None = None,
        path: str | os.PathLike | None = None,
        data_files: Any = None,
        streaming: bool = False,
        as_ood: bool = False,
    ) -> Dataset | IterableDataset:
        """Load ``split`` as ``image`` / ``label`` (-1 for OOD sets).

        Args:
            split: ``train``, ``val`` or ``test``.
            imglist: the OpenOOD list, relative to the data root
                (``benchmark_imglist/cifar10/test_tin.txt``) or absolute;
                used when an OpenOOD root is given.
            path: an OpenOOD data root (the lists' route), or a local mirror of
                the hub copy; default ``$TIMM_OOD_OPENOOD_DIR``, then the hub.
            data_files: with a mirror ``path``, as ``datasets.load_dataset``.
            streaming: return an ``IterableDataset``.
            as_ood: label every image -1 (an ID set used as OOD, e.g. CIFAR-100 for CIFAR-10).

        Raises:
            DataNotFoundError: no OpenOOD root or list, and no hub route for this split.
            HubUnavailableError: the hub copy cannot be reached.
        """
        as_ood = as_ood or self.ood_only
        root = _openood_root(path)
        if root is not None and imglist is not None:
            dataset = self._from_list(root, imglist, as_ood)
            return dataset.to_iterable_dataset() if streaming else dataset
        if path is not None and root is None:
            return self.hub(split, path=path, data_files=data_files, streaming=streaming, as_ood=as_ood)
        if self.hub.hub_id is None or split not in self.hub_splits:
            raise DataNotFoundError(self._missing(split, root, imglist))
        return self.hub(split, streaming=streaming, as_ood=as_ood)

    def _missing(self, split: str, root: Path | None, imglist: str | None) -> str:
        where = (
            f"no image list was named (one of: {', '.join(self.lists)})"
            if root is not None and imglist is None
            else f"give path= (or ${OPENOOD_DIR_ENV}) an OpenOOD data root holding {_IMAGE_LISTS}/ and "
            f"{self.data_dir}/{self.folder}/ (OpenOOD's scripts/download/download.py fills it)"
        )
        route = (
            "it has no verified hub copy" if self.hub.hub_id is None
            else f"its hub copy {self.hub.hub_id!r} serves only {', '.join(self.hub_splits)}"
        )
        return f"source {self.source!r}, split {split!r}: {route}; {where}"

    def _from_list(self, root: Path, imglist: str, as_ood: bool) -> Dataset:
        from datasets import Dataset, Features, Image, Value

        list_path = Path(imglist) if Path(imglist).is_absolute() else root / imglist
        if not list_path.is_file():
            raise DataNotFoundError(
                f"source {self.source!r}: OpenOOD image list {list_path} is missing; download OpenOOD's "
                f"{_IMAGE_LISTS} into {root}"
            )
        relative, labels = read_image_list(list_path)
        images = root / self.data_dir
        if relative and not (images / relative[0]).is_file():
            raise DataNotFoundError(
                f"source {self.source!r}: {images / relative[0]} (first image of {list_path.name}) is missing; "
                f"OpenOOD's {self.folder!r} images belong under {images}"
            )
        if as_ood:
            labels = np.full(len(relative), -1, dtype=np.int64)
        features = Features({"image": Image(), "label": Value("int64")})
        return Dataset.from_dict(
            {"image": [str(images / r) for r in relative], "label": labels}, features=features
        )


@dataclass(frozen=True)
class _Set:
    name: str
    folder: str
    data_dir: Literal["images_classic", "images_largescale"]
    description: str
    provenance: str
    licence: str
    hub: HubDataset | None = None
    hub_splits: tuple[str, ...] = ("test",)
    hub_note: str = ""
    splits: tuple[str, ...] = ("test",)
    num_classes: int | None = None
    overlay: Mapping[str, Any] | None = None
    lists: tuple[str, ...] = field(default_factory=tuple)


def _lists(*names: str) -> tuple[str, ...]:
    return tuple(f"{_IMAGE_LISTS}/{n}.txt" for n in names)


_SETS = (
    _Set("openood-cifar10", "cifar10", _CLASSIC,
         "CIFAR-10 as OpenOOD lists it: ID train / val / test for openood-cifar10, near-OOD for openood-cifar100.",
         "Krizhevsky 2009; OpenOOD's images_classic/cifar10", "no licence stated (research use)",
         HubDataset("openood-cifar10", "uoft-cs/cifar10", image_column="img"), ("train", "test"),
         "the hub's whole train / test split", ("train", "val", "test"), 10, _CIFAR10_OVERLAY,
         _lists("cifar10/train_cifar10", "cifar10/val_cifar10", "cifar10/test_cifar10", "cifar100/test_cifar10")),
    _Set("openood-cifar100", "cifar100", _CLASSIC,
         "CIFAR-100 as OpenOOD lists it: ID for openood-cifar100, near-OOD for openood-cifar10.",
         "Krizhevsky 2009; OpenOOD's images_classic/cifar100", "no licence stated (research use)",
         HubDataset("openood-cifar100", "uoft-cs/cifar100", image_column="img", label_column="fine_label"),
         ("train", "test"), "the hub's whole train / test split", ("train", "val", "test"), 100, _CIFAR100_OVERLAY,
         _lists("cifar100/train_cifar100", "cifar100/val_cifar100", "cifar100/test_cifar100",
                "cifar10/test_cifar100")),
    _Set("openood-tin", "tin", _CLASSIC,
         "TinyImageNet as OpenOOD lists it for CIFAR: near-OOD test images and the OOD validation set, with the "
         "images of classes that overlap CIFAR removed.",
         "Le & Yang 2015 (ImageNet subset); OpenOOD's images_classic/tin and its lists",
         "ImageNet terms of access (non-commercial research)",
         splits=("val", "test"),
         lists=_lists("cifar10/val_tin", "cifar10/test_tin", "cifar100/val_tin", "cifar100/test_tin")),
    _Set("openood-mnist", "mnist", _CLASSIC, "MNIST as OpenOOD lists it: far-OOD for CIFAR.",
         "LeCun, Cortes & Burges; OpenOOD's images_classic/mnist", "CC BY-SA 3.0 (MNIST site)",
         HubDataset("openood-mnist", "ylecun/mnist", label_column=None), hub_note="the hub's 10,000 test images",
         lists=_lists("cifar10/test_mnist", "cifar100/test_mnist")),
    _Set("openood-svhn", "svhn", _CLASSIC, "SVHN as OpenOOD lists it: far-OOD for CIFAR.",
         "Netzer et al. 2011; OpenOOD's images_classic/svhn", "non-commercial use only (SVHN terms)",
         HubDataset("openood-svhn", "ufldl-stanford/svhn", config="cropped_digits", label_column=None),
         hub_note="the hub's 26,032 test images", lists=_lists("cifar10/test_svhn", "cifar100/test_svhn")),
    _Set("openood-texture", "texture", _CLASSIC,
         "Describable Textures as OpenOOD lists it: far-OOD for every OpenOOD benchmark.",
         "Cimpoi et al. 2014 (DTD); OpenOOD's images_classic/texture", "research use (DTD terms)",
         HubDataset("openood-texture", "tanganke/dtd", label_column=None, split_names={"test": "train+test"}),
         hub_note="all 5,640 DTD images (the hub's train and test splits)",
         lists=_lists("cifar10/test_texture", "cifar100/test_texture", "imagenet200/test_textures",
                      "imagenet/test_textures")),
    _Set("openood-places365", "places365", _CLASSIC,
         "Places365 as OpenOOD lists it for CIFAR: far-OOD, scenes of classes that overlap CIFAR removed.",
         "Zhou et al. 2017; OpenOOD's images_classic/places365 and its lists", "research use (Places365 terms)",
         lists=_lists("cifar10/test_places365", "cifar100/test_places365")),
    _Set("openood-cifar10-c", "cifar10c", _CLASSIC,
         "CIFAR-10-C as OpenOOD lists it: covariate-shifted CIFAR-10 test images (full-spectrum), labels 0-9.",
         "Hendrycks & Dietterich 2019; OpenOOD's images_classic/cifar10c", "research use (see its authors' release)",
         num_classes=10, lists=_lists("cifar10/test_cifar10c")),
    _Set("openood-imagenet", "imagenet_1k", _LARGESCALE,
         "ImageNet-1K as OpenOOD lists it: ID train / val / test of openood-imagenet1k (val and test from the "
         "ILSVRC-2012 validation images).",
         "ILSVRC-2012 (Russakovsky et al. 2015); OpenOOD's images_largescale/imagenet_1k",
         "ImageNet terms of access (non-commercial research and education)",
         HubDataset("openood-imagenet", "ILSVRC/imagenet-1k", split_names={"test": "validation"}),
         ("train", "test"), "the hub's train split, and its 50,000 validation images as test (gated: log in)",
         ("train", "val", "test"), 1000, _IMAGENET_OVERLAY,
         _lists("imagenet/train_imagenet", "imagenet/val_imagenet", "imagenet/test_imagenet")),
    _Set("openood-imagenet200", "imagenet_1k", _LARGESCALE,
         "ImageNet-200 (OpenOOD's 200-class subset of ImageNet-1K, relabelled 0-199): ID of openood-imagenet200.",
         "ILSVRC-2012; OpenOOD's lists over images_largescale/imagenet_1k", "ImageNet terms of access",
         splits=("train", "val", "test"), num_classes=200, overlay=_IMAGENET_OVERLAY,
         lists=_lists("imagenet200/train_imagenet200", "imagenet200/val_imagenet200",
                      "imagenet200/test_imagenet200")),
    _Set("openood-ssb-hard", "ssb_hard", _LARGESCALE,
         "SSB-hard: ImageNet-21K classes semantically close to ImageNet-1K (near-OOD for ImageNet).",
         "Vaze et al. 2022 (Semantic Shift Benchmark); OpenOOD's images_largescale/ssb_hard",
         "ImageNet terms of access (ImageNet-21K images)",
         HubDataset("openood-ssb-hard", "XuZhan1/SSB_hard", label_column=None, split_names={"test": "all"}),
         hub_note="every split of the hub copy, whose card says it is derived from OpenOOD's split (size not checked)",
         lists=_lists("imagenet200/test_ssb_hard", "imagenet/test_ssb_hard")),
    _Set("openood-ninco", "ninco", _LARGESCALE,
         "NINCO: 64 OOD classes, every image checked to hold no ImageNet-1K object (near-OOD for ImageNet).",
         "Bitterwolf, Mueller & Hein 2023 (zenodo.org/record/8013288); OpenOOD's images_largescale/ninco",
         "MIT (NINCO release); images from their original sources",
         lists=_lists("imagenet200/test_ninco", "imagenet/test_ninco")),
    _Set("openood-inaturalist", "inaturalist", _LARGESCALE,
         "iNaturalist OOD subset: plant images of classes not in ImageNet-1K (far-OOD for ImageNet).",
         "Huang & Li 2021 (MOS) subset of iNaturalist 2017; OpenOOD's images_largescale/inaturalist",
         "research use (iNaturalist images under their photographers' licences)",
         HubDataset("openood-inaturalist", "torch-uncertainty/inaturalist", label_column=None,
                    split_names={"test": "all"}),
         hub_note="every split of the TorchUncertainty copy (10,000 rows in the hub viewer)",
         lists=_lists("imagenet200/test_inaturalist", "imagenet/test_inaturalist")),
    _Set("openood-openimage-o", "openimage_o", _LARGESCALE,
         "OpenImage-O: Open Images test images filtered to hold no ImageNet-1K class (far-OOD; its OpenOOD "
         "validation list is the ImageNet OOD validation set).",
         "Wang et al. 2022 (ViM) from Open Images V3; OpenOOD's images_largescale/openimage_o",
         "Open Images: images CC BY 2.0 (as listed by Open Images)",
         HubDataset("openood-openimage-o", "XuZhan1/Openimage-O", label_column=None, split_names={"test": "all"}),
         hub_note="every split of the hub copy, whose card says it is derived from OpenOOD's split (size not checked)",
         splits=("val", "test"),
         lists=_lists("imagenet200/val_openimage_o", "imagenet200/test_openimage_o", "imagenet/val_openimage_o",
                      "imagenet/test_openimage_o")),
    *(
        _Set(f"openood-imagenet-{short}", f"imagenet_{short}", _LARGESCALE,
             f"{title} as OpenOOD lists it: covariate-shifted ImageNet test images (full-spectrum), ID labels.",
             f"{origin}; OpenOOD's images_largescale/imagenet_{short}", licence,
             num_classes=1000, lists=_lists(*lists))
        for short, title, origin, licence, lists in (
            ("v2", "ImageNet-V2", "Recht et al. 2019", "research use (ImageNet-V2 release)",
             ("imagenet200/test_imagenet200_v2", "imagenet/test_imagenet_v2")),
            ("c", "ImageNet-C", "Hendrycks & Dietterich 2019", "research use (see its authors' release)",
             ("imagenet200/test_imagenet200_c", "imagenet/test_imagenet_c")),
            ("r", "ImageNet-R", "Hendrycks et al. 2021", "research use (see its authors' release)",
             ("imagenet200/test_imagenet200_r", "imagenet/test_imagenet_r")),
            ("es", "ImageNet-ES", "Baek et al. 2024", "research use (see its authors' release)",
             ("imagenet/test_imagenet_es",)),
        )
    ),
)


def _source(s: _Set) -> SourceSpec:
    hub = s.hub or HubDataset(s.name, None, label_column="label" if s.num_classes else None)
    where = f"hub {hub.hub_id!r}: {s.hub_note}" if hub.hub_id else "no verified hub copy (local copy only)"
    loader = OpenOODImageList(s.name, s.folder, s.data_dir, s.lists, hub,
                              s.hub_splits if hub.hub_id else (), ood_only=s.num_classes is None)
    return SourceSpec(
        s.name, loader, s.description,
        f"{s.provenance}; exact route: OpenOOD's lists ({', '.join(s.lists)}) under an OpenOOD data root; {where}",
        s.licence, splits=s.splits, offline=False, num_classes=s.num_classes, hub_id=hub.hub_id,
        model_overlay=s.overlay,
    )


_IMAGENET_1K = SourceSpec(
    "imagenet-1k",
    HubDataset("imagenet-1k", "ILSVRC/imagenet-1k", split_names={"test": "validation"}),
    "ImageNet-1K (ILSVRC-2012): 1,281,167 train / 50,000 validation ('test' here) images, 1,000 classes. Gated: "
    "accept the terms on the dataset's hub page, then `hf auth login` (or set HF_TOKEN).",
    "Russakovsky et al. 2015; Hugging Face hub 'ILSVRC/imagenet-1k' (the hub's unlabelled test split is not used)",
    "ImageNet terms of access (non-commercial research and education)",
    splits=("train", "test"),
    offline=False,
    num_classes=1000,
    hub_id="ILSVRC/imagenet-1k",
    model_overlay=_IMAGENET_OVERLAY,
)


def _ref(source: str, split: str, imglist: str, *, as_ood: bool = False) -> SourceRef:
    params: dict[str, Any] = {"imglist": f"{_IMAGE_LISTS}/{imglist}.txt"}
    if as_ood:
        params["as_ood"] = True
    return SourceRef(source, split, params)


def _benchmark(
    name: str,
    lists: str,
    id_source: str,
    num_classes: int,
    near: dict[str, SourceRef],
    far: dict[str, SourceRef],
    validation: dict[str, SourceRef],
    full_spectrum: dict[str, SourceRef],
    description: str,
) -> BenchmarkSpec:
    return BenchmarkSpec(
        name,
        description,
        id_train=_ref(id_source, "train", f"{lists}/train_{lists}"),
        id_test=_ref(id_source, "test", f"{lists}/test_{lists}"),
        ood={**near, **far},
        num_classes=num_classes,
        offline=False,
        groups={"near": tuple(near), "far": tuple(far)},
        validation_id=_ref(id_source, "val", f"{lists}/val_{lists}"),
        validation_ood=validation,
        full_spectrum=full_spectrum,
    )


_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _cifar(name: str, other: str, num_classes: int, full_spectrum: dict[str, SourceRef]) -> BenchmarkSpec:
    return _benchmark(
        f"openood-{name}", name, f"openood-{name}", num_classes,
        near={other: _ref(f"openood-{other}", "test", f"{name}/test_{other}", as_ood=True),
              "tin": _ref("openood-tin", "test", f"{name}/test_tin")},
        far={"mnist": _ref("openood-mnist", "test", f"{name}/test_mnist"),
             "svhn": _ref("openood-svhn", "test", f"{name}/test_svhn"),
             "texture": _ref("openood-texture", "test", f"{name}/test_texture"),
             "places365": _ref("openood-places365", "test", f"{name}/test_places365")},
        validation={"tin-val": _ref("openood-tin", "val", f"{name}/val_tin")},
        full_spectrum=full_spectrum,
        description=f"OpenOOD v1.5 {_TITLES[name]}: near {_TITLES[other]} and TIN; far MNIST, SVHN, Textures, "
                    "Places365; tuned on OpenOOD's TIN validation split.",
    )


def _imagenet(name: str, lists: str, id_source: str, num_classes: int, shifted: tuple[str, ...]) -> BenchmarkSpec:
    stem = "imagenet" if lists == "imagenet" else "imagenet200"
    return _benchmark(
        name, lists, id_source, num_classes,
        near={"ssb-hard": _ref("openood-ssb-hard", "test", f"{lists}/test_ssb_hard"),
              "ninco": _ref("openood-ninco", "test", f"{lists}/test_ninco")},
        far={"inaturalist": _ref("openood-inaturalist", "test", f"{lists}/test_inaturalist"),
             "textures": _ref("openood-texture", "test", f"{lists}/test_textures"),
             "openimage-o": _ref("openood-openimage-o", "test", f"{lists}/test_openimage_o")},
        validation={"openimage-o-val": _ref("openood-openimage-o", "val", f"{lists}/val_openimage_o")},
        full_spectrum={f"imagenet-{s}": _ref(f"openood-imagenet-{s}", "test", f"{lists}/test_{stem}_{s}")
                       for s in shifted},
        description=f"OpenOOD v1.5 {'ImageNet-1K' if num_classes == 1000 else 'ImageNet-200'}: near SSB-hard and "
                    "NINCO; far iNaturalist, Textures, OpenImage-O; tuned on OpenOOD's OpenImage-O validation split.",
    )


@hookimpl
def timm_ood_sources() -> list[SourceSpec]:
    """``imagenet-1k`` and every OpenOOD v1.5 set (``openood-*``)."""
    return [_IMAGENET_1K, *(_source(s) for s in _SETS)]


@hookimpl
def timm_ood_benchmarks() -> list[BenchmarkSpec]:
    """``openood-cifar10``, ``openood-cifar100``, ``openood-imagenet200`` and ``openood-imagenet1k``."""
    cifar10c = {"cifar10-c": _ref("openood-cifar10-c", "test", "cifar10/test_cifar10c")}
    return [
        _cifar("cifar10", "cifar100", 10, cifar10c),
        _cifar("cifar100", "cifar10", 100, {}),
        _imagenet("openood-imagenet200", "imagenet200", "openood-imagenet200", 200, ("v2", "c", "r")),
        _imagenet("openood-imagenet1k", "imagenet", "openood-imagenet", 1000, ("v2", "c", "r", "es")),
    ]
