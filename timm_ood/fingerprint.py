"""A model fingerprint: what a detector was fitted on, so its state is never used with another model.

A fitted detector's statistics describe one model's outputs (its class count,
its feature width, its classifier, its backbone). :func:`model_fingerprint`
records that model as a small JSON-able :class:`ModelFingerprint`; the detector
keeps it next to its fitted state (an attribute, safetensors metadata, a uint8
tensor in ``state_dict``), and loading or scoring compares it with the model at
hand (:func:`incompatibility`).

Digests are sha256 (shortened to 16 hex digits) of the tensors' bytes, names
and shapes, on CPU. So that moving the model (``.to("cuda")``, ``.double()``,
``.half()``) does not look like other weights, floating tensors are hashed at
a fixed *precision*: float32 (float64 and float32 weights), float16 or
bfloat16 (when the model holds such tensors). A fit records the digests at all
three precisions; a check computes the one the model is in now.

Cost: the classifier digest reads only the classifier (microseconds to a few
milliseconds). The whole-model digest reads every ``state_dict`` tensor: about
0.1 s per precision for timm's ``resnet50`` (25.6M parameters, 2 CPU cores),
so about 0.3 s per fit (three precisions) and 0.1 s per ``load_detector``. It
is cached per model until a weight changes (``data_ptr`` / version counter).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import IncompatibleModelError
from .model_info import input_channels, timm_api
from .tap import inspect_head

__all__ = [
    "PRECISIONS",
    "Incompatibility",
    "ModelFingerprint",
    "classifier_token",
    "incompatibility",
    "model_fingerprint",
    "precisions_of",
    "same_structure",
]

#: the precisions at which floating tensors are hashed (see the module docstring)
PRECISIONS: tuple[str, ...] = ("float32", "float16", "bfloat16")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DIGEST_LENGTH = 16


@dataclass(frozen=True)
class ModelFingerprint:
    """What a detector was fitted on.

    Attributes:
        architecture: timm's ``pretrained_cfg["architecture"]``, else the class name.
        num_classes: classes of the classifier (0 without one).
        num_features: width of the pre-logit features (None when unknown).
        in_chans: input channels of the stem (None when unknown).
        classifier: digest of the classifier's weight and bias (of the whole head's
            parameters when it is not one ``nn.Linear``), by precision.
        weights: digest of every ``state_dict`` tensor in name order, by precision
            (empty for a fingerprint that skipped it).
    """

    architecture: str
    num_classes: int
    num_features: int | None
    in_chans: int | None
    classifier: dict[str, str] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelFingerprint:
        """Parse :meth:`to_json` output.

        Raises:
            ValueError: the text is not a fingerprint.
        """
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(
                architecture=str(data["architecture"]),
                num_classes=int(data["num_classes"]),
                num_features=None if data.get("num_features") is None else int(data["num_features"]),
                in_chans=None if data.get("in_chans") is None else int(data["in_chans"]),
                classifier={str(k): str(v) for k, v in dict(data.get("classifier") or {}).items()},
                weights={str(k): str(v) for k, v in dict(data.get("weights") or {}).items()},
            )
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"not a timm-ood model fingerprint ({error}): {text[:200]!r}") from error

    def to_tensor(self) -> torch.Tensor:
        """The JSON as a uint8 tensor (how it travels in a ``state_dict``)."""
        return torch.tensor(list(self.to_json().encode()), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> ModelFingerprint:
        return cls.from_json(bytes(tensor.detach().cpu().to(torch.uint8).tolist()).decode())

    def describe(self, *, channels: bool = False) -> str:
        """``"resnet18 with 10 classes and 512-wide features"``."""
        parts = [f"{self.num_classes} classes"]
        if self.num_features is not None:
            parts.append(f"{self.num_features}-wide features")
        if channels and self.in_chans is not None:
            parts.append(f"{self.in_chans} input channel{'s' * (self.in_chans != 1)}")
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{self.architecture} with {listed}"


def precisions_of(tensors: Iterable[torch.Tensor]) -> tuple[str, ...]:
    """The precisions to hash ``tensors`` at to compare them with a recorded fit.

    The lowest floating precision among them; for float32/64 weights also each
    half-precision type that holds them exactly (a model moved to ``.half()``
    and back), so either may match. The exactness test stops at the first tensor
    a type does not hold: it costs little for ordinary weights.
    """
    tensors = [t.detach() for t in tensors if t.is_floating_point()]
    dtypes = {t.dtype for t in tensors}
    for name in ("float16", "bfloat16"):
        if _DTYPES[name] in dtypes:
            return (name,)
    with torch.no_grad():
        exact = tuple(name for name in ("float16", "bfloat16")
                      if tensors and all(torch.equal(t.to(_DTYPES[name]).to(t.dtype), t) for t in tensors))
    return ("float32", *exact)


def _digest(named: Sequence[tuple[str, torch.Tensor]], precision: str, length: int = _DIGEST_LENGTH) -> str:
    """sha256 of names, shapes, dtypes and bytes, floating tensors cast to ``precision`` on CPU
    (its first ``length`` hex digits)."""
    hasher = hashlib.sha256()
    dtype = _DTYPES[precision]
    with torch.no_grad():
        for name, tensor in named:
            t = tensor.detach()
            t = t.to(device="cpu", dtype=dtype) if t.is_floating_point() else t.cpu()
            hasher.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel():
                # numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only
                hasher.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return hasher.hexdigest()[:length]


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    if not hasattr(model, "get_classifier"):
        return []
    head = timm_api(model).get_classifier()
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module) and not isinstance(h, nn.Identity)]


def _classifier_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Weight and bias of a linear classifier, else every parameter of the head (both heads if distilled)."""
    named: list[tuple[str, torch.Tensor]] = []
    for index, module in enumerate(_classifier_modules(model)):
        if isinstance(module, nn.Linear):
            items = [("weight", module.weight)] + ([("bias", module.bias)] if module.bias is not None else [])
        else:
            items = list(module.named_parameters())
        named.extend((f"{index}.{name}", tensor) for name, tensor in items)
    return named


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change in place)
        return -1


