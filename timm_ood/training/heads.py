"""Classifier heads that replace a timm model's linear classifier in place.

::

    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    training.replace_head(model, "isomax")      # model.get_classifier() is now an IsoMaxHead
    model(images)                               # logits = -||h(x) - p_k||, from forward_head as before

:func:`replace_head` finds the classifier through timm's contract
(``pretrained_cfg['classifier']``, checked against ``get_classifier()``),
swaps it for a head over the same pre-logits, and keeps the rest of the
model untouched: ``forward``, ``forward_head(pre_logits=True)``, the tap and
every detector work as before (the head is an "other" head to
:class:`~timm_ood.tap.Tap`: logits come from ``forward_head``). The head is
recorded on the model (``model.timm_ood_head``) and ``model.reset_classifier(n)``
builds a fresh head of the same kind for ``n`` classes; checkpoints
(:func:`~timm_ood.training.save_checkpoint`) record it and
:func:`~timm_ood.training.load_checkpoint` restores it before loading weights.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn

from ..errors import IncompatibleModelError
from ..model_info import timm_api

__all__ = ["HEAD_ATTRIBUTE", "HEAD_KINDS", "IsoMaxHead", "ReplacementHead", "head_spec", "installed_head", "pre_logits",
           "replace_head"]

#: the model attribute recording the replaced head: ``{"kind": ..., "options": {...}}``
HEAD_ATTRIBUTE = "timm_ood_head"


class ReplacementHead(nn.Module):
    """Base of the heads :func:`replace_head` installs: ``[B, in_features] -> logits [B, num_classes]``.

    Subclasses set :attr:`kind`, take ``(in_features, num_classes, **options)``
    and return those options from :meth:`options` (JSON-serialisable), so a
    checkpoint can rebuild the head.
    """

    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"a {self.kind} head needs in_features >= 1 and num_classes >= 1, "
                             f"got {in_features} and {num_classes}")
        self.in_features = int(in_features)
        self.out_features = int(num_classes)

    def options(self) -> dict[str, Any]:
        """The constructor's keyword arguments beyond the sizes."""
        return {}


class IsoMaxHead(ReplacementHead):
    """IsoMax: logits are negated Euclidean distances to learnable class prototypes.

    Macêdo et al., "Isotropic Maximization Loss and Entropic Score" (arXiv
    1908.05569), Sec. 2, Eq. 4-5: ``logits_k(x) = -||h(x) - p_k||_2``, the
    non-squared distance (a true metric; the squared one was rejected), no bias.
    The prototypes ``p`` [K, D] start at zero by default (the paper reports that
    Xavier/Kaiming initialisation made detection oscillate; ``prototype_init="xavier"``
    is kept to measure that) and are ordinary parameters, so weight decay applies to them.
    The head has no scale: the entropic scale lives in
    :class:`~timm_ood.training.IsoMaxLoss` (training only), and inference uses
    ``softmax(-d)``.

    The gradient of ``||u||`` is undefined at ``u = 0`` (a zero feature against
    the zero-initialised prototypes, or a feature on a prototype); the distance
    is computed as ``sqrt(max(||u||^2, eps^2))``, exact for distances above
    ``eps`` (its gradient there is ``u / ||u||``) and with a zero gradient below
    (a valid subgradient of the norm at 0) instead of NaN.

    Memory: the differences ``h - p_k`` are formed exactly, ``[B, K, D]`` floats
    (as the authors' ``pairwise_distance``), not through ``||h||^2 - 2 h.p + ||p||^2``,
    whose cancellation is inexact exactly where the gradient matters (near a
    prototype). Computed in at least float32.

    Args:
        in_features: D, the pre-logits width.
        num_classes: K.
        eps: the distance below which the gradient is zero (default 1e-6).
        prototype_init: ``"zero"`` (the paper's) or ``"xavier"`` (Xavier-normal, the
            initialisation the paper found unstable).
    """

    kind = "isomax"
    prototype_inits = ("zero", "xavier")

    def __init__(self, in_features: int, num_classes: int, eps: float = 1e-6, prototype_init: str = "zero") -> None:
        super().__init__(in_features, num_classes)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if prototype_init not in self.prototype_inits:
            raise ValueError(f"unknown prototype_init {prototype_init!r}; choose one of {', '.join(self.prototype_inits)}")
        self.eps = float(eps)
        self.prototype_init = prototype_init
        self.prototypes = nn.Parameter(torch.zeros(num_classes, in_features))
        if prototype_init == "xavier":
            nn.init.xavier_normal_(self.prototypes)

    def options(self) -> dict[str, Any]:
        return {"eps": self.eps, "prototype_init": self.prototype_init}

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """``||h - p_k||_2`` for every feature row and prototype: [B, D] -> [B, K]."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"IsoMaxHead expects pre-logits [B, {self.in_features}], "
                             f"got shape {tuple(features.shape)}")
        dtype = torch.promote_types(features.dtype, torch.float32)
        difference = features.to(dtype)[:, None, :] - self.prototypes.to(dtype)[None, :, :]
        return difference.pow(2).sum(dim=2).clamp_min(self.eps**2).sqrt()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return -self.distances(features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.out_features}, eps={self.eps:g}, "
                f"prototype_init={self.prototype_init!r}")


def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pre-logits through timm's contract: ``forward_head(forward_features(x), pre_logits=True)``."""
    timm_model = timm_api(model)
    return timm_model.forward_head(timm_model.forward_features(images), pre_logits=True)


