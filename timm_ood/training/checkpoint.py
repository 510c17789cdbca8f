"""Model checkpoints in safetensors, with what it takes to recreate the model.

A checkpoint holds the state dict and string metadata: the timm architecture,
the ``timm.create_model`` keyword arguments (``num_classes``, ``in_chans``,
``img_size``...) and the ``pretrained_cfg`` data config the model was trained
with (input size, mean, std), so :func:`load_checkpoint` can rebuild the model
that :func:`timm_ood.data.make_loader` then feeds correctly. A classifier
replaced by :func:`~timm_ood.training.replace_head` (IsoMax) is recorded too
and put back before the weights are loaded. No pickle.
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = ["DATA_CONFIG_KEYS", "load_checkpoint", "read_checkpoint_metadata", "save_checkpoint"]

DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def _data_config_overlay(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {key: cfg[key] for key in DATA_CONFIG_KEYS if key in cfg}


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    create_kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save ``model``'s weights and how to recreate it.

    Args:
        model: a timm model.
        path: the ``.safetensors`` file to write.
        create_kwargs: the ``timm.create_model`` keyword arguments beyond the
            architecture (default: ``num_classes`` and ``in_chans`` read from the model).
        metadata: anything else to record (JSON-serialisable), e.g. training settings.
    """
    from ..model_info import input_channels
    from .heads import head_spec

    cfg = getattr(model, "pretrained_cfg", None) or {}
    kwargs = dict(create_kwargs or {})
    kwargs.setdefault("num_classes", int(getattr(model, "num_classes", 0) or 0))
    kwargs.setdefault("in_chans", input_channels(model))
    strings = {
        "timm_ood.architecture": str(cfg.get("architecture", "")),
        "timm_ood.create_kwargs": json.dumps(kwargs),
        "timm_ood.data_config": json.dumps(_data_config_overlay(model)),
        "timm_ood.metadata": json.dumps(metadata or {}),
    }
    head = head_spec(model)
    if head is not None:
        strings["timm_ood.head"] = json.dumps(head)
    save_model(model, os.fspath(path), metadata=strings)


#: what a checkpoint is, for the errors about files that are not one
_WHAT_A_CHECKPOINT_IS = (
    "a checkpoint is the .safetensors file `timm-ood train --out FILE` (or timm_ood.training.save_checkpoint) "
    "writes; for a plain timm state dict pass --model NAME --weights FILE (weights=FILE in Python)"
)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The architecture, create kwargs, data config, replaced head (or None) and extra metadata of a checkpoint.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a safetensors file (a ``.pth`` pickle, a
            folder, text...), or a safetensors file without timm-ood's metadata
            (a plain state dict); the message names the file and what a
            checkpoint is.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ValueError(f"{name!r} is a folder, not a checkpoint file; {_WHAT_A_CHECKPOINT_IS}")
    try:
        with safe_open(name, framework="pt") as handle:
            raw = handle.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors' SafetensorError ("header too large"...) and OS errors
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{name!r} is not a safetensors checkpoint ({reason}); {_WHAT_A_CHECKPOINT_IS}") from error
    if "timm_ood.architecture" not in raw:
        raise ValueError(f"{name!r} is a safetensors file without timm-ood's metadata (no 'timm_ood.architecture'), "
                         f"not a timm-ood checkpoint; {_WHAT_A_CHECKPOINT_IS}")
    return {
        "architecture": raw["timm_ood.architecture"],
        "create_kwargs": json.loads(raw.get("timm_ood.create_kwargs", "{}")),
        "data_config": json.loads(raw.get("timm_ood.data_config", "{}")),
        "metadata": json.loads(raw.get("timm_ood.metadata", "{}")),
        "head": json.loads(raw["timm_ood.head"]) if "timm_ood.head" in raw else None,
    }


def load_checkpoint(path: str | os.PathLike, model_name: str | None = None, **create_kwargs: Any) -> nn.Module:
    """Recreate the timm model saved by :func:`save_checkpoint` and load its weights (eval mode).

    A recorded replaced head (IsoMax) is installed before the weights are loaded.

    Args:
        path: the checkpoint.
        model_name: the timm architecture; default the one recorded in the file.
        **create_kwargs: override recorded ``timm.create_model`` arguments.

    Raises:
        ValueError: ``model_name`` differs from the recorded architecture, or
            the weights do not fit the model.
    """
    import timm

    info = read_checkpoint_metadata(path)
    recorded = info["architecture"]
    if model_name and recorded and model_name != recorded:
        raise ValueError(
            f"{os.fspath(path)!r} holds a {recorded!r} model, not {model_name!r}; pass --model {recorded}"
        )
    kwargs = {**info["create_kwargs"], **create_kwargs}
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in info["data_config"].items()}
    model = timm.create_model(model_name or recorded, pretrained_cfg_overlay=overlay, **kwargs)
    if info["head"] is not None:
        from .heads import replace_head

        replace_head(model, info["head"]["kind"], **info["head"]["options"])
    missing, unexpected = load_model(model, os.fspath(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the weights in {os.fspath(path)!r} do not fit {model_name or recorded} created with {kwargs}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval()
