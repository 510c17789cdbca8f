"""Fitted detectors as Hugging Face Hub artifacts: ``save_pretrained``, ``push_to_hub``, ``from_pretrained``.

::

    ood = timm_ood.create_model("convnext_tiny.fb_in22k_ft_in1k", pretrained=True, detector="vim")
    ood.fit(loader); ood.calibrate(val_loader)
    ood.save_pretrained("./convnext-vim")            # detector state, config, model card
    ood.push_to_hub("my-org/convnext-tiny-vim")      # the same folder on the Hub
    ood = timm_ood.from_pretrained("my-org/convnext-tiny-vim")   # timm model + fitted detector + threshold

A folder holds three files (see ``docs/hub.md``):

- ``detector.safetensors``: the fitted state, hyperparameters, the fingerprint
  of the model it was fitted on and the threshold (:mod:`timm_ood.serialization`).
- ``config.json``: what rebuilds the timm model (architecture, pretrained tag,
  class and channel counts, the data-config overlay, the sha256 of its weights)
  and names the detector, its hyperparameters and the threshold's TPR.
- ``README.md``: a model card (``huggingface_hub.ModelCard``) with the
  evaluation results as ``model-index`` and the expected false-positive rate
  at the threshold.

The folder holds no model weights: :func:`from_pretrained` gets them from timm
(the pretrained tag) or from the user (``weights=FILE``), and refuses a
detector whose model fingerprint does not match them. Nothing is pickled and
nothing in the folder is executed: the config is JSON, the state safetensors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from ._runtime import package_version
from .detectors import create_detector
from .errors import FormatVersionError, HubUnavailableError, IncompatibleModelError
from .fingerprint import _digest, precisions_of
from .model_info import input_channels
from .tap import inspect_head

if TYPE_CHECKING:
    from .evaluation.results import EvaluationResults
    from .model import OODModel

__all__ = [
    "CONFIG_NAME",
    "DETECTOR_NAME",
    "FORMAT_VERSION",
    "MODEL_CARD_NAME",
    "HubMixin",
    "push_to_hub",
    "save_pretrained",
]

#: the version of the folder layout and ``config.json`` schema; another one is refused
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
DETECTOR_NAME = "detector.safetensors"
MODEL_CARD_NAME = "README.md"
FILES = (CONFIG_NAME, DETECTOR_NAME, MODEL_CARD_NAME)
LIBRARY_NAME = "timm-ood"
CARD_TAGS = ["timm", "out-of-distribution-detection", "timm-ood"]
#: ``pretrained_cfg`` keys that make up the data config (preprocessing), recorded when they differ from the tag's
DATA_CONFIG_KEYS = ("input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation",
                    "crop_pct", "test_crop_pct", "crop_mode", "mean", "std")
#: ``create_model`` keyword arguments recorded elsewhere in the config (or never: where the weights come from)
_NOT_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "num_classes",
               "in_chans", "cache_dir", "weights"}
_OFFLINE_FIX = ("run once with network access (unset HF_HUB_OFFLINE) so huggingface_hub caches it, or pass the "
                "local folder written by save_pretrained: timm_ood.from_pretrained('./folder')")


# -- the config ---------------------------------------------------------------------
def weights_sha256(model: nn.Module, precision: str = "float32") -> str:
    """sha256 (64 hex digits) of every ``state_dict`` tensor, floating ones cast to ``precision``.

    The same bytes as the fingerprint's whole-model digest
    (:mod:`timm_ood.fingerprint`), whose 16 digits are its first 16.
    """
    return _digest(sorted(model.state_dict().items()), precision, length=64)


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively; raises TypeError for what JSON cannot hold."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{type(value).__name__} is not JSON")


def _tuples(value: Any) -> Any:
    """Lists back to the tuples timm's pretrained_cfg holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _default_cfg(architecture: str, tag: str | None) -> dict[str, Any]:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(f"{architecture}.{tag}" if tag else architecture)
    except (RuntimeError, KeyError, ValueError):
        return {}
    return {} if cfg is None else cfg.to_dict()


