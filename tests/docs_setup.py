"""What the documentation's snippets assume exists, made small and offline for ``tests/test_docs.py``.

A page's hidden setup (an HTML comment ``<!-- test-setup ... -->`` before a
snippet, invisible on the page) calls these: your image folders, a Hugging Face
cache holding a timm tag's weights (random ones: the snippets are checked for
running, not for accuracy), a small trained model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

from .data.test_arguments import write_folder

COMMIT = "0" * 40


def image_folders(root: str | Path = ".", side: int = 64) -> None:
    """``./train_folder``, ``./val_folder`` (two classes each) and ``./dtd`` (a flat folder) of random RGB images."""
    classes = ("n01440764", "n01443537")
    for folder, folder_classes in (("train_folder", classes), ("val_folder", classes), ("dtd", ())):
        write_folder(Path(root) / folder, (), folder_classes, 4, side)


def cached_pretrained(monkeypatch, cache: Path, *names: str) -> None:
    """A Hugging Face cache in which timm finds ``names``' weights offline (random weights of the right shapes)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for name in names:
        repo = timm.get_pretrained_cfg(name).hf_hub_id
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        snapshot = folder / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_file(timm.create_model(name.split(".")[0]).state_dict(), str(snapshot / "model.safetensors"))


def small_trained_model() -> torch.nn.Module:
    """The library's tiny stand-in reference model (``timm-ood demo --fast``): test_resnet trained on Fashion-MNIST."""
    from timm_ood.reference import FAST_RECIPE, reference_model

    return reference_model(FAST_RECIPE, progress=False)


def _pngs(count: int, side: int, seed: int) -> list[dict]:
    from timm_ood.data.images import encode_png

    pixels = np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    return [{"bytes": png, "path": None} for png in encode_png(pixels)]


def local_copies(root: str | Path = ".") -> None:
    """Small local copies with the hub schemas: ``./cifar10`` (split folders of class folders), CIFAR-100 and
    SVHN parquet files (``img``/``fine_label``, ``image``/``label``), ``./LSUN`` (a flat folder of images)."""
    import datasets

    root = Path(root)
    write_folder(root / "cifar10", ("train", "test"), ("airplane", "cat"), 3, 32)
    write_folder(root / "LSUN", (), (), 4, 32)
    cifar100 = datasets.Dataset.from_dict(
        {"img": _pngs(6, 32, 2), "fine_label": list(range(6)), "coarse_label": [0] * 6},
        features=datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64"),
                                    "coarse_label": datasets.Value("int64")}))
    (root / "cifar100").mkdir(exist_ok=True)
    cifar100.to_parquet(str(root / "cifar100" / "test.parquet"))
    svhn = datasets.Dataset.from_dict({"image": _pngs(6, 32, 3), "label": list(range(6))},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))
    (root / "svhn").mkdir(exist_ok=True)
    svhn.to_parquet(str(root / "svhn" / "test.parquet"))


def openood_root(monkeypatch, root: Path) -> None:
    """A small OpenOOD data root for ImageNet-1K (its lists and 224-px images), as ``TIMM_OOD_OPENOOD_DIR``."""
    from timm_ood.data.openood import OPENOOD_DIR_ENV

    from .data.test_openood import _IMAGENET_LISTS, _write_root

    _write_root(root, _IMAGENET_LISTS, 224)
    monkeypatch.setenv(OPENOOD_DIR_ENV, str(root))
