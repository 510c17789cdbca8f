"""The tap: one forward of a timm model, computing only what detectors need.

::

    images ─► forward_features(x)              features   (maps [B,C,H,W] or tokens [B,N,D])
           ─► forward_head(f, pre_logits=True)  pre_logits [B,D]
           ─► get_classifier()(pre_logits)      logits     [B,K]
           [─► forward_intermediates(x)         intermediates, when asked]

Everything goes through timm's public model contract, so CNNs and ViTs work the
same way. The head is inspected once per model (:class:`HeadInfo`):

- ``"linear"``: ``get_classifier()`` is one ``nn.Linear`` and
  ``classifier(pre_logits)`` equals ``forward_head(features)``; the first
  forward checks that equality and, if it fails, the head is treated as
  ``"other"`` from then on. Detectors may read the weight and bias.
- ``"distilled"``: two heads (DeiT-distilled). Logits are what timm returns at
  inference, the mean of both heads; there is no single weight, so detectors that
  need one (ReAct, ViM, ...) refuse the model with a clear error.
- ``"other"``: a classifier that is not a single linear layer (or fails the
  check above). Logits come from ``forward_head``; no weight.
- ``"none"``: ``num_classes=0``; no logits. Feature detectors still work.
- ``"opaque"``: a plain ``nn.Module`` without timm's contract; only ``model(x)``
  as logits.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IncompatibleModelError
from .model_info import input_channels, normalisation, timm_api

__all__ = ["HeadInfo", "Need", "Outputs", "Tap", "fixed_input_size", "no_classifier_error"]


class Need(str, enum.Enum):
    """What a detector reads from the tap's forward pass."""

    LOGITS = "logits"
    PRE_LOGITS = "pre_logits"
    FEATURES = "features"
    INTERMEDIATES = "intermediates"


@dataclass(frozen=True)
class HeadInfo:
    """What a model's head looks like, inspected once per model."""

    kind: str  # "linear" | "distilled" | "other" | "none" | "opaque"
    num_classes: int
    num_features: int | None

    @property
    def has_logits(self) -> bool:
        return self.kind != "none"

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"


def no_classifier_error(who: str) -> IncompatibleModelError:
    """The one error for anything that reads the classifier of a model created with ``num_classes=0``."""
    return IncompatibleModelError(
        f"{who} needs the model's classifier (its logits), but the model has no classifier "
        "(num_classes=0). Create it with num_classes=<classes> (or model.reset_classifier(<classes>)), "
        "or use a feature detector such as 'mahalanobis'."
    )


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The ``(height, width)`` a model only accepts, or None when it takes other sizes.

    Read from timm's patch embedding (``model.patch_embed``, TNT's
    ``model.pixel_embed``): an ``img_size`` with ``strict_img_size`` on, and
    ``dynamic_img_size`` off on the model. A single module is inspected; a
    list of embeddings (CrossViT rescales its inputs itself) is skipped.
    """
    if getattr(model, "dynamic_img_size", False):
        return None
    for attribute in ("patch_embed", "pixel_embed"):
        embed = getattr(model, attribute, None)
        if not isinstance(embed, nn.Module):
            continue
        size = getattr(embed, "img_size", None)
        if size is None or not getattr(embed, "strict_img_size", True):
            return None
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(size[0]), int(size[1])) if len(size) == 2 else None
    return None


def _has_timm_contract(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier"))


def inspect_head(model: nn.Module) -> HeadInfo:
    """Classify the model's head (see the module docstring)."""
    if not _has_timm_contract(model):
        return HeadInfo("opaque", int(getattr(model, "num_classes", 0) or 0), None)
    num_features = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    num_features = int(num_features) if num_features else None
    classifier = timm_api(model).get_classifier()
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if isinstance(classifier, (tuple, list)):
        return HeadInfo("distilled", num_classes, num_features)
    if num_classes == 0 or isinstance(classifier, nn.Identity):
        return HeadInfo("none", 0, num_features)
    if isinstance(classifier, nn.Linear):
        return HeadInfo("linear", classifier.out_features, classifier.in_features)
    return HeadInfo("other", num_classes, num_features)