def _model_config(ood_model: OODModel) -> dict[str, Any]:
    model = ood_model.model
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if not cfg.get("architecture"):
        raise ValueError(
            f"save_pretrained needs a timm model (one with a pretrained_cfg naming its architecture); this is a "
            f"{type(model).__name__}: save the detector alone with ood_model.save_detector('detector.safetensors')"
        )
    architecture, tag = str(cfg["architecture"]), cfg.get("tag") or None
    default = _default_cfg(architecture, tag)
    overlay = {}
    for key in DATA_CONFIG_KEYS:
        if key in cfg and cfg[key] is not None and (not default or _jsonable(cfg[key]) != _jsonable(default.get(key))):
            overlay[key] = _jsonable(cfg[key])
    creation = getattr(ood_model, "timm_creation", None) or {}
    kwargs, unsaved = {}, []
    for key, value in dict(creation.get("kwargs") or {}).items():
        if key in _NOT_KWARGS:
            continue
        try:
            kwargs[key] = _jsonable(value)
        except TypeError:
            unsaved.append(key)
    if unsaved:
        warnings.warn(
            f"config.json cannot record the model's keyword argument(s) {', '.join(unsaved)} (not JSON): pass them "
            "to from_pretrained(..., **kwargs) when loading", UserWarning, stacklevel=4)
    precision = precisions_of(model.state_dict().values())[0]
    file = cfg.get("file")
    num_classes = inspect_head(model).num_classes

    return {
        "architecture": architecture,
        "tag": tag,
        "hf_hub_id": cfg.get("hf_hub_id") or None,
        # whether create_model(..., pretrained=True) made it (None: wrapped, unknown) and where its
        # pretrained_cfg says the weights come from; weights_sha256 identifies the weights themselves
        "pretrained": creation.get("pretrained"),
        "pretrained_file": os.path.basename(os.fspath(file)) if file else None,
        "num_classes": None if num_classes is None else int(num_classes),
        "in_chans": int(input_channels(model)),
        "pretrained_cfg_overlay": overlay,
        "kwargs": kwargs,
        "weights_sha256": weights_sha256(model, precision),
        "weights_precision": precision,
    }


def _config(ood_model: OODModel) -> dict[str, Any]:
    detector = ood_model.detector
    threshold = None if ood_model.threshold is None else float(ood_model.threshold)
    return {
        "library": LIBRARY_NAME,
        "format": FORMAT_VERSION,
        "timm_ood_version": package_version(),
        "model": _model_config(ood_model),
        "detector": {
            "name": detector.name,
            "hyperparameters": json.loads(json.dumps(detector.hyperparameters(), default=list)),
            "fitted": bool(detector.is_fitted),
            "file": DETECTOR_NAME,
        },
        "threshold": threshold,
        "threshold_tpr": None if threshold is None else ood_model.threshold_tpr,
    }


def _model_name(config: Mapping[str, Any]) -> str:
    model = config["model"]
    return f"{model['architecture']}.{model['tag']}" if model.get("tag") else str(model["architecture"])


def _needs_weights(config: Mapping[str, Any]) -> bool:
    """The weights are not the tag's as far as the config knows: no tag, or made with pretrained=False."""
    model = config["model"]
    return not model.get("tag") or model.get("pretrained") is False


# -- the model card -----------------------------------------------------------------
def _results_label(results: EvaluationResults, detector_name: str) -> str:
    if detector_name in results.detectors:
        return detector_name
    siblings = [label for label in results.detectors if label.startswith(detector_name + "(")]
    if len(siblings) == 1:
        return siblings[0]
    raise ValueError(
        f"results= holds the detectors {results.detectors}, "
        f"{'several' if siblings else 'none'} of them this model's {detector_name!r}: pass the results of "
        f"timm_ood.evaluate(ood_model.model, [{detector_name!r}], ...) (or of this model's detector alone)"
    )


def _percent(value: float) -> float:
    return round(100 * float(value), 2)


def _fpr_at_threshold(results: EvaluationResults, label: str, tpr: float) -> dict[str, float] | None:
    """FPR at TPR=tpr (ID positive) on each OOD set, from the metrics or the raw scores; None when unknown."""
    settings = results.settings or {}
    if settings.get("positive", "id") == "id" and math.isclose(float(settings.get("tpr", 0.95)), tpr):
        return {name: results.metrics[label][name]["fpr_at_tpr"] for name in results.ood_sets}
    if results.scored is None:
        return None
    import torch

    from .metrics.functional import fpr_at_tpr

    scores = results.scored.scores[label]
    id_scores = scores[settings.get("id_set", "id")]
    out = {}
    for name in results.ood_sets:
        is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(scores[name]))])
        out[name] = float(fpr_at_tpr(torch.cat([id_scores, scores[name]]), is_ood, tpr=tpr, positive="id"))
    return out


