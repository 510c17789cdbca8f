"""Data for OOD evaluation: image sources, benchmarks, and loaders shaped for a timm model.

::

    from timm_ood import data
    data.list_sources()                                   # {name: SourceSpec}, .offline / .hub_id
    ds = data.load_source("fashion-mnist", split="test")  # datasets.Dataset: "image", "label"
    bench = data.load_benchmark("fashion-mnist")          # ID train/test, OOD sets, tuning holdouts
    loader = data.make_loader(bench.ood["natural-crop"], model, batch_size=256)

Sources and benchmarks are registered through the ``timm_ood_sources`` and
``timm_ood_benchmarks`` hooks, so plugins add their own the way they add detectors.
"""

from __future__ import annotations

from .arguments import DataArgument, load_data, parse_data_argument
from .benchmarks import (
    Benchmark,
    BenchmarkSpec,
    SourceRef,
    TuningSets,
    get_benchmark_spec,
    list_benchmarks,
    load_benchmark,
)
from .cache import CACHE_DIR_ENV
from .errors import (
    CorruptImageError,
    DataNotFoundError,
    EmptyDatasetError,
    HubAuthenticationError,
    HubUnavailableError,
)
from .fashion_mnist import DATA_DIR_ENV
from .loaders import ModelLoader, as_batches, make_loader
from .openood import OPENOOD_DIR_ENV
from .sources import SourceSpec, get_source, list_sources, load_source, model_overlay
from .transforms import ModelTransform

#: The built-in source and benchmark modules, registered as plugins in this order,
#: after the detectors (see :func:`timm_ood.registry.builtin_plugins`).
BUILTIN_PLUGINS: tuple[str, ...] = ("offline", "hub_benchmarks", "openood")

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "OPENOOD_DIR_ENV",
    "Benchmark",
    "BenchmarkSpec",
    "CorruptImageError",
    "DataArgument",
    "DataNotFoundError",
    "EmptyDatasetError",
    "HubAuthenticationError",
    "HubUnavailableError",
    "ModelLoader",
    "ModelTransform",
    "SourceRef",
    "SourceSpec",
    "TuningSets",
    "as_batches",
    "get_benchmark_spec",
    "get_source",
    "list_benchmarks",
    "list_sources",
    "load_benchmark",
    "load_data",
    "load_source",
    "make_loader",
    "model_overlay",
    "parse_data_argument",
]
