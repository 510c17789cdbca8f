"""The detector contract.

A detector turns what the tap computed for a batch into one score per input,
higher = more out-of-distribution. It declares what it needs in one frozen
:class:`Requirements`, takes its hyperparameters as keyword arguments stored
under the same names (scikit-learn's convention, so they are introspectable and
settable), and keeps any fitted state in tensors registered as buffers: it
follows ``.to()`` with the model and saves to safetensors without pickle.

Fitting streams: :meth:`Detector.reset_fit`, then :meth:`Detector.update_fit`
once per batch (sufficient statistics only), then :meth:`Detector.finish_fit`.
A detector whose fit reads what an earlier pass fitted declares
``Requirements(fit_passes=2)`` and sees the data again after
:meth:`Detector.next_fit_pass`.
Several detectors fit together in one pass over the data
(:func:`timm_ood.fitting.fit_detectors`).

A finished fit records the model's fingerprint (:mod:`timm_ood.fingerprint`):
it travels with the state (safetensors metadata, a ``_model_fingerprint`` uint8
tensor in ``state_dict``), and loading or scoring with another model raises
:class:`~timm_ood.errors.IncompatibleModelError` instead of giving numbers.
"""

from __future__ import annotations

import inspect
import json
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..distributed import all_reduce_sum
from ..errors import IncompatibleModelError, NotFittedError
from ..fingerprint import (
    PRECISIONS,
    ModelFingerprint,
    classifier_token,
    incompatibility,
    model_fingerprint,
    same_structure,
)
from ..tap import Need, Outputs, Tap

__all__ = ["Detector", "FastGrid", "Requirements", "all_reduce_sum", "fit_in_progress", "score_dtype"]

_State = TypeVar("_State")


#: what ``Requirements.held_out`` may say: no step, held-out ID data, held-out ID and OOD data
HELD_OUT_STEPS = ("", "id", "id+ood")


@dataclass(frozen=True)
class Requirements:
    """What a detector needs; the tap and the fitting loop read nothing else.

    Attributes:
        outputs: what the shared forward pass must compute for it to score.
        fit_outputs: what it reads while fitting (default: ``outputs``).
        input_gradients: it runs its own forward/backward passes on the inputs
            (ODIN, input preprocessing); scoring then runs with autograd.
        linear_classifier: it reads the weight and bias of a single linear
            classifier over the pre-logits (refused for distilled/MLP heads).
        fit: it must be fitted on in-distribution data before scoring.
        fit_labels: its fit uses the class labels.
        fit_passes: passes over the fit data; each pass after the first reads
            what the previous ones fitted (ViM's residuals need its principal
            subspace), between passes :meth:`Detector.next_fit_pass` runs.
        held_out: a step fitted after ``fit`` on held-out data, run by the
            driver (:func:`timm_ood.passes.fit_held_out`): ``""`` none, ``"id"``
            held-out in-distribution data (Gram's normalisers), ``"id+ood"``
            held-out in-distribution and OOD data (multi-layer Mahalanobis
            weights). See :meth:`Detector.update_held_out`.
        collective_scores: :meth:`Detector.score` takes part in
            torch.distributed collectives (a bank sharded over the ranks). The
            driver then calls it in lockstep on every rank, with an empty batch
            (0 rows, the same trailing shapes) on ranks that ran out of data.
    """

    outputs: frozenset[Need] = frozenset({Need.LOGITS})
    fit_outputs: frozenset[Need] | None = None
    input_gradients: bool = False
    linear_classifier: bool = False
    fit: bool = False
    fit_labels: bool = False
    fit_passes: int = 1
    held_out: str = ""
    collective_scores: bool = False

    def __post_init__(self) -> None:
        if self.held_out not in HELD_OUT_STEPS:
            raise ValueError(f"Requirements.held_out must be one of {HELD_OUT_STEPS}, got {self.held_out!r}")

    @property
    def outputs_for_fit(self) -> frozenset[Need]:
        return self.outputs if self.fit_outputs is None else self.fit_outputs