def _card(config: Mapping[str, Any], results: EvaluationResults | None, repo_id: str | None):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .evaluation.results import METRIC_TITLES, markdown_table

    model, detector = config["model"], config["detector"]
    timm_name = _model_name(config)
    name = repo_id.split("/")[-1] if repo_id else f"{timm_name}-{detector['name']}"
    threshold, tpr = config.get("threshold"), config.get("threshold_tpr")
    eval_results, table, expected = [], "", []
    if results is not None:
        label = _results_label(results, detector["name"])
        settings = results.settings or {}
        id_set = settings.get("id_set", "id")
        reading = "ID positive" if settings.get("positive", "id") == "id" else "OOD positive"
        results_tpr = float(settings.get("tpr", 0.95))
        metric_names = [m for m in ("auroc", "fpr_at_tpr", "aupr_in", "aupr_out", "detection_error")
                        if all(m in results.metrics[label][s] for s in results.ood_sets)]
        rows = []
        for ood_set in results.ood_sets:
            values = results.metrics[label][ood_set]
            rows.append([ood_set, *(f"{_percent(values[m]):.2f}" for m in metric_names)])
            for metric in metric_names:
                title = METRIC_TITLES[metric].format(tpr=f"{100 * results_tpr:g}").rstrip(" ↑↓")
                eval_results.append(EvalResult(
                    task_type="out-of-distribution-detection", task_name="Out-of-distribution detection",
                    dataset_type=str(ood_set), dataset_name=f"{results.benchmark}: {ood_set} (OOD) vs {id_set} (ID)",
                    metric_type=metric if metric != "fpr_at_tpr" else f"fpr@{100 * results_tpr:g}tpr",
                    metric_name=f"{title} (%)", metric_value=_percent(values[metric]),
                    metric_config=reading,
                ))
        header = ["OOD set", *(METRIC_TITLES[m].format(tpr=f"{100 * results_tpr:g}") for m in metric_names)]
        accuracy = "" if results.accuracy is None else f" ID accuracy: {100 * results.accuracy:.2f}%."
        table = (f"Benchmark `{results.benchmark}`, in-distribution set `{id_set}`, metric reading {reading}, "
                 f"values in %.{accuracy}\n\n{markdown_table(header, rows)}\n")
        if threshold is not None and tpr is not None:
            fprs = _fpr_at_threshold(results, label, float(tpr))
            if fprs is None:
                expected.append(
                    f"These results were measured at TPR {100 * results_tpr:g}% ({reading}), not at the threshold's "
                    f"TPR {100 * tpr:g}%, and carry no raw scores: evaluate with `tpr={tpr:g}` to state the "
                    "expected false-positive rate at the threshold.")
            else:
                listed = ", ".join(f"{100 * v:.1f}% on `{k}`" for k, v in fprs.items())
                expected.append(
                    f"**Expected false-positive rate at the stored threshold:** it accepts {100 * tpr:g}% of "
                    f"in-distribution inputs, and then accepts (fails to flag) {listed} of the OOD inputs. This "
                    "holds when the in-distribution data it was calibrated on is distributed like the evaluation's "
                    "in-distribution data (and the OOD inputs you meet are like these sets).")
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=list(CARD_TAGS),
        base_model=model.get("hf_hub_id") if not _needs_weights(config) else None,
        model_name=name,
        eval_results=eval_results or None,
    )
    hyperparameters = ", ".join(f"`{k}={v!r}`" for k, v in detector["hyperparameters"].items()) or "none"
    if threshold is None:
        calibration = ("No threshold is stored: call `ood.calibrate(id_validation_loader, tpr=0.95)` before "
                       "`ood.predict`.")
    else:
        at = "" if tpr is None else f", calibrated to accept {100 * tpr:g}% of in-distribution inputs"
        calibration = (f"Threshold: `{threshold:.6g}`{at}. `ood.predict(images)` flags `score > threshold` as "
                       "out-of-distribution.")
    if _needs_weights(config):
        weights_note = (f"The timm model is `{model['architecture']}` with weights of its own, not a pretrained "
                        f"tag's: pass them to `from_pretrained` (sha256 of the weights at {model['weights_precision']}: "
                        f"`{model['weights_sha256']}`).")
        load = f'ood = timm_ood.from_pretrained("{repo_id or "path/to/folder"}", weights="checkpoint.safetensors")'
    else:
        hub = f" ([{model['hf_hub_id']}](https://huggingface.co/{model['hf_hub_id']}))" if model.get("hf_hub_id") else ""
        weights_note = (f"The timm model is `{timm_name}`{hub}; its weights are downloaded by timm, not stored "
                        f"here. A local copy loads with `weights=FILE` (sha256 of the weights the detector was "
                        f"fitted on, at {model['weights_precision']}: `{model['weights_sha256']}`).")
        if model.get("pretrained_file"):
            weights_note += (f" The model was made from a local weights file (`{model['pretrained_file']}`): "
                             "if those are not the tag's weights, `from_pretrained` needs them (`weights=FILE`).")
        load = f'ood = timm_ood.from_pretrained("{repo_id or "path/to/folder"}")'
    body = "\n".join([
        f"# {name}",
        "",
        f"An out-of-distribution detector for the timm model `{timm_name}`, made with "
        f"[timm-ood](https://github.com/timm-ood/timm-ood) {config['timm_ood_version']}: detector "
        f"`{detector['name']}` (hyperparameters: {hyperparameters}), fitted on in-distribution data.",
        "",
        weights_note,
        "",
        "## Usage",
        "",
        "```python",
        "import timm_ood",
        load,
        "scores = ood.ood_score(images)   # Tensor[B], higher = more out-of-distribution",
        "is_ood = ood.predict(images)     # score > the stored threshold",
        "logits = ood(images)             # the timm model's own forward",
        "```",
        "",
        "`from_pretrained` refuses a detector whose model fingerprint does not match the weights it loads.",
        "",
        "## Threshold",
        "",
        calibration,
        *(["", *expected] if expected else []),
        "",
        "## Evaluation",
        "",
        table or "No evaluation results were given (`save_pretrained(..., results=timm_ood.evaluate(...))`).",
        "",
        "## Files",
        "",
        f"- `{DETECTOR_NAME}`: the fitted state, hyperparameters, model fingerprint and threshold (safetensors).",
        f"- `{CONFIG_NAME}`: what rebuilds the timm model, and the detector's name and settings (JSON).",
        "",
        "No pickle: nothing in this repository is executed when loading it.",
        "",
    ])
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


