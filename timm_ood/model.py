"""``OODModel``: a timm model with an OOD detector attached, in one line.

::

    model = timm_ood.wrap(timm.create_model("resnet18", num_classes=10), "odin")
    model.fit(id_train_loader)          # only detectors that need it read the data
    scores = model.ood_score(images)    # Tensor[B], higher = more out-of-distribution
    logits = model(images)              # the timm model's own forward, unchanged
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._runtime import model_device
from .detectors import create_detector
from .detectors.base import Detector
from .errors import NotFittedError
from .fitting import fit_detectors, fit_held_out
from .passes import score_batch
from .pretrained import HubMixin
from .scoring import score_sets
from .serialization import load_detector, save_detector
from .store import BoundStore, FeatureStore, as_store
from .tap import Tap

__all__ = ["OODModel", "create_model", "wrap"]

#: the safetensors metadata key of the TPR the threshold was calibrated at
THRESHOLD_TPR_METADATA = "timm_ood.threshold_tpr"


class OODModel(HubMixin, nn.Module):
    """A timm model plus one detector; behaves like the timm model everywhere else.

    ``forward`` is the timm model's forward. Attribute access falls through to
    the timm model (``pretrained_cfg``, ``num_classes``, ``forward_features``,
    ...). ``.to()``, ``.eval()``, ``.half()`` move the model and the detector's
    fitted state together.

    Scoring, fitting and calibration run the model in eval mode (restoring its
    mode afterwards), so scores never depend on the rest of the batch.
    Scores are in the model's dtype, at least float32.

    Args:
        model: a timm model (or any ``nn.Module`` returning logits, for logit
            detectors).
        detector: the detector instance.
    """

    #: the calibrated score threshold (a buffer; None until :meth:`calibrate` or a load sets it)
    threshold: torch.Tensor | None

    def __init__(self, model: nn.Module, detector: Detector) -> None:
        super().__init__()
        if isinstance(model, OODModel):
            raise ValueError(
                "the model is already wrapped; wrap its timm model instead: wrap(ood_model.model, ...)"
            )
        self.model = model
        self.detector = detector
        self.tap = Tap(model)
        detector.check_model(self.tap)
        self.register_buffer("threshold", None)
        #: the fraction of in-distribution inputs :meth:`calibrate` accepted at ``threshold`` (None when unknown)
        self.threshold_tpr: float | None = None
        #: how ``create_model``/``from_pretrained`` made the timm model (name, pretrained, kwargs); None for wrap()
        self.timm_creation: dict[str, Any] | None = None
        self._sync_detector_placement()

    # -- behaving like the timm model ------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, unchanged (logits for a timm classifier)."""
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "model" not in modules:
                raise
            return getattr(modules["model"], name)

    def _sync_detector_placement(self) -> None:
        self.detector.to(device=model_device(self.model))

    # -- scoring ---------------------------------------------------------------
    def ood_score(self, x: torch.Tensor) -> torch.Tensor:
        """OOD scores [B] for a batch of images, higher = more out-of-distribution.

        Args:
            x: float images [B, C, H, W], normalised as the model expects
                (``timm_ood.data.make_loader`` does this).

        Raises:
            NotFittedError: the detector needs ``fit`` first.
            ValueError / TypeError: the images do not fit the model (channels,
                shape, dtype); a NaN score.
        """
        self.detector.check_fitted()
        return score_batch(self.tap, self.detector, x)

    def fit(
        self, data: Iterable, *, progress: bool | None = None, cache_dir: str | os.PathLike | FeatureStore | None = None
    ) -> OODModel:
        """Fit the detector on in-distribution training data; a no-op for detectors without fit.

        Args:
            data: a Hugging Face dataset with ``image`` and ``label`` columns (prepared with
                the model's data config, 256 images a batch), a DataLoader, or any iterable of
                ``(images, labels)`` batches
                (or mappings with ``image``/``label``).
            progress: show a progress bar (default: on a terminal).
            cache_dir: a feature store (:mod:`timm_ood.store`): the model's
                outputs of data made by ``timm_ood.data.make_loader`` are read
                from it when stored, else computed and stored.

        Returns:
            self, for chaining.
        """
        fit_detectors(self.tap, [self.detector], self._batches(data, "fit data"), progress=progress,
                      store=self._store(cache_dir))
        return self

    def fit_held_out(
        self, id_data: Iterable, ood_data: Iterable | None = None, *, progress: bool | None = None,
        cache_dir: str | os.PathLike | FeatureStore | None = None,
    ) -> OODModel:
        """Run the detector's held-out step after :meth:`fit` (a no-op for detectors without one).

        ``gram``: the layer normalisers ``E[δ_l]`` on held-out in-distribution
        data (Sastry & Oore's validation step). ``multi-mahalanobis``: the
        layer weights by logistic regression on held-out in-distribution and
        OOD data (Lee et al., Sec. 3). Other detectors declare no step.

        Args:
            id_data: held-out in-distribution batches, not the fit data.
            ood_data: held-out OOD (or adversarial) batches, for detectors that read them.
            progress: show progress bars (default: on a terminal).
            cache_dir: a feature store, as in :meth:`fit`.

        Returns:
            self, for chaining.
        """
        fit_held_out(self.tap, [self.detector], self._batches(id_data, "held-out ID data"),
                     self._batches(ood_data, "held-out OOD data"), progress=progress,
                     store=self._store(cache_dir))
        return self

    def score_data(
        self, data: Iterable, *, progress: bool | None = None, desc: str = "score",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (float64, CPU) and labels (None when the batches have none) of every image of ``data``.

        Under torch.distributed every rank scores its part of the data and
        gets the scores of all ranks, in rank order. ``desc`` labels the
        progress bar, followed by "images" ("score images").
        """
        scored = score_sets(self.tap, [self.detector], {"images": self._batches(data, None)}, labels=["score"],
                            with_predictions=False,
                            progress=progress, desc=desc)
        return scored.scores["score"]["images"], scored.labels.get("images")

    def _batches(self, data: Any, name: str | None) -> Any:
        """A Hugging Face dataset as a loader shaped for this model; loaders and batches as they are.

        ``name`` names the dataset in errors (None: the dataset's own name).
        """
        from .data.loaders import as_batches

        return None if data is None else as_batches(data, self.model, name=name)

    def _store(self, cache_dir: str | os.PathLike | FeatureStore | None) -> BoundStore | None:
        store = as_store(cache_dir)
        return None if store is None else store.bind(self.model)

    def calibrate(self, id_data: Iterable, tpr: float = 0.95, *, progress: bool | None = None) -> float:
        """Store the threshold that accepts a fraction ``tpr`` of in-distribution inputs.

        The threshold is the smallest score ``t`` with ``P_ID(score <= t) >=
        tpr``, the same ``t*`` at which FPR@95TPR is read
        (``docs/metrics.md``). :meth:`predict` flags ``score > t`` as OOD.

        Args:
            id_data: in-distribution data not used for fitting (validation data): a Hugging Face
                dataset, a DataLoader or an iterable of batches, as in :meth:`fit`.
            tpr: fraction of in-distribution inputs to accept, in (0, 1].

        Returns:
            The threshold, also stored in ``self.threshold`` (and ``tpr`` in
            ``self.threshold_tpr``; both saved with :meth:`save_detector`).
        """
        if not 0 < tpr <= 1:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        scores, _ = self.score_data(id_data, progress=progress, desc="calibrate the threshold on ID")
        ordered = scores.sort().values
        accepted = torch.arange(1, ordered.numel() + 1, dtype=torch.float64) / ordered.numel()
        index = int((accepted < tpr).sum())
        self.threshold = ordered[index].to(model_device(self.model))
        self.threshold_tpr = float(tpr)
        return float(self.threshold)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean [B], True where the input is flagged out-of-distribution (``score > threshold``).

        Raises:
            NotFittedError: :meth:`calibrate` has not set a threshold.
        """
        if self.threshold is None:
            raise NotFittedError(
                "no threshold: call model.calibrate(id_validation_loader, tpr=0.95) first, or set "
                "model.threshold = torch.tensor(t)"
            )
        scores = self.ood_score(x)
        return scores > self.threshold.to(scores)

    # -- state -----------------------------------------------------------------
    def save_detector(self, path: str | os.PathLike) -> None:
        """Save the detector's name, hyperparameters, fitted state, threshold and its TPR (safetensors)."""
        extra = {} if self.threshold is None else {"threshold": self.threshold}
        architecture = str((getattr(self.model, "pretrained_cfg", None) or {}).get("architecture", ""))
        metadata = {"timm_ood.architecture": architecture}
        if self.threshold is not None and self.threshold_tpr is not None:
            metadata[THRESHOLD_TPR_METADATA] = repr(float(self.threshold_tpr))
        save_detector(self.detector, path, extra_tensors=extra, extra_metadata=metadata)

    def load_detector(self, path: str | os.PathLike, *, strict: bool = True) -> OODModel:
        """Load a detector saved by :meth:`save_detector`; replaces the current one.

        Nothing in the file is executed: the detector is created by its
        registered name and its tensors are installed. The file's model
        fingerprint is compared with this model (:mod:`timm_ood.fingerprint`;
        reads all its weights once, ~0.1 s for a resnet50).

        Args:
            path: the safetensors file.
            strict: False loads a state fitted on other weights of the same
                architecture with a warning instead of an error (another class
                count, feature width or input channel count always raises).

        Raises:
            IncompatibleModelError: the detector was fitted on another model
                (the message says what differs), or cannot serve this one.

        Warns:
            UserWarning: the file has no fingerprint (written before timm-ood
                recorded them), so it cannot be checked.
        """
        detector, extras, metadata = load_detector(path, device=model_device(self.model))
        detector.check_model(self.tap)
        self._check_fitted_for_model(detector, f"{os.fspath(path)!r}", strict=strict, fix=(
            "Fit it again on this model with model.fit(id_train_loader) and save it again, or load the file "
            "into the model it was fitted on."
        ), hatch="To use it anyway, load it with load_detector(path, strict=False), which only warns.")
        self.detector = detector
        self.threshold = extras["threshold"].to(model_device(self.model)) if "threshold" in extras else None
        tpr = metadata.get(THRESHOLD_TPR_METADATA) if self.threshold is not None else None
        self.threshold_tpr = None if tpr is None else float(tpr)
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, then the detector's fitted state is checked against the model.

        A detector buffer whose shape differs raises
        :class:`~timm_ood.errors.IncompatibleModelError` naming it; a state fitted
        on another model raises it too (with ``strict=False`` a state fitted on
        other weights of the same architecture only warns).
        """
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync_detector_placement()
        self._check_fitted_for_model(self.detector, "the loaded state_dict", strict=strict, fix=(
            "Fit the detector again on this model with model.fit(id_train_loader), or load the state into the "
            "model it was fitted on."
        ), hatch="To use it anyway, load it with load_state_dict(state_dict, strict=False), which only warns.")
        return result

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # an uncalibrated model (threshold None, so no such key of its own) takes a calibrated state's threshold
        tensor = state_dict.get(prefix + "threshold")
        if self.threshold is None and isinstance(tensor, torch.Tensor):
            self._buffers["threshold"] = tensor.detach().clone().to(model_device(self.model))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_fitted_for_model(self, detector: Detector, source: str, *, strict: bool, fix: str, hatch: str) -> None:
        """Compare the detector's fingerprint (weights included) with this model; warn when it has none."""
        if not (detector.requirements.fit and detector.is_fitted):
            return
        if detector.model_fingerprint is None:
            warnings.warn(
                f"{source} holds a fitted {detector.name!r} detector without a model fingerprint (saved before "
                "timm-ood recorded them), so it cannot be checked against this model: make sure it was fitted "
                "on this very model, or fit it again with model.fit(id_train_loader) and save it again.",
                UserWarning, stacklevel=3,
            )
            return
        detector.check_fingerprint(self.model, weights=True, strict=strict, fix=fix, hatch=hatch)

    def extra_repr(self) -> str:
        threshold = "" if self.threshold is None else f", threshold={float(self.threshold):.6g}"
        return f"detector={self.detector.name!r}{threshold}"


def _as_detector(detector: str | Detector | type[Detector], kwargs: dict[str, Any]) -> Detector:
    if isinstance(detector, Detector):
        if kwargs:
            raise TypeError("pass hyperparameters either to the detector instance or to wrap(), not both")
        return detector
    if isinstance(detector, type) and issubclass(detector, Detector):
        return detector(**kwargs)
    if isinstance(detector, str):
        return create_detector(detector, **kwargs)
    raise TypeError(f"detector must be a registered name, a Detector or a Detector class; got {detector!r}")


def wrap(model: nn.Module, detector: str | Detector | type[Detector] = "msp", **detector_kwargs: Any) -> OODModel:
    """Attach an OOD detector to a timm model.

    Args:
        model: a timm model (``timm.create_model(...)``).
        detector: a registered detector name (see ``list_detectors()``), a
            :class:`~timm_ood.Detector` instance, or a Detector class.
        **detector_kwargs: the detector's hyperparameters (e.g.
            ``temperature=1000, epsilon=0.0014`` for ``"odin"``).

    Returns:
        An :class:`OODModel`: the model's forward unchanged, plus
        ``ood_score``, ``fit``, ``calibrate``, ``predict``.

    Raises:
        UnknownNameError: unknown detector name (lists the known ones).
        IncompatibleModelError: the model cannot give what the detector needs.
    """
    return OODModel(model, _as_detector(detector, detector_kwargs))


def create_model(
    model_name: str,
    detector: str | Detector | type[Detector] = "msp",
    detector_kwargs: dict[str, Any] | None = None,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> OODModel:
    """``timm.create_model(model_name, pretrained=..., **timm_kwargs)`` wrapped with a detector, in one call.

    ::

        ood = timm_ood.create_model("convnext_tiny.fb_in22k_ft_in1k", pretrained=True, detector="vim")
        ood = timm_ood.create_model("resnet50.a1_in1k", weights="resnet50.safetensors", detector="knn")  # offline

    Args:
        model_name: a timm name, with its pretrained tag, or an ``hf_hub:`` id.
        detector: a registered detector name, instance or class.
        detector_kwargs: the detector's hyperparameters.
        pretrained: load the tag's pretrained weights (timm downloads and caches them).
        weights: a local ``.safetensors``/``.pth`` state dict instead, through timm's
            ``pretrained_cfg_overlay=dict(file=...)`` (implies ``pretrained``).
        **timm_kwargs: passed to ``timm.create_model``.

    Raises:
        UnknownModelError / WeightsUnavailableError: see :func:`timm_ood.timm_models.create_timm_model`.
    """
    from .timm_models import create_timm_model

    model = create_timm_model(model_name, pretrained=pretrained or weights is not None, weights=weights,
                              **timm_kwargs)
    ood_model = wrap(model, detector, **(detector_kwargs or {}))
    # what save_pretrained records to rebuild it: whether the weights are the tag's (None: a local file, which
    # may or may not hold them; from_pretrained then compares the weights' sha256), the model's kwargs
    ood_model.timm_creation = {"model_name": model_name, "pretrained": None if weights is not None else pretrained,
                               "kwargs": dict(timm_kwargs)}
    return ood_model