def score_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: half-precision scores would tie and lose order."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def fit_in_progress(state: _State | None, who: str) -> _State:
    """``state``, what :meth:`Detector.reset_fit` started accumulating; a clear error when there is none.

    ``update_fit``, ``next_fit_pass`` and ``finish_fit`` continue a fit that
    ``reset_fit`` starts (``finish_fit`` ends it and drops the accumulator).
    """
    if state is None:
        raise RuntimeError(
            f"detector {who!r}: no fit in progress; call reset_fit(tap) before update_fit / finish_fit "
            "(model.fit and fit_detectors do)"
        )
    return state


@dataclass(frozen=True)
class FastGrid:
    """A detector's own way of scoring a whole hyperparameter grid in one pass (:meth:`Detector.fast_grid`).

    Attributes:
        grid: the hyperparameter combinations, in the order of the rows of ``scores``.
        scores: one batch's outputs -> float64 scores [len(grid), B]; row ``i``
            is what the detector with the hyperparameters ``grid[i]`` scores.
        label: the pass's name in progress bars (``"ODIN grid"`` reads
            ``"ODIN grid on held-out ID"``).
        needs: what the tap computes for each batch.
        gradients: ``scores`` takes input gradients (``outputs.inputs`` are the
            images, autograd on).
    """

    grid: list[dict[str, Any]]
    scores: Callable[[Outputs], torch.Tensor]
    label: str
    needs: frozenset[Need] = frozenset()
    gradients: bool = False


#: the ``state_dict`` key (under the detector's prefix) holding its model fingerprint
FINGERPRINT_KEY = "_model_fingerprint"
REFIT = ("Fit the detector again on this model with model.fit(id_train_loader), or load the state into "
         "the model it was fitted on.")
_SCORE_FIX = ("Fit it again on the model as it is now with model.fit(id_train_loader), or restore the "
              "weights it was fitted on.")
_SCORE_HATCH = ("If the change keeps the fitted state valid, accept it with "
                "model.detector.accept_model(model.model) and score again.")