def _token(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((name, t.data_ptr(), _version(t), t.dtype, t.device, tuple(t.shape)) for name, t in tensors)


def classifier_token(model: nn.Module) -> tuple:
    """A cheap key that changes when the classifier's tensors do (moved, replaced, edited in place)."""
    modules = _classifier_modules(model)
    return (id(model), tuple(map(id, modules)), getattr(model, "num_classes", None),
            _token(_classifier_tensors(model)))


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _in_chans(model: nn.Module) -> int | None:
    try:
        return input_channels(model)
    except (IncompatibleModelError, AttributeError, TypeError, ValueError):
        return None


# model -> (state_dict token, {precision: weights digest}); a digest stays valid while no weight changes
_WEIGHTS_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, str]]] = weakref.WeakKeyDictionary()


def _weights_digests(model: nn.Module, precisions: Sequence[str]) -> dict[str, str]:
    named = sorted(model.state_dict().items())
    token = _token(named)
    cached_token, digests = _WEIGHTS_CACHE.get(model, ((), {}))
    if cached_token != token:
        digests = {}
    for precision in precisions:
        if precision not in digests:
            digests[precision] = _digest(named, precision)
    _WEIGHTS_CACHE[model] = (token, digests)
    return {p: digests[p] for p in precisions}


def model_fingerprint(
    model: nn.Module, *, precisions: Sequence[str] | None = None, weights: bool = True
) -> ModelFingerprint:
    """The fingerprint of ``model`` as it is now.

    Args:
        model: a timm model (or any ``nn.Module``).
        precisions: precisions to hash at; default: the one the model is in now
            and those that hold its weights exactly (:func:`precisions_of`); pass
            :data:`PRECISIONS` to record a fit, so any later move compares.
        weights: also digest every ``state_dict`` tensor (the costly part, see
            the module docstring); False gives a cheap fingerprint for score-time checks.
    """
    classifier = _classifier_tensors(model)
    head = inspect_head(model)
    if precisions is None:
        classifier_precisions: Sequence[str] = precisions_of(t for _, t in classifier)
        weight_precisions: Sequence[str] = precisions_of(model.state_dict().values()) if weights else ()
    else:
        unknown = sorted(set(precisions) - set(PRECISIONS))
        if unknown:
            raise ValueError(f"unknown precision {unknown}; choose from {', '.join(PRECISIONS)}")
        classifier_precisions = weight_precisions = tuple(precisions)
    return ModelFingerprint(
        architecture=_architecture(model),
        num_classes=head.num_classes,
        num_features=head.num_features,
        in_chans=_in_chans(model),
        classifier={p: _digest(classifier, p) for p in classifier_precisions} if classifier else {},
        weights=_weights_digests(model, weight_precisions) if weights else {},
    )