_Head = TypeVar("_Head", bound="ReplacementHead")


def installed_head(model: nn.Module, kinds: tuple[type[_Head], ...], who: str) -> _Head:
    """``model.get_classifier()`` if it is one of ``kinds``.

    Raises:
        IncompatibleModelError: the model has another classifier (or none).
    """
    classifier = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, kinds):
        names = " or ".join(repr(kind.kind) for kind in kinds)
        raise IncompatibleModelError(
            f"{who} trains a model whose head is {names}, but {type(model).__name__}'s classifier is a "
            f"{type(classifier).__name__}; call training.replace_head(model, {kinds[0].kind!r}) before training"
        )
    return classifier


#: head kinds :func:`replace_head` knows, by name; ``"linear"`` restores a plain ``nn.Linear``. The modules
#: defining other heads add theirs on import (``sigmoid_heads``: bin, binc; ``bottleneck``: vib, viby), which
#: ``timm_ood.training`` does before any of its modules is used (they subclass ReplacementHead, defined here)
HEAD_KINDS: dict[str, type[ReplacementHead]] = {IsoMaxHead.kind: IsoMaxHead}


def _classifier_path(model: nn.Module) -> str:
    """The dotted name of ``model.get_classifier()``, read from ``pretrained_cfg['classifier']``."""
    if not hasattr(model, "get_classifier"):
        raise TypeError(f"{type(model).__name__} has no get_classifier(): replace_head needs a timm model")
    classifier = timm_api(model).get_classifier()
    if isinstance(classifier, (tuple, list)):
        raise ValueError(f"{type(model).__name__} has several classifier heads (a distilled model); "
                         "replace_head supports models with one classifier")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    candidates = [name] if isinstance(name, str) else []
    for candidate in candidates:
        try:
            if model.get_submodule(candidate) is classifier:
                return candidate
        except AttributeError:
            pass
    # pretrained_cfg names a module that is not the classifier: find get_classifier() by identity
    found = [n for n, m in model.named_modules() if m is classifier and n]
    if not found:
        raise ValueError(f"cannot find the classifier of {type(model).__name__} among its submodules "
                         f"(pretrained_cfg['classifier'] = {name!r})")
    return found[0]


def _sizes(classifier: nn.Module | tuple[nn.Module, ...], model: nn.Module) -> tuple[int, int]:
    if isinstance(classifier, (nn.Linear, ReplacementHead)):
        return classifier.in_features, classifier.out_features
    if isinstance(classifier, nn.Identity):
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes=0): create it with "
                         "num_classes=<classes> or call model.reset_classifier(<classes>) first")
    raise ValueError(f"replace_head replaces a single nn.Linear classifier; {type(model).__name__}'s "
                     f"classifier is a {type(classifier).__name__}")


