"""A hand-made "model" whose features are its inputs, for checking logit and shaping detectors.

Each score is checked against a direct NumPy reimplementation of the paper's
equation on a tiny hand-made case: :class:`HandModel`'s head is one linear
layer, so the pre-logits (or feature maps) are chosen by hand. Where
pytorch-ood defines the same score, tests/test_pytorch_ood_agreement.py checks
that it ranks inputs as ours do.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp
from torch import nn

from timm_ood.detectors.base import Detector
from timm_ood.tap import Tap

CLASSES, WIDTH = 3, 10


class HandModel(nn.Module):
    """A model with timm's contract whose features are its inputs: pre-logits (or maps) chosen by hand.

    ``forward_head`` mean-pools feature maps [B, C, H, W] (or [B, H, W, C] with
    ``output_fmt="NHWC"``, or tokens [B, N, D]) and applies one linear layer,
    random, or the identity (``identity=True``: the inputs are the logits).
    """

    def __init__(self, width: int = WIDTH, seed: int = 0, output_fmt: str = "NCHW", identity: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(width, CLASSES).double()
        with torch.no_grad():
            if identity:
                self.fc.weight.copy_(torch.eye(CLASSES, width, dtype=torch.float64))
                self.fc.bias.zero_()
            else:
                self.fc.weight.copy_(torch.randn(CLASSES, width, generator=generator, dtype=torch.float64))
                self.fc.bias.copy_(torch.randn(CLASSES, generator=generator, dtype=torch.float64))
        self.num_classes, self.num_features, self.output_fmt = CLASSES, width, output_fmt

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.ndim == 4:
            x = x.mean(dim=(1, 2)) if self.output_fmt == "NHWC" else x.mean(dim=(2, 3))
        elif x.ndim == 3:
            x = x.mean(dim=1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def weight_and_bias(self) -> tuple[np.ndarray, np.ndarray]:
        return self.fc.weight.detach().numpy(), self.fc.bias.detach().numpy()


def fit(detector: Detector, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Detector:
    """Fit ``detector`` through the tap on hand-made batches, as ``fit_detectors`` does."""
    tap = Tap(model)
    detector.check_model(tap)
    detector.reset_fit(tap)
    for x, labels in data:
        detector.update_fit(tap(x, detector.requirements.outputs_for_fit), labels)
    detector.finish_fit()
    detector.is_fitted = True
    return detector


def scores(detector: Detector, model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return detector(Tap(model)(x, detector.requirements.outputs)).double().numpy()


def random_activations(rows: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    """Post-ReLU-like pre-logits: half-normal with exact zeros, float64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator, dtype=torch.float64).clamp_min(0) * 2


def energy(logits: np.ndarray) -> np.ndarray:
    return -logsumexp(logits, axis=1)


def classifier_energy(model: HandModel, h: np.ndarray) -> np.ndarray:
    weight, bias = model.weight_and_bias()
    return energy(h @ weight.T + bias)


#: Its inputs are its logits.
LOGIT_MODEL = HandModel(CLASSES, identity=True)


LOGITS = torch.tensor([[2.0, 1.0, -1.0], [0.2, 0.1, 0.0], [-3.0, 4.0, 1.0], [5.0, 5.0, -2.0]], dtype=torch.float64)
