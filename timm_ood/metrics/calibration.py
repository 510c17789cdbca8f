"""Expected calibration error of a classifier's top-1 predictions, through torchmetrics.

Lee et al. (ICLR 2018, Sec. 4) claim that the confidence loss also calibrates
the classifier; ECE (Guo et al., ICML 2017, Eq. 3; Naeini et al. 2015) is the
measure: confidences binned into ``n_bins`` equal-width bins, then the mean
over samples of ``|accuracy(bin) - confidence(bin)|``. It is torchmetrics'
binary calibration error on (top-1 confidence, top-1 correct), which is its
multiclass ECE without holding the ``[N, C]`` probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["expected_calibration_error"]


def expected_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int = 15) -> Tensor:
    """Top-1 expected calibration error in [0, 1] (lower is better).

    Args:
        confidences: the probability of each sample's predicted class, in [0, 1], shape ``[N]``.
        correct: whether each prediction is right (bool or 0/1), shape ``[N]``.
        n_bins: equal-width confidence bins (15, as Guo et al.).

    Raises:
        ValueError: empty inputs, different shapes, or confidences outside [0, 1].
    """
    from torchmetrics.functional.classification import binary_calibration_error

    if confidences.shape != correct.shape or confidences.ndim != 1 or confidences.numel() == 0:
        raise ValueError(f"expected_calibration_error needs two non-empty [N] tensors, got {tuple(confidences.shape)} "
                         f"and {tuple(correct.shape)}")
    if bool(((confidences < 0) | (confidences > 1)).any()):
        raise ValueError("confidences must be probabilities in [0, 1] (softmax of the logits, not the logits)")
    return binary_calibration_error(confidences.double(), correct.long(), n_bins=n_bins, norm="l1").to(torch.float64)
