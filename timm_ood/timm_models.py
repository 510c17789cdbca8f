"""timm models by name: pretrained tags, ``hf_hub:`` ids and local weight files, with errors that say the fix.

:func:`create_timm_model` is ``timm.create_model`` with the failures a user
meets turned into one line each: an unknown architecture (the closest timm
names), a tag that does not exist (the tags that do), weights that are neither
cached nor reachable (how to get them, or how to pass a local file), a file
that is not a state dict. A local file goes through timm's own route,
``pretrained_cfg_overlay=dict(file=...)``, so the model keeps the data config
(input size, crop, mean, std, interpolation) of its pretrained tag, which
:func:`timm_ood.model_info.data_config` resolves with timm's
``resolve_data_config`` for every loader.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import UnknownModelError, WeightsUnavailableError

__all__ = ["HF_HUB_PREFIX", "close_model_names", "create_timm_model", "split_model_name"]

HF_HUB_PREFIX = "hf_hub:"
_OFFLINE_HINT = (
    "run once with network access (timm caches the weights under ~/.cache/huggingface), or pass a local copy of "
    "the weights: weights=FILE in Python, --weights FILE on the command line (a .safetensors or .pth state dict)"
)


def split_model_name(model_name: str) -> tuple[str, str | None]:
    """``"resnet50.a1_in1k"`` -> ``("resnet50", "a1_in1k")``; ``"resnet50"`` -> ``("resnet50", None)``."""
    architecture, _, tag = model_name.partition(".")
    return architecture, tag or None


def close_model_names(name: str, n: int = 3) -> list[str]:
    """The registered timm architectures (and pretrained names, for a name with a tag) closest to ``name``."""
    import timm

    architecture, tag = split_model_name(name)
    if tag is not None and timm.is_model(architecture):
        return difflib.get_close_matches(name, timm.list_pretrained(f"{architecture}.*"), n=n, cutoff=0.0)
    return difflib.get_close_matches(architecture, timm.list_models(), n=n, cutoff=0.6)


def _check_name(model_name: str, pretrained: bool) -> None:
    import timm

    if model_name.startswith(HF_HUB_PREFIX):
        return
    architecture, tag = split_model_name(model_name)
    if not timm.is_model(architecture):
        close = close_model_names(model_name)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"timm has no model {architecture!r}{hint} (timm.list_models('*{architecture[:4]}*') lists similar ones)"
        )
    if tag is not None and model_name not in timm.list_pretrained(f"{architecture}.*"):
        tags = timm.list_pretrained(f"{architecture}.*")
        close = difflib.get_close_matches(model_name, tags, n=3, cutoff=0.0)
        known = f"its pretrained tags: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''}" if tags else (
            "it has no pretrained weights in timm; create it without a tag and pass pretrained=False, or load your "
            "own weights with weights=FILE")
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UnknownModelError(f"timm has no pretrained tag {tag!r} for {architecture!r}: {hint}{known}")
    if pretrained and tag is None and not timm.list_pretrained(f"{architecture}.*"):
        raise UnknownModelError(
            f"timm has no pretrained weights for {architecture!r}: pass pretrained=False for random weights, or "
            "load your own with weights=FILE (--weights FILE)"
        )


def _is_missing_weights(error: BaseException) -> bool:
    """Whether ``error`` says the weights could not be fetched (offline, no cache, no network)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        if type(seen).__name__ in {"URLError", "ConnectTimeout", "ConnectError", "ReadTimeout"}:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def create_timm_model(
    model_name: str,
    *,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` for a name with or without a pretrained tag, or an ``hf_hub:`` id.

    Args:
        model_name: ``"resnet50"``, ``"resnet50.a1_in1k"`` or ``"hf_hub:timm/resnet50.a1_in1k"``.
        pretrained: load the tag's pretrained weights (downloaded once, then cached by timm).
        weights: a local ``.safetensors`` or ``.pth`` state dict of this architecture, loaded through
            timm's ``pretrained_cfg_overlay=dict(file=...)``: no network, and the model keeps the data
            config of its tag (implies ``pretrained=True``).
        **timm_kwargs: passed to ``timm.create_model`` (``num_classes``, ``in_chans``,
            ``pretrained_cfg_overlay``, ...).

    Returns:
        The model, in eval mode.

    Raises:
        UnknownModelError: no such architecture (the closest names are suggested), no such tag, or no
            pretrained weights for it.
        WeightsUnavailableError: the weights are not cached and the hub cannot be reached (offline).
        FileNotFoundError: ``weights`` does not exist.
        ValueError: ``weights`` is not a state dict timm can read, or its tensors do not fit the model.
    """
    import timm

    overlay = dict(timm_kwargs.pop("pretrained_cfg_overlay", None) or {})
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {os.fspath(weights)!r} not found")
        if model_name.startswith(HF_HUB_PREFIX):
            raise ValueError(
                f"weights= is given with {model_name!r}: an hf_hub: id reads its config from the hub; name the timm "
                f"model instead (e.g. {model_name[len(HF_HUB_PREFIX):].split('/')[-1]!r}) with weights=FILE"
            )
        overlay["file"] = os.fspath(path)
        pretrained = True
    _check_name(model_name, pretrained)
    if overlay:
        timm_kwargs["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **timm_kwargs)
    except Exception as error:
        if weights is not None and not _is_missing_weights(error):
            first = " ".join(str(error).split())[:240] or type(error).__name__
            if "size mismatch" in str(error) or "Missing key" in str(error) or "Unexpected key" in str(error):
                raise ValueError(
                    f"the weights in {os.fspath(weights)!r} do not fit {model_name}: {first}. Check that --model "
                    "names the architecture the file was saved from"
                ) from error
            raise ValueError(
                f"{os.fspath(weights)!r} is not a weights file timm can read ({first}); pass a .safetensors or "
                ".pth state dict of the model (safetensors.torch.save_file(model.state_dict(), path))"
            ) from error
        if pretrained and _is_missing_weights(error):
            raise WeightsUnavailableError(
                f"the pretrained weights of {model_name} are not in the local cache and the Hugging Face hub cannot "
                f"be reached: {_OFFLINE_HINT}. Set HF_HUB_OFFLINE=1 to fail at once instead of retrying"
            ) from error
        raise
    return model.eval()