class Outputs:
    """What one forward of the tap produced for a batch.

    Attributes that were not computed raise an error naming the missing
    :class:`Need`, so a detector that forgot to declare a need fails loudly
    instead of reading ``None``.
    """

    __slots__ = ("_features", "_inputs", "_intermediates", "_logits", "_pre_logits", "tap")

    def __init__(
        self,
        inputs: torch.Tensor | None,
        tap: Tap,
        *,
        logits: torch.Tensor | None = None,
        pre_logits: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        intermediates: list[torch.Tensor] | None = None,
    ) -> None:
        self._inputs = inputs
        self.tap = tap
        self._logits = logits
        self._pre_logits = pre_logits
        self._features = features
        self._intermediates = intermediates

    def _get(self, need: Need) -> torch.Tensor | list[torch.Tensor]:
        value = getattr(self, f"_{need.value}")
        if value is None:
            raise RuntimeError(
                f"the tap did not compute {need.value!r} for this batch: a detector that reads "
                f"it must list Need.{need.name} in its requirements"
            )
        return value

    @property
    def inputs(self) -> torch.Tensor:
        """The images of the batch; absent when the outputs come from the feature store (:mod:`timm_ood.store`)."""
        if self._inputs is None:
            raise RuntimeError(
                "the images of this batch are not available: its outputs were read from the feature store. A "
                "detector that reads the images (runs its own passes) must declare input_gradients=True, and the "
                "driver then runs the model on them"
            )
        return self._inputs

    @property
    def logits(self) -> torch.Tensor:
        return self._get(Need.LOGITS)  # type: ignore[return-value]

    @property
    def pre_logits(self) -> torch.Tensor:
        return self._get(Need.PRE_LOGITS)  # type: ignore[return-value]

    @property
    def features(self) -> torch.Tensor:
        return self._get(Need.FEATURES)  # type: ignore[return-value]

    @property
    def intermediates(self) -> list[torch.Tensor]:
        return self._get(Need.INTERMEDIATES)  # type: ignore[return-value]

    @property
    def batch_size(self) -> int:
        if self._inputs is not None:
            return self._inputs.shape[0]
        present = (self._logits, self._pre_logits, self._features,
                   None if not self._intermediates else self._intermediates[0])
        return next(t.shape[0] for t in present if t is not None)

    def __len__(self) -> int:
        return self.batch_size

    def slice(self, index: slice | torch.Tensor) -> Outputs:
        """The outputs of a subset of the batch (used to split or filter batches)."""
        def take(t):
            return None if t is None else t[index]

        return Outputs(
            take(self._inputs),
            self.tap,
            logits=take(self._logits),
            pre_logits=take(self._pre_logits),
            features=take(self._features),
            intermediates=None if self._intermediates is None else [t[index] for t in self._intermediates],
        )


