"""scikit-learn estimators in a tensor, in skops' secure format: never pickle.

A fitted estimator that cannot be written as a few arrays (a forest of trees,
a support-vector model, a neighbour index) is serialised with ``skops.io``
into a uint8 tensor, saved as a buffer with the detector's other state in
safetensors. Loading audits the payload first: every type it names must be
one scikit-learn/skops trusts by default or one of an explicit list the
detector declares, and the result must be of the expected class. Anything
else is refused before a single object is built, so a tampered file cannot
run code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import skops.io
import torch
from timm_ood import TimmOODError

__all__ = ["UntrustedEstimatorError", "estimator_from_tensor", "estimator_to_tensor"]

EstimatorT = TypeVar("EstimatorT")


class UntrustedEstimatorError(TimmOODError, ValueError):
    """A saved estimator references types the detector does not trust; it was not loaded."""


def estimator_to_tensor(estimator: object) -> torch.Tensor:
    """The estimator in skops' format, as a uint8 tensor [N]."""
    return torch.frombuffer(bytearray(skops.io.dumps(estimator)), dtype=torch.uint8)


def estimator_from_tensor(
    payload: torch.Tensor, expected: type[EstimatorT], trusted_types: Sequence[str]
) -> EstimatorT:
    """Rebuild an estimator saved by :func:`estimator_to_tensor`, trusting only what is listed.

    Args:
        payload: the uint8 tensor.
        expected: the estimator's class (``IsolationForest``).
        trusted_types: fully qualified names of the types, beyond skops'
            defaults, that the payload may contain (``"sklearn.tree._tree.Tree"``).

    Raises:
        UntrustedEstimatorError: the payload names another type, or holds
            another class of estimator.
    """
    data = payload.detach().cpu().numpy().tobytes()
    untrusted = sorted(set(skops.io.get_untrusted_types(data=data)) - set(trusted_types))
    if untrusted:
        raise UntrustedEstimatorError(
            f"refusing to load a {expected.__name__}: the saved state references types "
            f"{', '.join(untrusted)}, which this detector does not trust (it trusts "
            f"{', '.join(trusted_types) or 'only skops defaults'}). The file was not written by this "
            "detector or was altered; nothing from it was executed."
        )
    estimator = skops.io.loads(data, trusted=list(trusted_types))
    if type(estimator) is not expected:
        raise UntrustedEstimatorError(
            f"refusing the saved state: it holds {type(estimator).__name__}, not {expected.__name__}"
        )
    return estimator
