"""Small runtime helpers: where a model lives, and temporarily putting it in eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "model_device", "model_dtype"]


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next((b for b in module.buffers() if b is not None), None)
    return tensor


def model_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without any)."""
    tensor = _first_tensor(module)
    return tensor.device if tensor is not None else torch.device("cpu")


def model_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of the module's first floating parameter (float32 when none)."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode and restore each submodule's own mode afterwards.

    Scores and fitted statistics must not depend on the rest of the batch, so
    BatchNorm uses running statistics and dropout is off (ODIN pitfall 6).
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