class Incompatibility(NamedTuple):
    """How a model differs from the one a detector was fitted on.

    Attributes:
        message: one paragraph: what differs and how to fix it.
        shapes: the class count, feature width or input channels differ, so the
            fitted state cannot even be applied (no escape hatch).
    """

    message: str
    shapes: bool


def _differing(recorded: dict[str, str], current: dict[str, str]) -> tuple[str, str] | None:
    """(recorded, current) digests when no precision both hold agrees (None: equal, or nothing to compare)."""
    common = [p for p in current if p in recorded]
    if not common or any(recorded[p] == current[p] for p in common):
        return None
    return recorded[common[0]], current[common[0]]


def same_structure(a: ModelFingerprint, b: ModelFingerprint) -> bool:
    """Same architecture, class count, feature width and input channels (weights aside)."""
    return (a.architecture, a.num_classes, a.num_features, a.in_chans) == (
        b.architecture, b.num_classes, b.num_features, b.in_chans)


def incompatibility(
    recorded: ModelFingerprint, current: ModelFingerprint, *, who: str, fix: str, hatch: str = ""
) -> Incompatibility | None:
    """How ``current`` differs from the model ``who`` was fitted on, or None when it does not.

    Args:
        recorded: the fingerprint recorded by the fit.
        current: the fingerprint of the model at hand (:func:`model_fingerprint`).
        who: the subject of the sentence (``"detector 'mahalanobis'"``).
        fix: sentence(s) saying how to fix it, appended.
        hatch: sentence(s) offering to go on anyway, appended unless the shapes differ.
    """
    shape_fields = ("the number of classes", "the feature width", "the input channels")
    structure = [label for label, a, b in (
        ("the architecture", recorded.architecture, current.architecture),
        ("the number of classes", recorded.num_classes, current.num_classes),
        ("the feature width", recorded.num_features, current.num_features),
        ("the input channels", recorded.in_chans, current.in_chans),
    ) if a != b and not (label == "the input channels" and None in (a, b))]
    shapes = any(label in shape_fields for label in structure)
    tail = fix if shapes or not hatch else f"{fix} {hatch}"
    if structure:
        channels = "the input channels" in structure
        listed = structure[0] if len(structure) == 1 else ", ".join(structure[:-1]) + " and " + structure[-1]
        verb = "differs" if structure in (["the architecture"], ["the number of classes"], ["the feature width"]) \
            else "differ"
        return Incompatibility(
            f"{who} was fitted on {recorded.describe(channels=channels)}; this model is "
            f"{current.describe(channels=channels)} ({listed} {verb}), "
            f"so its fitted state does not describe this model's outputs. {tail}", shapes)
    classifier = _differing(recorded.classifier, current.classifier)
    if classifier is None and bool(recorded.classifier) != bool(current.classifier):
        classifier = (next(iter(recorded.classifier.values()), "none"), next(iter(current.classifier.values()), "none"))
    if classifier is not None:
        return Incompatibility(
            f"{who} was fitted on {recorded.describe()}, the same architecture as this model, but its "
            f"classifier weights differ (digest {classifier[0]} at fit, {classifier[1]} now): the model was "
            "fine-tuned or given other weights after the fit, so the fitted state no longer describes its "
            f"outputs. {tail}", False)
    weights = _differing(recorded.weights, current.weights)
    if weights is not None:
        return Incompatibility(
            f"{who} was fitted on {recorded.describe()}, the same architecture and classifier as this model, "
            f"but its other weights differ (whole-model digest {weights[0]} at fit, {weights[1]} now): its "
            "backbone or normalisation statistics changed after the fit, so the fitted state no longer "
            f"describes its features. {tail}", False)
    return None
