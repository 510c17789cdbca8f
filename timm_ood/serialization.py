"""Fitted detector state in safetensors: tensors plus string metadata, never pickle.

A file holds the detector's buffers under their names, optional extra tensors
(the calibrated threshold of an ``OODModel``) under a ``__timm_ood__.`` prefix,
and metadata naming the detector and its hyperparameters (JSON). Loading
creates the detector by its registered name and installs the tensors: nothing
in the file is executed.

The metadata also holds the fingerprint of the model the detector was fitted
on (``timm_ood.model_fingerprint``, JSON; :mod:`timm_ood.fingerprint`), which
:meth:`timm_ood.OODModel.load_detector` compares with the model it loads into.
Files written before fingerprints existed lack it and load with a warning.
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
from .fingerprint import ModelFingerprint

__all__ = ["FINGERPRINT_METADATA", "load_detector", "save_detector"]

FORMAT_VERSION = "1"
_EXTRA_PREFIX = "__timm_ood__."
#: the metadata key of the fitted model's fingerprint (JSON)
FINGERPRINT_METADATA = "timm_ood.model_fingerprint"


def save_detector(
    detector: Detector,
    path: str | os.PathLike,
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write a detector's fitted state, hyperparameters and model fingerprint to a safetensors file."""
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in detector.fitted_state().items()}
    for name, t in (extra_tensors or {}).items():
        tensors[_EXTRA_PREFIX + name] = t.detach().cpu().clone().contiguous()
    metadata = {"timm_ood.format": FORMAT_VERSION, **detector.metadata(), **(extra_metadata or {})}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_detector(
    path: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[Detector, dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`save_detector`.

    This does not know the model the detector will score with:
    :meth:`timm_ood.OODModel.load_detector` checks it against the file's fingerprint.

    Returns:
        ``(detector, extra_tensors, metadata)``; the detector is created by its
        registered name with the saved hyperparameters and holds the saved state
        and the fingerprint of the model it was fitted on
        (``detector.model_fingerprint``, None for files without one).

    Raises:
        ValueError: the file is not a timm-ood detector file, or its fingerprint is malformed.
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
    if FINGERPRINT_METADATA in metadata:
        try:
            fingerprint = ModelFingerprint.from_json(metadata[FINGERPRINT_METADATA])
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)!r} holds a malformed model fingerprint: {error}") from error
        detector._set_fingerprint(fingerprint)
    return detector, extras, metadata