def _install(model: nn.Module, module: nn.Module) -> None:
    path = _classifier_path(model)
    old = model.get_submodule(path)
    parent_name, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    reference = next(old.parameters(), None)
    if reference is not None:
        module.to(device=reference.device, dtype=reference.dtype)
    module.train(old.training)
    setattr(parent, leaf, module)
    if timm_api(model).get_classifier() is not module:
        raise RuntimeError(f"replaced {path!r} but {type(model).__name__}.get_classifier() does not return "
                           "the new head; this model's head cannot be replaced in place")


def _reset_classifier_keeping_head(model: nn.Module, num_classes: int, *args: Any, **kwargs: Any) -> None:
    """timm's ``reset_classifier``, then a fresh head of the recorded kind for ``num_classes`` > 0."""
    cast(Any, type(model)).reset_classifier(model, num_classes, *args, **kwargs)  # the class's (timm's), not the instance's
    spec = getattr(model, HEAD_ATTRIBUTE, None)
    if spec is not None and num_classes > 0:
        in_features, classes = _sizes(timm_api(model).get_classifier(), model)
        _install(model, HEAD_KINDS[spec["kind"]](in_features, classes, **spec["options"]))


def replace_head(model: nn.Module, kind: str, **options: Any) -> nn.Module:
    """Replace a timm model's linear classifier, in place, by a head of ``kind``.

    The new head reads the same pre-logits, has the same number of
    classes, and sits where ``pretrained_cfg['classifier']`` says, so
    ``get_classifier()`` returns it and ``forward_head`` uses it. Afterwards
    ``model.reset_classifier(n)`` gives a fresh head of the same kind (and
    ``n = 0`` removes it, as timm does); ``kind="linear"`` restores a fresh
    ``nn.Linear`` and timm's own ``reset_classifier``.

    Args:
        model: a timm model with one ``nn.Linear`` classifier (or a head this
            function installed).
        kind: ``"isomax"`` (:class:`IsoMaxHead`), ``"bin"``, ``"binc"``, ``"vib"``, ``"viby"``
            (:class:`BINHead`, :class:`BINCHead`, :class:`VIBHead`, :class:`VIBYHead`), or ``"linear"``.
        **options: the head's keyword arguments (e.g. ``eps`` for IsoMax, ``latent_dim`` for VIB).

    Returns:
        The new head module (the model is changed in place).

    Raises:
        ValueError: an unknown kind, or a model whose classifier is not one
            linear layer (distilled, convolutional, or absent).
    """
    classifier = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else None
    if classifier is None:
        raise TypeError(f"{type(model).__name__} has no get_classifier(): replace_head needs a timm model")
    if kind == "linear":
        if options:
            raise TypeError(f"a linear head takes no options, got {sorted(options)}")
        in_features, num_classes = _sizes(classifier, model)
        head: nn.Module = nn.Linear(in_features, num_classes)
        _install(model, head)
        model.__dict__.pop("reset_classifier", None)
        model.__dict__.pop(HEAD_ATTRIBUTE, None)
        return head
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(['linear', *HEAD_KINDS])}")
    in_features, num_classes = _sizes(classifier, model)
    head = HEAD_KINDS[kind](in_features, num_classes, **options)
    _install(model, head)
    setattr(model, HEAD_ATTRIBUTE, {"kind": kind, "options": head.options()})
    # an instance attribute, as nn.Module.__setattr__ stores a plain value (replace_head(model, "linear") pops it)
    model.__dict__["reset_classifier"] = functools.partial(_reset_classifier_keeping_head, model)
    return head


def head_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"kind", "options"}`` of the replaced head ``get_classifier()`` returns, or None for timm's own."""
    classifier = timm_api(model).get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, ReplacementHead):
        return {"kind": classifier.kind, "options": classifier.options()}
    return None
