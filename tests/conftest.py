"""Shared test configuration."""

from __future__ import annotations

import os

import torch


def pytest_configure(config) -> None:
    # pytest-xdist runs one worker per core: one torch thread each avoids oversubscription
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
