"""Collecting what fits need beyond sums: rows from every process, and scores over held-out data.

Sufficient statistics that are sums are all-reduced with
:func:`~timm_ood.detectors.base.all_reduce_sum`. Two other kinds of fitted
state need more, and the detectors that keep them share these helpers:

- a feature bank (``knn``, ``nnguide``) or per-class order statistics
  (``gram``, ``openmax``) are gathered from every process with
  :func:`gather_rows` / :func:`gather_stacked`, built on the same all-reduce
  so that they need nothing but a process group;
- a step fitted on held-out data after ``fit`` (the layer weights of
  ``multi-mahalanobis``, the layer normalisers of ``gram``) reads the tap's
  outputs exactly as scoring does, through :func:`scoring_outputs`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .._runtime import eval_mode, model_device, model_dtype
from ..batches import check_images, iter_batches
from ..tap import Outputs, Tap
from .base import Detector, all_reduce_sum

__all__ = ["gather_rows", "gather_stacked", "scoring_outputs"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` from every process stacked on a new first dimension, [world, ...] (all ranks in order).

    Every process must pass a tensor of the same shape; without torch.distributed
    the result is ``tensor[None]``.
    """
    rank, world = _world()
    if world == 1:
        return tensor[None]
    stacked = tensor.new_zeros(world, *tensor.shape)
    stacked[rank] = tensor
    all_reduce_sum(stacked)
    return stacked


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process concatenated in rank order, [ΣN_rank, ...] (processes may hold different counts).

    Without torch.distributed the rows are returned as they are.
    """
    rank, world = _world()
    if world == 1:
        return rows
    counts = gather_stacked(torch.tensor(rows.shape[0], device=rows.device)).tolist()
    gathered = rows.new_zeros(sum(counts), *rows.shape[1:])
    start = sum(counts[:rank])
    gathered[start:start + rows.shape[0]] = rows
    all_reduce_sum(gathered)
    return gathered


def scoring_outputs(
    detector: Detector, model: nn.Module, data: Iterable, *, progress: bool | None = None, desc: str = "score"
) -> Iterator[Outputs]:
    """The tap's outputs for each batch of ``data``, computed as :meth:`OODModel.ood_score` computes them.

    The model and the detector are in eval mode and autograd is off unless the
    detector runs its own input-gradient passes; the detector must be fitted.

    Args:
        detector: the fitted detector whose declared outputs to compute.
        model: the ``OODModel`` the detector is attached to, or the timm model.
        data: a DataLoader or iterable of batches (labels are ignored).
        progress: show a tqdm bar (default: on a terminal).
        desc: the bar's label.

    Raises:
        NotFittedError: the detector is not fitted.
        IncompatibleModelError: the model cannot give what the detector reads.
    """
    from ..model import OODModel  # the model module imports the detectors: import it when used

    tap = model.tap if isinstance(model, OODModel) else Tap(model)
    detector.check_model(tap)
    detector.check_fitted()
    device, dtype = model_device(tap.model), model_dtype(tap.model)
    grad_mode = torch.no_grad if detector.requirements.input_gradients else torch.inference_mode
    total = len(data) if hasattr(data, "__len__") else None
    with eval_mode(tap.model, detector), grad_mode():
        for images, _ in tqdm(iter_batches(data), total=total, desc=desc, leave=False,
                              disable=None if progress is None else not progress):
            images = check_images(images, tap).to(device=device, dtype=dtype)
            yield tap(images, detector.requirements.outputs)
