"""Sampling detectors: Monte Carlo dropout, and deep ensembles.

Both score the predictive distribution ``p̄(y|x)``, an average of softmax
outputs: over dropout masks (``mc-dropout``, Gal & Ghahramani, ICML 2016) or
over independently trained models (``deep-ensemble``, Lakshminarayanan,
Pritzel & Blundell, NeurIPS 2017). Averages are taken in log space,
``log p̄ = logsumexp_t log softmax(z_t) - log T``, in float64.

Dropout masks are one sampled network per pass, shared by every input of
the batch (batch-first tensors, as in every timm model): pass ``t`` draws the
masks of its dropout calls, in call order, from a CPU generator seeded from
``seed`` and ``t``. Scores are therefore deterministic, independent of the
batch size and of the device, and equal to scoring each input alone through
the same ``T`` networks ``ω_t ~ q(ω)``, as the paper's Monte Carlo estimate
``p(y|x) ≈ (1/T) Σ_t p(y|x, ω_t)`` reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import IncompatibleModelError
from ..hookspecs import hookimpl
from ..model_info import data_config
from ..tap import Need, Outputs, Tap, inspect_head
from .base import Detector, Requirements

__all__ = [
    "DeepEnsemble",
    "EnsembleModel",
    "MCDropout",
    "SharedMaskDropout",
    "mc_dropout_log_probabilities",
    "sampled_generators",
]

#: Dropout functions sampled by ``mc-dropout``: True where whole channels are dropped.
_DROPOUT_FUNCTIONS: dict[Any, bool] = {F.dropout: False, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True}
_SAMPLED_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ALPHA_MODULES = (nn.AlphaDropout, nn.FeatureAlphaDropout)


def _score_dtype_of(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class SharedMaskDropout(TorchFunctionMode):
    """Inside this mode, every dropout call with ``p > 0`` applies one mask shared by the batch.

    The mask covers one input's shape (``input.shape[1:]``; one value per
    channel for ``dropout1d/2d/3d``), is drawn on the CPU from ``generator``
    (so masks do not depend on the device or dtype) and scales kept units by
    ``1 / (1 - p)``, as dropout does in training. Calls are intercepted
    whatever their ``training`` flag, so ``nn.Dropout`` modules and timm's
    functional head dropout (``F.dropout(x, self.drop_rate, self.training)``)
    are both sampled while the model stays in eval mode (BatchNorm on its
    running statistics).

    Args:
        generator: the CPU generator the masks of this pass are drawn from, in call order.

    Attributes:
        calls: how many dropout calls with ``p > 0`` were sampled so far.
    """

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator
        self.calls = 0

    def __torch_function__(
        self, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _DROPOUT_FUNCTIONS:
            return func(*args, **kwargs)
        inputs = args[0]
        p = float(kwargs["p"] if "p" in kwargs else args[1] if len(args) > 1 else 0.5)
        if p == 0:
            return inputs
        self.calls += 1
        if _DROPOUT_FUNCTIONS[func]:
            shape = (1, inputs.shape[1], *([1] * (inputs.ndim - 2)))
        else:
            shape = (1, *inputs.shape[1:])
        keep = torch.rand(shape, generator=self.generator) >= p
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        return inputs * (keep.to(device=inputs.device, dtype=inputs.dtype) * scale)


def sampled_generators(samples: int, seed: int) -> list[torch.Generator]:
    """One CPU generator per Monte Carlo pass, seeded from ``seed`` (distinct seeds give distinct passes)."""
    seeds = torch.randint(0, 2**62, (samples,), generator=torch.Generator().manual_seed(int(seed)))
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def mc_dropout_log_probabilities(tap: Tap, x: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """``log p̄(y|x) = log (1/T) Σ_t softmax(f(x; ω_t))`` over ``T = samples`` dropout passes, float64 [B, K].

    When no dropout runs inside ``forward_features`` (dropout only in the
    head, as timm's ``drop_rate`` places it), the feature maps are computed
    once and only ``forward_head`` is repeated.

    Raises:
        IncompatibleModelError: no dropout with ``p > 0`` ran in the forward pass.
    """
    has_features = tap.head_info.kind != "opaque"
    features = None  # deterministic features, reused by every pass
    total = None
    for t, generator in enumerate(sampled_generators(samples, seed)):
        with SharedMaskDropout(generator) as dropout:
            if features is not None:
                logits = tap.head(features)
            elif has_features:
                maps = tap.features(x)
                if t == 0 and dropout.calls == 0:
                    features = maps
                logits = tap.head(maps)
            else:
                logits = tap.logits(x)
        if t == 0 and dropout.calls == 0:
            raise IncompatibleModelError(
                "mc-dropout found no dropout with p > 0 in the model's forward pass, so every pass would "
                "be the same network; create the model with dropout, e.g. timm.create_model(name, "
                "drop_rate=0.2)"
            )
        log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
        total = log_p if total is None else torch.logaddexp(total, log_p)
    if total is None:  # no pass ran
        raise ValueError(f"mc-dropout: samples must be an integer >= 1, got {samples!r}")
    return total - math.log(samples)


def _check_dropout(model: nn.Module, who: str) -> None:
    """Raise IncompatibleModelError unless the model has dropout that ``mc-dropout`` can sample."""
    sampled = []
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, _ALPHA_MODULES) and module.p > 0:
            raise IncompatibleModelError(
                f"{who}: {label} is {type(module).__name__}, which keeps SELU statistics rather than "
                "zeroing units; Monte Carlo dropout samples nn.Dropout only"
            )
        attention_dropout = getattr(module, "attn_drop", None)
        if getattr(module, "fused_attn", False) and isinstance(attention_dropout, nn.Dropout) and attention_dropout.p > 0:
            raise IncompatibleModelError(
                f"{who}: the attention dropout of {label} runs inside fused scaled_dot_product_attention, "
                "which switches it off in eval mode, so it cannot be sampled. Call "
                "timm.layers.set_fused_attn(False) before creating the model, or create it without "
                "attn_drop_rate."
            )
        rate = getattr(module, "drop_rate", None)
        if (isinstance(module, _SAMPLED_MODULES) and module.p > 0) or (
            isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0
        ):
            sampled.append(label)
    if not sampled:
        raise IncompatibleModelError(
            f"{who} samples dropout at inference, but {type(model).__name__} has no dropout with p > 0. "
            "Create the model with dropout, e.g. timm.create_model(name, drop_rate=0.2) (timm's head "
            "dropout), and preferably train it with dropout, as Monte Carlo dropout assumes."
        )


class MCDropout(Detector):
    """Monte Carlo dropout (Gal & Ghahramani, Dropout as a Bayesian Approximation, ICML 2016).

    Dropout stays on at inference: ``T`` stochastic passes are ``T`` networks
    ``ω_t`` sampled from the approximate posterior, and the predictive
    distribution is their Monte Carlo average (the paper's "MC dropout",
    Sec. 4): ``p̄(y|x) = (1/T) Σ_t softmax(f(x; ω_t))``. The paper does not
    define a scalar OOD score; this detector scores the predictive
    distribution's confidence, ``max_y p̄(y|x)`` (higher = in-distribution),
    returned negated and in log space, ``-log max_y p̄(y|x)``, as OpenOOD's
    and pytorch-ood's (``mode="mean"``) MC dropout. See the module docstring
    for how masks are drawn (one network per pass, shared by the batch).

    Which dropout is sampled: every ``nn.Dropout`` (1d/2d/3d) and functional
    ``F.dropout`` call with ``p > 0`` (timm's ``drop_rate`` head dropout,
    ``proj_drop_rate``, ``pos_drop_rate``...). Not sampled: stochastic depth
    (``drop_path_rate``) and DropBlock, which are not dropout; attention
    dropout inside fused attention and alpha dropout are refused with
    IncompatibleModelError. CNNs and ViTs alike; on a model without dropout
    the wrapper raises IncompatibleModelError at ``wrap`` time.

    Cost: ``T`` forward passes; when dropout sits only after
    ``forward_features`` (timm's ``drop_rate``), one feature pass and ``T``
    head passes.

    Args:
        samples: number of passes T (the paper fixes none; 30, as pytorch-ood:
            the Monte Carlo estimate's variance falls as 1/T).
        seed: seeds the masks; scores are deterministic for a given seed.
    """

    name = "mc-dropout"
    paper = ("Gal & Ghahramani, Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep "
             "Learning, ICML 2016, Sec. 4: p(y|x) ~ (1/T) sum_t softmax(f(x; w_t))")
    requirements = Requirements(outputs=frozenset())
    #: nothing to tune: more passes estimate the same distribution better, and the dropout rate is the model's
    search_space: ClassVar = MappingProxyType({})

    def __init__(self, samples: int = 30, seed: int = 0) -> None:
        super().__init__()
        self.samples = samples
        self.seed = seed
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"mc-dropout: samples must be an integer >= 1, got {self.samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"mc-dropout: seed must be an integer, got {self.seed!r}")

    def check_model(self, tap: Tap) -> None:
        who = f"detector {self.name!r}"
        super().check_model(tap)
        tap.check_available({Need.LOGITS}, who)
        _check_dropout(tap.model, who)

    def score(self, outputs: Outputs) -> torch.Tensor:
        x = outputs.inputs
        log_mean = mc_dropout_log_probabilities(outputs.tap, x, int(self.samples), int(self.seed))
        return -log_mean.amax(dim=1).to(_score_dtype_of(x))


class EnsembleModel(nn.Module):
    """Several classifiers of the same classes and inputs, as one model (a deep ensemble).

    ``forward(x)`` returns the ensemble's predictive distribution in log
    space, ``log p̄(y|x) = log (1/M) Σ_m softmax(f_m(x))`` (Lakshminarayanan
    et al., Sec. 2.4): its argmax is the ensemble's prediction, and a logit
    detector reads it as logits (``softmax(log p̄) = p̄``). The members are
    submodules, so ``.to()``, ``.eval()`` and ``state_dict()`` cover them all.

    The ensemble takes the inputs its members take: ``pretrained_cfg`` holds
    the members' common input size and normalisation, so timm's and
    timm-ood's data configs, loaders and the conformance kit work on it.

    Saving and loading: the members' weights are the models' own, never a
    detector's state. Save each member as usual (a timm checkpoint, or
    ``safetensors.torch.save_model(member, path)``), or the whole ensemble
    with ``safetensors.torch.save_model(ensemble, path)``; to load, build the
    members again and pass them to ``EnsembleModel`` (then ``load_model``
    for a whole-ensemble file). A wrapped ensemble's ``save_detector`` stores
    the detector's name and calibrated threshold only.

    Args:
        members: timm classifiers (trained from different random
            initialisations, as the paper's ensembles) with the same number
            of classes and the same input size and normalisation.

    Raises:
        ValueError: no members, or members that disagree on classes or inputs.
        IncompatibleModelError: a member without a classifier, or whose inputs
            cannot be read from its timm data config.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("an EnsembleModel needs at least one member model")
        classes = []
        for index, member in enumerate(members):
            head = inspect_head(member)
            if head.num_classes <= 0:
                raise IncompatibleModelError(
                    f"ensemble member {index} ({type(member).__name__}) has no classifier (num_classes "
                    f"{head.num_classes}); every member must return logits over the same classes"
                )
            classes.append(head.num_classes)
        if len(set(classes)) > 1:
            raise ValueError(f"ensemble members predict different numbers of classes: {classes}")
        configs = [data_config(member) for member in members]
        inputs = [(tuple(c["input_size"]), tuple(c["mean"]), tuple(c["std"])) for c in configs]
        for index, member_inputs in enumerate(inputs[1:], start=1):
            if member_inputs != inputs[0]:
                raise ValueError(
                    f"ensemble member {index} takes inputs (size, mean, std) {member_inputs} but member 0 "
                    f"takes {inputs[0]}: every member must take the same images"
                )
        self.members = nn.ModuleList(members)
        self.num_classes = classes[0]
        self.pretrained_cfg = self._input_cfg(members, configs[0])

    @staticmethod
    def _input_cfg(members: list[nn.Module], config: dict[str, Any]) -> dict[str, Any]:
        """Member 0's ``pretrained_cfg`` with the common inputs, its stem's new name, and every architecture."""
        cfg = dict(getattr(members[0], "pretrained_cfg", None) or {})
        architectures = [str((getattr(m, "pretrained_cfg", None) or {}).get("architecture", type(m).__name__))
                         for m in members]
        cfg.update(input_size=tuple(config["input_size"]), mean=tuple(config["mean"]), std=tuple(config["std"]),
                   architecture=f"ensemble[{','.join(architectures)}]")
        first_conv = cfg.get("first_conv")
        if isinstance(first_conv, str):
            cfg["first_conv"] = f"members.0.{first_conv}"
        elif isinstance(first_conv, (list, tuple)):
            cfg["first_conv"] = [f"members.0.{name}" for name in first_conv]
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log p̄(y|x)`` [B, K]: the log of the members' mean softmax, in the members' dtype."""
        log_probabilities = torch.stack([member(x).log_softmax(dim=-1) for member in self.members])
        return torch.logsumexp(log_probabilities, dim=0) - math.log(len(self.members))


class DeepEnsemble(Detector):
    """Deep ensembles (Lakshminarayanan, Pritzel & Blundell, NeurIPS 2017): predictive entropy.

    The ensemble's predictive distribution ``p̄(y|x) = (1/M) Σ_m p_m(y|x)``
    (Sec. 2.4) is what an :class:`EnsembleModel` returns (as ``log p̄``); the
    score is its entropy ``H(p̄) = -Σ_y p̄(y|x) log p̄(y|x)``, the measure the
    paper uses for inputs of unknown classes (Sec. 3.5), higher = more OOD.
    It equals ``entropy`` applied to the ensemble; ``msp`` on the ensemble
    gives the paper's other measure, the confidence ``max_y p̄(y|x)``.

    Usage::

        members = [timm.create_model("resnet18", num_classes=10, checkpoint_path=p) for p in paths]
        model = timm_ood.wrap(EnsembleModel(members), "deep-ensemble")

    The detector has no hyperparameters and no fitted state; the members are
    the model (see :class:`EnsembleModel` for saving and loading). Any member
    architecture works (CNNs, ViTs). A model that is not an
    :class:`EnsembleModel` is refused with IncompatibleModelError.
    """

    name = "deep-ensemble"
    paper = ("Lakshminarayanan, Pritzel & Blundell, Simple and Scalable Predictive Uncertainty Estimation "
             "using Deep Ensembles, NeurIPS 2017, Sec. 2.4 and 3.5: H((1/M) sum_m p_m(y|x))")
    requirements = Requirements(outputs=frozenset({Need.LOGITS}))
    #: nothing to tune: the score has no hyperparameter
    search_space: ClassVar = MappingProxyType({})

    def check_model(self, tap: Tap) -> None:
        if not isinstance(tap.model, EnsembleModel):
            raise IncompatibleModelError(
                f"detector {self.name!r} scores an ensemble of models, but got a single "
                f"{type(tap.model).__name__}; wrap the members together: timm_ood.wrap("
                "EnsembleModel([model_1, model_2, ...]), 'deep-ensemble') with "
                "EnsembleModel from timm_ood.detectors.sampling"
            )
        super().check_model(tap)

    def score(self, outputs: Outputs) -> torch.Tensor:
        logits = outputs.logits
        log_mean = torch.log_softmax(logits.to(torch.float64), dim=1)  # log p̄, renormalised in float64
        return -(log_mean.exp() * log_mean).sum(dim=1).to(_score_dtype_of(logits))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [MCDropout, DeepEnsemble]
