"""The conformance kit's trained models and data (``timm_ood.testing``), shared with tests/test_conformance.py."""

from __future__ import annotations

import torch
from torch import nn

from timm_ood.testing import conformance_data, conformance_model


def sample(model: nn.Module, count: int = 16) -> torch.Tensor:
    """Held-out digits and uniform noise in the model's input format."""
    return conformance_data(model).mixed(count)


def fit_batches(model: nn.Module) -> tuple:
    return conformance_data(model).fit_batches


def kit_model_and_fit_data(architecture: str = "test_resnet") -> tuple[nn.Module, tuple]:
    model = conformance_model(architecture)
    return model, conformance_data(model).fit_batches