class Detector(nn.Module, metaclass=ABCMeta):
    """Base class of every OOD detector, built-in or from a plugin.

    Subclasses set the class attributes below, store every ``__init__``
    keyword argument as an attribute of the same name, implement
    :meth:`score`, and, when ``requirements.fit`` is true, the three fit
    methods. Scores are higher for more out-of-distribution inputs; a method
    whose paper score is "higher = in-distribution" is negated and says so.

    Attributes:
        name: the registered name (``"msp"``, ``"odin"``, ...).
        requirements: what it needs from the model and the data.
        search_space: candidate values per hyperparameter, for ``tune``.
        fit_hyperparameters: hyperparameters that change what ``fit`` computes;
            setting one of them invalidates a fit.
        paper: the paper (and equation) the detector implements.
    """

    name: ClassVar[str] = ""
    requirements: ClassVar[Requirements] = Requirements()
    search_space: ClassVar[Mapping[str, Sequence[Any]]] = MappingProxyType({})
    fit_hyperparameters: ClassVar[frozenset[str]] = frozenset()
    paper: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.is_fitted = False
        self._model_fingerprint: ModelFingerprint | None = None
        self._fingerprint_checked: tuple | None = None  # classifier token last found compatible
        self._accepted_fingerprint: ModelFingerprint | None = None  # accept_model()'s model

    # -- hyperparameters ----------------------------------------------------
    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        """The keyword arguments of ``__init__``: the detector's hyperparameters."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return tuple(
            p.name for p in parameters
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        )

    def hyperparameters(self) -> dict[str, Any]:
        """Current hyperparameter values, by name."""
        return {name: getattr(self, name) for name in self.hyperparameter_names()}

    def set_hyperparameters(self, **values: Any) -> Detector:
        """Change hyperparameters in place; changing a fit hyperparameter unfits the detector.

        Raises:
            TypeError: a name that is not a hyperparameter of this detector.
        """
        known = self.hyperparameter_names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(
                f"detector {self.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                f"its hyperparameters are: {', '.join(known) or '(none)'}"
            )
        for key, value in values.items():
            setattr(self, key, value)
        if self.is_fitted and set(values) & self.fit_hyperparameters:
            self.is_fitted = False
        self.check_hyperparameters()
        return self

    def check_hyperparameters(self) -> None:
        """Raise ``ValueError`` for invalid hyperparameter values (override to check)."""

    @classmethod
    def fast_grid(cls, space: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any]) -> FastGrid | None:
        """A scorer of the whole grid ``space`` (with ``fixed`` held) faster than a detector per point, or None.

        :func:`~timm_ood.evaluation.grid_search` asks for it first and, when it
        is None (the default), scores the grid one combination at a time. A
        detector returns one only for the spaces its scorer equals the
        detector on (ODIN: temperature x epsilon, nothing fixed).
        """
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())

    # -- the model ----------------------------------------------------------
    def check_model(self, tap: Tap) -> None:
        """Raise :class:`~timm_ood.errors.IncompatibleModelError` if the model cannot serve this detector.

        Reading the linear classifier implies reading logits, and so does
        running its own input-gradient passes while reading nothing from the
        shared forward (ODIN): on a model without classifier all of them get
        the tap's one ``num_classes=0`` error.
        """
        who = f"detector {self.name!r}"
        requirements = self.requirements
        needs = requirements.outputs | requirements.outputs_for_fit
        if requirements.linear_classifier or (requirements.input_gradients and not needs):
            needs = needs | {Need.LOGITS}
        tap.check_available(needs, who)
        if requirements.linear_classifier:
            tap.linear_classifier(who)

    # -- fitting --------------------------------------------------------------
    def reset_fit(self, tap: Tap) -> None:
        """Start a fit: clear accumulated statistics. ``tap`` describes the model."""

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        """Accumulate sufficient statistics from one batch of in-distribution data."""

    def next_fit_pass(self) -> None:
        """Between two passes of a multi-pass fit (``requirements.fit_passes > 1``): turn what the
        pass accumulated into what the next pass reads (all-reduce it first)."""

    def finish_fit(self) -> None:
        """Turn the accumulated statistics into the fitted state (all-reduce them first)."""

    # -- the held-out step (requirements.held_out) ----------------------------------
    def reset_held_out(self) -> None:
        """Start the held-out step (after ``fit``): clear what it accumulates."""

    def update_held_out(self, outputs: Outputs, is_ood: bool) -> None:
        """Accumulate one batch of held-out data: in-distribution (``is_ood=False``) or OOD.

        ``outputs`` are what :meth:`score` reads (``requirements.outputs``), computed
        as scoring computes them (autograd on for detectors with input gradients).
        """

    def finish_held_out(self) -> None:
        """Turn what the held-out step accumulated into fitted state (all-reduce / gather it first)."""

    # -- scoring ----------------------------------------------------------------
    @abstractmethod
    def score(self, outputs: Outputs) -> torch.Tensor:
        """OOD scores [B] for one batch, higher = more out-of-distribution."""

    def forward(self, outputs: Outputs) -> torch.Tensor:
        """:meth:`score` with the contract checked: fitted, shape [B], no NaN."""
        self.check_fitted()
        tap = getattr(outputs, "tap", None)
        if tap is not None:
            self._check_scoring_model(tap.model)
        scores = self.score(outputs)
        batch = outputs.batch_size
        if scores.shape != (batch,):
            raise RuntimeError(
                f"detector {self.name!r} returned scores of shape {tuple(scores.shape)} for a batch of "
                f"{batch}; score() must return one score per input, shape [{batch}]"
            )
        nan = torch.isnan(scores)
        if bool(nan.any()):
            raise ValueError(
                f"detector {self.name!r} produced NaN scores for {int(nan.sum())} of {batch} inputs. "
                "Check the inputs for NaN/inf values and the model's weights for divergence."
            )
        return scores

    def check_fitted(self) -> None:
        """Raise :class:`~timm_ood.errors.NotFittedError` if the detector needs a fit it has not had."""
        if self.requirements.fit and not self.is_fitted:
            raise NotFittedError(
                f"detector {self.name!r} is not fitted: call model.fit(id_train_loader) on "
                "in-distribution training data (or load a fitted state with load_detector) "
                "before scoring"
            )

    # -- the model it was fitted on -------------------------------------------------
    @property
    def model_fingerprint(self) -> ModelFingerprint | None:
        """What the fitted state was fitted on (recorded when a fit finishes); None when unknown."""
        return self.__dict__.get("_model_fingerprint")

    def record_fingerprint(self, model: nn.Module) -> None:
        """Remember ``model`` as the one the fitted state describes (``fit_detectors`` calls it after
        ``finish_fit``; detectors without a fit have no model-dependent state and record nothing)."""
        self._set_fingerprint(model_fingerprint(model, precisions=PRECISIONS) if self.requirements.fit else None)

    def _set_fingerprint(self, fingerprint: ModelFingerprint | None) -> None:
        self._model_fingerprint = fingerprint
        self._fingerprint_checked = None
        self._accepted_fingerprint = None

    def check_fingerprint(
        self, model: nn.Module, *, weights: bool = False, strict: bool = True, fix: str = REFIT, hatch: str = ""
    ) -> None:
        """Raise if the detector was fitted on another model than ``model`` (a no-op when unknown).

        Args:
            model: the model the detector is about to score with.
            weights: also compare the digest of all the model's weights (costly, see
                :mod:`timm_ood.fingerprint`); otherwise the structure and the classifier.
            strict: False only warns (and accepts the model) when the weights differ;
                another class count, feature width or input channel count always raises.
            fix: the sentence of the message that says how to fix it.
            hatch: the sentence that says how to go on anyway.

        Raises:
            IncompatibleModelError: saying what differs and how to fix it.
        """
        recorded = self.model_fingerprint
        if recorded is None or not self.requirements.fit:
            return
        found = incompatibility(recorded, model_fingerprint(model, weights=weights),
                                who=f"detector {self.name!r}", fix=fix, hatch=hatch if strict else "")
        if found is None:
            self._fingerprint_checked = classifier_token(model)
        elif strict or found.shapes:
            raise IncompatibleModelError(found.message)
        else:
            warnings.warn(f"{found.message} Loaded anyway (strict=False): its scores may be meaningless.",
                          UserWarning, stacklevel=4)
            self.accept_model(model)

    def accept_model(self, model: nn.Module) -> None:
        """Score with ``model`` although it is not (or no longer) the model of the fit.

        The escape hatch after fine-tuning or loading other weights when the fitted
        state is known to stay valid. It accepts the model's classifier as it is
        now; a later change to it is checked again.
        """
        self._accepted_fingerprint = model_fingerprint(model, precisions=PRECISIONS, weights=False)
        self._fingerprint_checked = classifier_token(model)

    def _check_scoring_model(self, model: nn.Module) -> None:
        """Score-time check: a token compare; the classifier digest only after the classifier changed."""
        recorded = self.__dict__.get("_model_fingerprint")
        if recorded is None or not self.requirements.fit:
            return
        token = classifier_token(model)
        if token == self._fingerprint_checked:
            return
        current = model_fingerprint(model, weights=False)
        found = incompatibility(recorded, current, who=f"detector {self.name!r}", fix=_SCORE_FIX,
                                hatch=_SCORE_HATCH)
        accepted = self._accepted_fingerprint
        if found is not None and (accepted is None or incompatibility(accepted, current, who="", fix="")):
            raise IncompatibleModelError(found.message)
        self._fingerprint_checked = token

    # -- state --------------------------------------------------------------------
    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The fitted state: every buffer that is set, by its dotted name."""
        return {name: buffer for name, buffer in self.named_buffers() if buffer is not None}

    def load_fitted_state(
        self, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> None:
        """Install a fitted state saved by :meth:`fitted_state` (shapes may differ from now).

        Args:
            state: tensors by buffer name.
            device: where to put them (default: where they are).

        Raises:
            KeyError: a name that is not a buffer this detector declares.
        """
        declared = {name for name, _ in self._declared_buffers()}
        unknown = sorted(set(state) - declared)
        if unknown:
            raise KeyError(
                f"detector {self.name!r} has no state named {', '.join(unknown)}; the file was "
                f"saved by another detector or version (expected names: {', '.join(sorted(declared))})"
            )
        for name, tensor in state.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            owner._buffers[leaf] = tensor if device is None else tensor.to(device)
        self.is_fitted = True
        self._set_fingerprint(None)  # unknown until the caller restores it (load_detector does)

    def _declared_buffers(self):
        for module_name, module in self.named_modules():
            for leaf in module._buffers:
                yield (f"{module_name}.{leaf}" if module_name else leaf), module

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.model_fingerprint is not None:
            destination[prefix + FINGERPRINT_KEY] = self.model_fingerprint.to_tensor()

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """torch's loading, plus: unfitted (``None``) buffers take the loaded tensors, a shape that
        differs raises :class:`~timm_ood.errors.IncompatibleModelError` naming the buffer, and the
        model fingerprint travels with the state."""
        key = prefix + FINGERPRINT_KEY
        incoming = ModelFingerprint.from_tensor(state_dict[key]) if key in state_dict else None
        loads_state = incoming is not None
        installed = False
        for name, module in self._declared_buffers():
            leaf = name.rpartition(".")[2]
            tensor = state_dict.get(prefix + name)
            if not isinstance(tensor, torch.Tensor) or leaf in module._non_persistent_buffers_set:
                continue
            loads_state = True
            current = module._buffers[leaf]
            if current is None:
                module._buffers[leaf] = tensor.detach().clone()  # torch's copy below then matches
                installed = True
            elif current.shape != tensor.shape:
                own = self.model_fingerprint
                if incoming is None or own is None or not same_structure(incoming, own):
                    raise IncompatibleModelError(self._shape_message(name, tensor.shape, current.shape, incoming))
                # the same model fitted on other data (a kNN bank of another size): take it whole
                module._buffers[leaf] = tensor.detach().clone().to(current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if loads_state:
            self._set_fingerprint(incoming)
            if incoming is not None or installed:
                self.is_fitted = True

    def _shape_message(
        self, name: str, loaded: torch.Size, here: torch.Size, incoming: ModelFingerprint | None
    ) -> str:
        own = self.model_fingerprint
        origin = []
        if incoming is not None:
            origin.append(f"the loaded state was fitted on {incoming.describe(channels=True)}")
        if own is not None:
            origin.append(f"this detector was fitted on {own.describe(channels=True)}")
        why = f" ({'; '.join(origin)})" if origin else ""
        return (f"detector {self.name!r} cannot load its fitted state {name!r}: it has shape {tuple(loaded)} in "
                f"the loaded state but {tuple(here)} in this detector, so it was fitted on another model or "
                f"with other settings{why}. {REFIT}")

    def metadata(self) -> dict[str, str]:
        """String metadata saved next to the state: name, hyperparameters, fitted flag, model fingerprint."""
        metadata = {
            "timm_ood.detector": self.name,
            "timm_ood.hyperparameters": json.dumps(self.hyperparameters(), default=list),
            "timm_ood.fitted": "1" if self.is_fitted else "0",
        }
        if self.model_fingerprint is not None:
            metadata["timm_ood.model_fingerprint"] = self.model_fingerprint.to_json()
        return metadata