# -- saving -------------------------------------------------------------------------
def save_pretrained(
    ood_model: OODModel,
    save_directory: str | os.PathLike,
    *,
    results: EvaluationResults | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``detector.safetensors``, ``config.json`` and a model card ``README.md`` into a folder.

    Args:
        ood_model: a timm model with its (fitted) detector.
        save_directory: created if missing; the three files are overwritten.
        results: evaluation results (``timm_ood.evaluate``) with this model's detector:
            they go into the card's ``model-index`` and give the expected
            false-positive rate at the threshold.
        repo_id: the Hub repo the card's usage snippet names (``push_to_hub`` passes it).

    Returns:
        The folder.

    Raises:
        ValueError: the model is not a timm model; ``results`` hold another detector.
    """
    if not isinstance(ood_model, HubMixin):
        raise TypeError(f"save_pretrained takes an OODModel (timm_ood.wrap / create_model), got {type(ood_model)}")
    config = _config(ood_model)
    card = _card(config, results, repo_id)
    folder = Path(save_directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    ood_model.save_detector(folder / DETECTOR_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    card.save(folder / MODEL_CARD_NAME)
    return folder


def _connection_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module), name))
    return tuple(errors)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def push_to_hub(
    ood_model: OODModel,
    repo_id: str,
    *,
    results: EvaluationResults | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload timm-ood detector",
    revision: str | None = None,
) -> str:
    """Upload the :func:`save_pretrained` folder to a Hugging Face Hub model repo (created if missing).

    Args:
        ood_model: the model with its fitted detector.
        repo_id: ``"user-or-org/name"``.
        results: evaluation results for the model card (see :func:`save_pretrained`).
        private: create the repo private (only when it does not exist yet).
        token: a Hub token (default: the one ``huggingface-cli login`` stored).
        commit_message: the commit's message.
        revision: the branch to commit to (created if missing); default the main branch.

    Returns:
        The URL of the commit.

    Raises:
        HubUnavailableError: offline (``HF_HUB_OFFLINE=1``) or the Hub cannot be reached.
        PermissionError: not logged in, or the token cannot write to ``repo_id``.
    """
    if _offline():
        raise HubUnavailableError(
            f"cannot push to {repo_id!r}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset "
            "HF_HUB_OFFLINE on a machine with network access, or write the folder with save_pretrained and upload "
            "it later (huggingface-cli upload)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=package_version())
    with tempfile.TemporaryDirectory(prefix="timm-ood-") as folder:
        save_pretrained(ood_model, folder, results=results, repo_id=repo_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            repo_id = getattr(url, "repo_id", None) or repo_id
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision, repo_type="model", allow_patterns=list(FILES))
        except _connection_errors() as error:
            raise HubUnavailableError(
                f"cannot push to {repo_id!r}: the Hugging Face Hub cannot be reached ({type(error).__name__}); "
                "check the network, or write the folder with save_pretrained and upload it later") from error
        except HfHubHTTPError as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status not in (401, 403):
                raise
            raise PermissionError(
                f"cannot push to {repo_id!r}: the Hub refused this login (HTTP {status}); log in with "
                "`hf auth login` (or pass token= / set HF_TOKEN) with a token that can write to it") from error
    return str(getattr(info, "commit_url", info))


# -- loading ------------------------------------------------------------------------
def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or text.count("/") > 1


def _resolve_folder(repo_id_or_path: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(repo_id_or_path)
    if not isinstance(repo_id_or_path, str) or _looks_like_path(text) or path.exists():
        raise FileNotFoundError(f"{text!r} is not a folder (from_pretrained takes a folder written by "
                                "save_pretrained, or a Hub repo id 'user-or-org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(text, revision=revision, token=token, allow_patterns=list(FILES),
                                      library_name=LIBRARY_NAME, library_version=package_version()))
    except LocalEntryNotFoundError as error:
        why = "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1)" if _offline() else \
            "the Hugging Face Hub cannot be reached"
        raise HubUnavailableError(f"cannot download {text!r}: {why} and it is not in the local cache; "
                                  f"{_OFFLINE_FIX}") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"no Hub repo {text!r} (or it is private or gated: pass token=...) and no such "
                                "local folder") from error
    except HFValidationError as error:
        raise FileNotFoundError(f"{text!r} is neither a folder nor a valid Hub repo id ('user-or-org/name')") \
            from error
    except _connection_errors() as error:
        raise HubUnavailableError(f"cannot download {text!r}: the Hugging Face Hub cannot be reached "
                                  f"({type(error).__name__}); {_OFFLINE_FIX}") from error


def _read_config(folder: Path, source: str) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{source!r} has no {CONFIG_NAME}: it is not a folder written by "
                                "timm_ood's save_pretrained")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{source!r}: {CONFIG_NAME} is not JSON ({error}); save it again with save_pretrained") \
            from error
    if not isinstance(config, dict) or config.get("library") != LIBRARY_NAME:
        raise ValueError(f"{source!r}: {CONFIG_NAME} is not a timm-ood config (no \"library\": \"timm-ood\"); "
                         "it was not written by timm_ood's save_pretrained")
    found, wrote = config.get("format"), config.get("timm_ood_version", "an unknown version")
    if found != FORMAT_VERSION:
        newer = isinstance(found, int) and found > FORMAT_VERSION
        fix = (f"install timm-ood>={wrote} (pip install -U timm-ood)" if newer else
               f"install timm-ood=={wrote} to load it, or load it there and save it again with timm-ood "
               f"{package_version()}")
        raise FormatVersionError(
            f"{source!r} was written by timm-ood {wrote} in folder format {found!r}; timm-ood {package_version()} reads "
            f"format {FORMAT_VERSION}: {fix}")
    return config


def _create_timm_model(name: str, *, weights: str | os.PathLike | None, **kwargs: Any) -> nn.Module:
    from .timm_models import create_timm_model

    return create_timm_model(name, pretrained=True, weights=weights, **kwargs)


class HubMixin:
    """The Hugging Face Hub methods of :class:`~timm_ood.OODModel`, which inherits them.

    Kept here, next to the folder format, so that imports run one way: the model imports this module
    (``class OODModel(HubMixin, nn.Module)``) and this module never imports the model. ``from_pretrained``
    builds ``cls(timm_model, detector)``, so a subclass's builds that subclass.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *, results: EvaluationResults | None = None) -> Path:
        """Write the detector, a config and a model card into a folder (:func:`save_pretrained`)."""
        return save_pretrained(cast("OODModel", self), save_directory, results=results)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload :meth:`save_pretrained`'s folder to a Hub repo (:func:`push_to_hub`)."""
        return push_to_hub(cast("OODModel", self), repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        *,
        weights: str | os.PathLike | None = None,
        revision: str | None = None,
        token: str | None = None,
        device: Any = None,
        strict: bool = True,
        **timm_kwargs: Any,
    ) -> OODModel:
        """The timm model and its fitted detector and threshold, from a folder or a Hub repo, in one call.

        The timm model is created by its pretrained tag (timm downloads and caches
        the weights) or from ``weights``; the detector's model fingerprint is then
        checked against it (:meth:`OODModel.load_detector`).

        Args:
            repo_id_or_path: a folder written by :func:`save_pretrained`, or a Hub repo id.
            weights: a local ``.safetensors``/``.pth`` state dict of the model (loaded
                through timm's ``pretrained_cfg_overlay=dict(file=...)``): needed for
                a model with weights of its own (no pretrained tag), and how offline
                users load the tag's weights.
            revision: the Hub revision (branch, tag or commit).
            token: a Hub token, for private repos.
            device: where to put the model (default: CPU).
            strict: False loads a detector fitted on other weights of the same
                architecture with a warning instead of an error.
            **timm_kwargs: passed to ``timm.create_model`` over the config's.

        Returns:
            The :class:`OODModel`, in eval mode, with ``threshold`` and ``threshold_tpr``.

        Raises:
            HubUnavailableError: a repo id while offline and not cached.
            FormatVersionError: the folder was written in another format version.
            IncompatibleModelError: the detector was fitted on other weights or another model.
            ValueError: a model with weights of its own and no ``weights``.
            FileNotFoundError: neither a folder nor a Hub repo.
        """
        source = os.fspath(repo_id_or_path)
        folder = _resolve_folder(repo_id_or_path, revision, token)
        config = _read_config(folder, source)
        model_config, detector_config = config["model"], config["detector"]
        name = _model_name(config)
        digest = model_config.get("weights_sha256")
        if weights is None and _needs_weights(config):
            why = "it has no pretrained tag" if not model_config.get("tag") else "it was created with pretrained=False"
            raise ValueError(
                f"{source!r} holds a detector fitted on {name} with weights of its own ({why}): pass them, "
                f"from_pretrained({source!r}, weights='checkpoint.safetensors') (their sha256 at "
                f"{model_config.get('weights_precision', 'float32')}: {digest})")
        overlay = {k: _tuples(v) for k, v in dict(model_config.get("pretrained_cfg_overlay") or {}).items()}
        overlay.update(timm_kwargs.pop("pretrained_cfg_overlay", None) or {})
        kwargs = {k: _tuples(v) for k, v in dict(model_config.get("kwargs") or {}).items()}
        for key in ("num_classes", "in_chans"):
            if model_config.get(key) is not None:
                kwargs[key] = model_config[key]
        if weights is not None and "num_classes" in kwargs:
            overlay["num_classes"] = kwargs["num_classes"]  # the file's classifier is the model's: timm keeps it
        kwargs.update(timm_kwargs)
        model = _create_timm_model(name, weights=weights, pretrained_cfg_overlay=overlay, **kwargs)
        if device is not None:
            model = model.to(device)
        if strict and digest:
            found = weights_sha256(model, model_config.get("weights_precision", "float32"))
            if found != digest:
                where = f"the weights in {os.fspath(weights)!r}" if weights is not None else \
                    f"{name}'s pretrained weights"
                fix = ("pass the checkpoint it was fitted on with weights=FILE" if weights is None else
                       "pass the checkpoint it was fitted on")
                raise IncompatibleModelError(
                    f"{source!r} holds a detector fitted on other weights than {where} (sha256 {digest[:16]}... saved, "
                    f"{found[:16]}... loaded): {fix}, or pass strict=False to load it with a warning")
        detector = create_detector(detector_config["name"], **dict(detector_config.get("hyperparameters") or {}))
        ood_model = cast("OODModel", cast(Any, cls)(model.eval(), detector))  # OODModel(model, detector)
        ood_model.load_detector(folder / DETECTOR_NAME, strict=strict)
        ood_model.timm_creation = {
            "model_name": name,
            "pretrained": True if weights is None else model_config.get("pretrained"),
            "kwargs": {k: v for k, v in kwargs.items() if k not in _NOT_KWARGS},
        }
        return ood_model
