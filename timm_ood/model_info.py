"""What a timm model says about its own inputs.

The one place that reads a model's input contract (channels, size, normalisation)
from timm's own metadata: ``pretrained_cfg['first_conv']`` for the stem and
``timm.data.resolve_data_config`` for size and normalisation. The data
transforms and the detectors that perturb inputs (ODIN, Mahalanobis input
preprocessing) both read it here, so a perturbation's 1/std scale is always the
normalisation the images really went through.
"""

from __future__ import annotations

from typing import Any, Protocol, SupportsInt, cast

import torch
from torch import nn

from .errors import IncompatibleModelError

__all__ = ["TimmModel", "data_config", "input_channels", "normalisation", "timm_api"]


class TimmModel(Protocol):
    """The methods of timm's model contract that timm-ood calls (every timm model has them).

    ``nn.Module`` types its unknown attributes as tensors or submodules, so a
    type checker cannot see these methods on a model typed ``nn.Module``:
    :func:`timm_api` gives the model this type where the contract is checked or required.
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...

    def get_classifier(self) -> nn.Module | tuple[nn.Module, ...]: ...


def timm_api(model: nn.Module) -> TimmModel:
    """``model`` typed as a timm model (:class:`TimmModel`); a no-op at run time, nothing is checked."""
    return cast(TimmModel, model)


def _first_conv(model: nn.Module) -> nn.Module | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if isinstance(name, (list, tuple)):  # some models list several stems
        name = name[0] if name else None
    if name:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is not None and hasattr(module, "in_channels"):
            return module
    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d))), None)


def input_channels(model: nn.Module) -> int:
    """Number of input channels the model takes (``in_chans`` at creation).

    Read from the stem named by ``pretrained_cfg['first_conv']``, or the first
    convolution when the model does not name it.

    Raises:
        IncompatibleModelError: the model has no convolutional stem to read.
    """
    conv = _first_conv(model)
    if conv is None:
        raise IncompatibleModelError(
            f"cannot tell how many input channels {type(model).__name__} takes: it has no "
            "convolution and its pretrained_cfg names no 'first_conv'. Set "
            "model.pretrained_cfg['first_conv'] to the name of its stem layer."
        )
    return int(cast(SupportsInt, conv.in_channels))  # an int attribute, which nn.Module types as Tensor | Module


def _per_channel(values: tuple[float, ...], channels: int, what: str, model: nn.Module) -> tuple:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:  # a grey model with an RGB config: the average channel
        return (sum(values) / len(values),)
    if channels % len(values) == 0:
        return values * (channels // len(values))
    raise IncompatibleModelError(
        f"{type(model).__name__} takes {channels} input channels but its pretrained_cfg "
        f"{what} has {len(values)} values {values}; set pretrained_cfg['{what}'] to "
        f"{channels} values."
    )


def _fixed_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a patch-embedding model was built for (``timm.create_model(..., img_size=...)``).

    ViT-like models size their position embeddings for it (and take only that
    size unless created with ``dynamic_img_size=True``), but their
    ``pretrained_cfg`` keeps the size of the pretrained weights.
    """
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def data_config(model: nn.Module, **overrides: Any) -> dict[str, Any]:
    """``timm.data.resolve_data_config`` for this model, with its real channel count and input size.

    timm resolves ``input_size``, ``mean`` and ``std`` from ``pretrained_cfg``
    but assumes 3 channels and the pretrained resolution; a model created
    with ``in_chans=1`` or a ViT created with ``img_size=32`` gets a config
    whose ``input_size`` and normalisation match the model here.

    Args:
        model: a timm model (anything with ``pretrained_cfg``).
        **overrides: timm data-config arguments (``input_size``, ``mean``,
            ``std``, ``interpolation``, ``crop_pct``, ...), as for
            ``resolve_data_config(args=...)``.
    """
    from timm.data import resolve_data_config

    config = dict(resolve_data_config(args=dict(overrides), model=model))
    channels = int(overrides.get("input_size", (input_channels(model),))[0])
    size = tuple(config["input_size"])[1:]
    fixed = _fixed_image_size(model)
    if fixed is not None and "input_size" not in overrides and "img_size" not in overrides:
        size = fixed
    config["input_size"] = (channels, *size)
    config["mean"] = _per_channel(config["mean"], channels, "mean", model)
    config["std"] = _per_channel(config["std"], channels, "std", model)
    return config


def normalisation(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` the model's inputs are normalised with, as float32 [C]."""
    config = data_config(model)
    return (
        torch.tensor(config["mean"], dtype=torch.float32),
        torch.tensor(config["std"], dtype=torch.float32),
    )
