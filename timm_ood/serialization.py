"""Fitted detector state in safetensors: tensors plus string metadata, never pickle.

A file holds the detector's buffers under their names, optional extra tensors
(the calibrated threshold of an ``OODModel``) under a ``__timm_ood__.`` prefix,
and metadata naming the detector and its hyperparameters (JSON). Loading
creates the detector by its registered name and installs the tensors: nothing
in the file is executed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .detectors import create_detector
from .detectors.base import Detector

__all__ = ["load_detector", "save_detector"]

FORMAT_VERSION = "1"
_EXTRA_PREFIX = "__timm_ood__."


def save_detector(
    detector: Detector,
    path: str | os.PathLike,
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write a detector's fitted state and hyperparameters to a safetensors file."""
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in detector.fitted_state().items()}
    for name, t in (extra_tensors or {}).items():
        tensors[_EXTRA_PREFIX + name] = t.detach().cpu().clone().contiguous()
    metadata = {"timm_ood.format": FORMAT_VERSION, **detector.metadata(), **(extra_metadata or {})}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_detector(
    path: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[Detector, dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`save_detector`.

    Returns:
        ``(detector, extra_tensors, metadata)``; the detector is created by its
        registered name with the saved hyperparameters and holds the saved state.

    Raises:
        ValueError: the file is not a timm-ood detector file.
    """
    with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if "timm_ood.detector" not in metadata:
        raise ValueError(f"{os.fspath(path)!r} is not a timm-ood detector file (no 'timm_ood.detector' metadata)")
    hyperparameters: dict[str, Any] = json.loads(metadata.get("timm_ood.hyperparameters", "{}"))
    detector = create_detector(metadata["timm_ood.detector"], **hyperparameters)
    state = {k: v for k, v in tensors.items() if not k.startswith(_EXTRA_PREFIX)}
    extras = {k[len(_EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)}
    if state or metadata.get("timm_ood.fitted") == "1":
        detector.load_fitted_state(state, device=device)
    detector.is_fitted = metadata.get("timm_ood.fitted") == "1"
    return detector, extras, metadata