class Tap:
    """One forward pass of a timm model that returns the requested :class:`Outputs`.

    The tap never changes the model's mode, device or dtype; callers put the
    model in ``eval()`` first (``OODModel`` does). Detectors that run their own
    passes (ODIN's input gradient) call :meth:`logits`, :meth:`features`,
    :meth:`head` and :meth:`classify` to reuse the same path.

    Args:
        model: a timm model, or any ``nn.Module`` returning logits (then only
            ``Need.LOGITS`` is available).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head_info = inspect_head(model)
        self._linear_checked = False
        self._input_channels: int | bool | None = False  # False = not read yet
        self._input_std: torch.Tensor | None = None

    # -- static facts about the model --------------------------------------
    @property
    def input_channels(self) -> int | None:
        """Input channels of the model's stem, or None when it cannot be read."""
        if self._input_channels is False:
            try:
                self._input_channels = input_channels(self.model)
            except IncompatibleModelError:
                self._input_channels = None
        return self._input_channels

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The ``(height, width)`` the model requires (ViTs with a strict size), or None (see :func:`fixed_input_size`).

        Read on every call: ``model.set_input_size(...)`` may change it.
        """
        return fixed_input_size(self.model)

    def input_std(self, like: torch.Tensor) -> torch.Tensor:
        """The model's per-channel normalisation std as a [C,1,1] tensor like ``like``.

        Used to express an input perturbation of ``eps`` pixel units (images in
        [0, 1]) in the normalised space the model sees: ``eps / std``.
        """
        if self._input_std is None:
            self._input_std = normalisation(self.model)[1]
        return self._input_std.to(device=like.device, dtype=like.dtype).view(-1, 1, 1)

    def check_available(self, needs: Iterable[Need], who: str) -> None:
        """Raise a clear error if the model cannot produce ``needs`` (checked at wrap time)."""
        needs = set(needs)
        kind = self.head_info.kind
        if kind == "opaque" and needs - {Need.LOGITS}:
            missing = ", ".join(sorted(n.value for n in needs - {Need.LOGITS}))
            raise IncompatibleModelError(
                f"{who} needs {missing}, but {type(self.model).__name__} does not implement timm's "
                "forward_features / forward_head / get_classifier contract; only its logits are "
                "available. Use a timm model, or a logit detector such as 'msp' or 'energy'."
            )
        if kind == "none" and Need.LOGITS in needs:
            raise no_classifier_error(who)
        if Need.INTERMEDIATES in needs and not hasattr(self.model, "forward_intermediates"):
            raise IncompatibleModelError(
                f"{who} needs intermediate features, but {type(self.model).__name__} has no "
                "forward_intermediates(); choose a detector that reads pre-logits."
            )

    def linear_classifier(self, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight [K,D] and bias [K] of a single linear classifier over the pre-logits.

        Raises:
            IncompatibleModelError: the head is not one linear layer (distilled
                models, MLP heads, ``num_classes=0``).
        """
        if self.head_info.kind == "none":
            raise no_classifier_error(who)
        if not self.head_info.is_linear:
            reason = {
                "distilled": "a distilled model with two heads (their logits are averaged)",
                "opaque": "a model without timm's get_classifier()",
            }.get(self.head_info.kind, "a model whose classifier is not one nn.Linear over the pre-logits")
            raise IncompatibleModelError(
                f"{who} needs the weight and bias of a single linear classifier, but this is {reason}."
            )
        classifier = timm_api(self.model).get_classifier()
        if not isinstance(classifier, nn.Linear):  # "linear" heads are; unless replaced since the tap inspected it
            raise IncompatibleModelError(
                f"{who} needs the weight and bias of a single linear classifier, but this is a model whose "
                "classifier is not one nn.Linear over the pre-logits."
            )
        bias = classifier.bias if classifier.bias is not None else classifier.weight.new_zeros(classifier.out_features)
        return classifier.weight, bias

    # -- passes ---------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``model.forward_features(x)``: unpooled feature maps or tokens."""
        return timm_api(self.model).forward_features(x)

    def head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``model.forward_head(features, pre_logits=...)``."""
        return timm_api(self.model).forward_head(features, pre_logits=pre_logits)

    def classify(self, pre_logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from pre-logits (linear head), or from ``forward_head(features)`` otherwise."""
        if self.head_info.kind == "none":
            raise no_classifier_error("the tap")
        if self.head_info.is_linear:
            weight, bias = self.linear_classifier("the tap")
            return F.linear(pre_logits, weight, bias)
        if features is None:
            raise IncompatibleModelError(
                "logits of this model cannot be computed from pre-logits alone (its head is "
                f"{self.head_info.kind!r}); pass the feature maps"
            )
        return self.head(features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a fresh forward pass (with autograd if enabled), as timm computes them.

        Raises:
            IncompatibleModelError: the model has no classifier (``forward_head``
                would return pooled features, not logits).
        """
        if self.head_info.kind == "none":
            raise no_classifier_error("the tap")
        if self.head_info.kind == "opaque":
            return self.model(x)
        return self.head(self.features(x))

    def __call__(self, x: torch.Tensor, needs: Iterable[Need]) -> Outputs:
        """Run one forward pass computing exactly the union of ``needs``."""
        needs = frozenset(needs)
        if not needs:
            return Outputs(x, self)
        if self.head_info.kind == "opaque":
            self.check_available(needs, "the tap")
            return Outputs(x, self, logits=self.model(x))
        intermediates = None
        if Need.INTERMEDIATES in needs:
            features, intermediates = timm_api(self.model).forward_intermediates(x, intermediates_only=False)
        else:
            features = self.features(x)
        pre_logits = logits = None
        if needs & {Need.PRE_LOGITS, Need.LOGITS}:
            if Need.PRE_LOGITS in needs or self.head_info.is_linear:
                pre_logits = self.head(features, pre_logits=True)
            if Need.LOGITS in needs:
                logits = self._logits(features, pre_logits)
        return Outputs(
            x,
            self,
            logits=logits,
            pre_logits=pre_logits if Need.PRE_LOGITS in needs else None,
            features=features if Need.FEATURES in needs else None,
            intermediates=intermediates,
        )

    def _logits(self, features: torch.Tensor, pre_logits: torch.Tensor | None) -> torch.Tensor:
        if self.head_info.kind == "none":
            self.check_available({Need.LOGITS}, "the tap")
        if not self.head_info.is_linear or pre_logits is None:
            return self.head(features)
        logits = self.classify(pre_logits)
        if not self._linear_checked:
            logits = self._verify_linear_head(features, logits)
        return logits

    def _verify_linear_head(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Check once that ``classifier(pre_logits)`` is what ``forward_head`` returns.

        Heads that do more after the pre-logits (extra norms, several layers)
        fail the check and are treated as ``"other"``: logits then always come
        from ``forward_head`` and no detector gets a weight that is not the
        model's real last layer.
        """
        if self.model.training:
            return logits  # dropout would make the comparison meaningless; check in eval mode
        reference = self.head(features)
        if reference.numel() == 0 or not torch.isfinite(reference).all():
            return reference  # nothing to compare on this batch (empty, or not finite); check the next one
        scale = reference.abs().max().clamp_min(1.0)
        self._linear_checked = True
        if not torch.allclose(logits, reference, rtol=1e-4, atol=1e-5 * float(scale)):
            self.head_info = HeadInfo("other", self.head_info.num_classes, self.head_info.num_features)
            return reference
        return logits
