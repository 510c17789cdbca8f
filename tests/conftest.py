"""Shared test configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def pytest_configure(config) -> None:
    # pytest-xdist runs one worker per core: one torch and one BLAS thread each avoid oversubscription
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)


# -- data tests (tests/data/test_*.py) ---------------------------------------
#: With ``TIMM_OOD_REQUIRE_DATA=1`` (as CI sets it) a test that needs absent data fails instead of skipping.
REQUIRE_DATA_ENV = "TIMM_OOD_REQUIRE_DATA"


def require_data(what: str, how_to_get_it: str) -> None:
    """Skip the calling test because ``what`` is absent, or fail under ``TIMM_OOD_REQUIRE_DATA=1``."""
    message = f"{what} is not available ({how_to_get_it})"
    if os.environ.get(REQUIRE_DATA_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_DATA_ENV}=1 makes missing data a failure", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh ``TIMM_OOD_CACHE_DIR`` for the session (one per xdist worker), not the user's cache."""
    path = tmp_path_factory.mktemp("timm_ood_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMM_OOD_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def data_fashion_mnist(data_cache_dir: Path) -> None:
    """Fashion-MNIST's IDX files are installed; skips (or fails, see ``require_data``) otherwise."""
    from timm_ood.data.fashion_mnist import find_idx_files

    if find_idx_files() is None:
        require_data("Fashion-MNIST", "apt-get install dataset-fashion-mnist, or set TIMM_OOD_DATA_DIR")


@pytest.fixture
def data_hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Hugging Face hub is unreachable at once (no retries) and ``datasets`` caches in ``tmp_path``."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # timm's weights and the Hub too
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
