"""Test configuration of the timm-ood-sklearn plugin."""

from __future__ import annotations

import os

import sklearn.covariance  # noqa: F401  (loads scipy's BLAS, so that the limit below reaches it)
import threadpoolctl
import torch


def pytest_configure(config) -> None:
    # pytest-xdist runs one worker per core: one thread each for torch and for the BLAS behind
    # numpy/scipy avoids oversubscription (OpenBLAS threads spin while they wait for a core)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        threadpoolctl.threadpool_limits(limits=1)
