"""BIN and BINC: one sigmoid per class instead of a softmax (Sreeramdas & Sarawagi, Sec. 3, Eq. 3-4).

::

    training.replace_head(model, "bin")                  # K sigmoids on the pre-logits
    training.fit(model, data, loss=training.BINLoss(zeta=0.05), epochs=5)
    timm_ood.wrap(model, "bin")                          # -log max_c sigmoid(p_c)

    training.replace_head(model, "binc", embedding_dim=64)   # z layer, softmax head + sigmoid head
    training.fit(model, data, loss=training.BINCLoss(zeta=0.05, mmce_weight=0.5), epochs=5)

The losses are :class:`~timm_ood.training.Objective` s that call the head
explicitly: they run ``forward_features`` and ``forward_head(pre_logits=True)``
(timm's contract) and then ask the installed head for what they need (the
BINC sigmoid logits are not the model's output). Nothing is cached on the
head between calls, so a loss never reads a stale forward pass, and a model
without the matching head is refused with a clear error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .heads import HEAD_KINDS, ReplacementHead, installed_head, pre_logits
from .objectives import Objective

__all__ = [
    "BINCHead",
    "BINCLoss",
    "BINHead",
    "BINLoss",
    "class_weighted_binary_cross_entropy",
    "mmce_weighted",
]


class BINHead(ReplacementHead):
    """BIN: K independent sigmoids over the pre-logits (Sreeramdas & Sarawagi, Sec. 3).

    A linear layer ``p = W h + b``; class c's probability is ``sigmoid(p_c)``
    (a multi-label reading of the classes, no sum-to-one). The model's logits
    are ``p``: ``argmax_c p_c`` is the prediction, as for a softmax head.

    Args:
        in_features: D, the pre-logits width.
        num_classes: K.
    """

    kind = "bin"

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.binary = nn.Linear(in_features, num_classes)

    def binary_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The K sigmoid logits ``p`` [B, K] of pre-logits [B, D]."""
        return self.binary(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.binary_logits(features)


class BINCHead(ReplacementHead):
    """BINC: a z-wide layer, then a softmax head and a sigmoid head side by side (Sec. 3, Eq. 4).

    ``e = A h`` (``A``: D -> z, linear, no activation: the paper enlarges the
    network's *output* layer to z units, and an output layer has none), then
    two independent linear maps of ``e``: softmax logits ``q = U e + c`` (the
    model's logits: predictions and accuracy) and sigmoid logits ``p = V e + d``
    (the BIN classifiers the ``bin`` detector reads).

    Args:
        in_features: D, the pre-logits width.
        num_classes: K.
        embedding_dim: z (64, the paper's value).
    """

    kind = "binc"

    def __init__(self, in_features: int, num_classes: int, embedding_dim: int = 64) -> None:
        super().__init__(in_features, num_classes)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim!r}")
        self.embedding_dim = int(embedding_dim)
        self.embedding = nn.Linear(in_features, self.embedding_dim)
        self.softmax = nn.Linear(self.embedding_dim, num_classes)
        self.binary = nn.Linear(self.embedding_dim, num_classes)

    def options(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim}

    def both_logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(softmax logits q, sigmoid logits p)``, each [B, K], from one pass through the z layer."""
        embedded = self.embedding(features)
        return self.softmax(embedded), self.binary(embedded)

    def binary_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The K sigmoid logits ``p`` [B, K] of pre-logits [B, D]."""
        return self.binary(self.embedding(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.embedding(features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.out_features}, embedding_dim={self.embedding_dim}"


HEAD_KINDS.update({BINHead.kind: BINHead, BINCHead.kind: BINCHead})


def class_weighted_binary_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, zeta: float = 0.05
) -> torch.Tensor:
    """BIN's loss: class-weighted binary cross-entropy of K sigmoids (survey Eq. 3, corrected).

    ``L = mean_i Σ_c -[y_ic log σ(p_ic) + ζ (1 - y_ic) log(1 - σ(p_ic))]``
    with ``y_ic = 1[y_i = c]``. Eq. 3 as printed has no logarithms (minimising
    it would push the true class's sigmoid *down*); this is the binary
    cross-entropy it evidently means (``methods/survey.md`` §5.1). ζ weighs the
    K - 1 negatives of each sample against its one positive; it is not "fixed"
    to 1/(K-1). Summed over classes and averaged over samples (the paper sums
    over the data set: a constant factor, absorbed by the learning rate).
    Computed with ``logsigmoid`` (``log(1 - σ(p)) = logsigmoid(-p)``), stable
    for any logit.

    Args:
        logits: sigmoid logits ``p`` [B, K].
        targets: class indices [B].
        zeta: ζ >= 0, the weight of the negative terms (0.05, the paper's).

    Returns:
        The scalar loss.

    Raises:
        ValueError: logits not [B, K] or targets not [B].
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, K] and targets [B], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    positive = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    per_term = positive * F.logsigmoid(logits) + zeta * (1 - positive) * F.logsigmoid(-logits)
    return -per_term.sum(dim=1).mean()


def mmce_weighted(confidence: torch.Tensor, correct: torch.Tensor, bandwidth: float = 0.4) -> torch.Tensor:
    """MMCE_w, the re-weighted maximum mean calibration error (Kumar, Sarawagi & Jain, ICML 2018), per column.

    For confidences ``r`` and correctness ``c`` of one classifier over a batch,
    with D_c the correct and D_w the wrong predictions (m_c and m_w of them)::

        MMCE_w^2 = Σ_{i,j ∈ D_c} (1 - r_i)(1 - r_j) k(r_i, r_j) / m_c^2
                 + Σ_{i,j ∈ D_w} r_i r_j k(r_i, r_j) / m_w^2
                 - 2 Σ_{i ∈ D_c, j ∈ D_w} (1 - r_i) r_j k(r_i, r_j) / (m_c m_w)

    with the Laplacian kernel ``k(r, r') = exp(-|r - r'| / bandwidth)``, and
    ``MMCE_w = sqrt(MMCE_w^2)`` (the regulariser Kumar et al. add to the loss).
    With ``u_i = (1 - r_i)/m_c`` on D_c and ``u_i = -r_i/m_w`` on D_w this is
    the quadratic form ``u^T K u``: one [B, B] kernel per column, no loops.
    The estimate needs both correct and wrong predictions: a column with
    either set empty gives 0 (as in the authors' code). The square root is
    taken of ``max(MMCE_w^2, 1e-10)``: the form is a squared RKHS norm (>= 0 up
    to rounding) and the root's gradient is infinite at 0.

    Args:
        confidence: ``r`` [B] or [B, K] (K classifiers, one per column), in [0, 1].
        correct: booleans of the same shape, whether each prediction is right.
        bandwidth: the kernel width (0.4, Kumar et al.'s).

    Returns:
        MMCE_w per column: a scalar for [B] inputs, [K] for [B, K].

    Raises:
        ValueError: shapes that differ, or a bandwidth <= 0.
    """
    if confidence.shape != correct.shape or confidence.ndim not in (1, 2):
        raise ValueError(f"confidence and correct must both be [B] or [B, K], got {tuple(confidence.shape)} "
                         f"and {tuple(correct.shape)}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    single = confidence.ndim == 1
    r = confidence[:, None] if single else confidence  # [B, K]
    is_correct = correct.reshape(r.shape).to(torch.bool)
    count_correct = is_correct.sum(dim=0)  # [K]
    count_wrong = (~is_correct).sum(dim=0)
    weights = torch.where(is_correct, (1 - r) / count_correct.clamp_min(1), -r / count_wrong.clamp_min(1))
    columns = r.T  # [K, B]
    kernel = torch.exp(-(columns[:, :, None] - columns[:, None, :]).abs() / bandwidth)  # [K, B, B]
    u = weights.T  # [K, B]
    squared = torch.einsum("ki,kij,kj->k", u, kernel, u)
    defined = (count_correct > 0) & (count_wrong > 0)
    value = torch.where(defined, squared.clamp_min(1e-10).sqrt(), torch.zeros_like(squared))
    return value[0] if single else value


class BINLoss(Objective):
    """BIN's training objective: :func:`class_weighted_binary_cross_entropy` on a :class:`BINHead`.

    Args:
        zeta: ζ >= 0, the weight of the negative terms (0.05, the paper's, Sec. 5.3).

    Raises (on call):
        IncompatibleModelError: the model's classifier is not a :class:`BINHead`.
    """

    def __init__(self, zeta: float = 0.05) -> None:
        super().__init__()
        if not zeta >= 0:
            raise ValueError(f"zeta must be >= 0, got {zeta!r}")
        self.zeta = float(zeta)

    def forward(self, model, images, targets, outliers=None):
        head = installed_head(model, (BINHead,), "BINLoss")
        assert isinstance(head, BINHead)  # installed_head returns one of the kinds it is given
        return class_weighted_binary_cross_entropy(head.binary_logits(pre_logits(model, images)), targets, self.zeta)

    def extra_repr(self) -> str:
        return f"zeta={self.zeta:g}"


class BINCLoss(Objective):
    """BINC's objective (survey Eq. 4): ``CE(q, y) + L_BIN(p, y) + λ mean_c MMCE_w(classifier c)``.

    ``q`` are the softmax logits and ``p`` the sigmoid logits of a
    :class:`BINCHead`. MMCE_w (:func:`mmce_weighted`) is applied "to each
    binary classifier" of the sigmoid head: classifier c predicts
    ``1[σ(p_c) > 0.5]`` with confidence ``r_c = max(σ(p_c), 1 - σ(p_c))`` and is
    right when that equals ``1[y = c]``; the K per-classifier values are
    averaged (a choice: the paper does not say sum or mean; the mean keeps λ's
    scale independent of K). Gradients flow through ``r`` only (correctness
    is an indicator).

    Args:
        zeta: ζ of the BIN term (0.05).
        mmce_weight: λ >= 0 (0.5, the paper's).
        bandwidth: the MMCE kernel width (0.4, Kumar et al.'s).

    Raises (on call):
        IncompatibleModelError: the model's classifier is not a :class:`BINCHead`.
    """

    def __init__(self, zeta: float = 0.05, mmce_weight: float = 0.5, bandwidth: float = 0.4) -> None:
        super().__init__()
        for name, value in (("zeta", zeta), ("mmce_weight", mmce_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
        self.zeta, self.mmce_weight, self.bandwidth = float(zeta), float(mmce_weight), float(bandwidth)

    def forward(self, model, images, targets, outliers=None):
        head = installed_head(model, (BINCHead,), "BINCLoss")
        assert isinstance(head, BINCHead)  # installed_head returns one of the kinds it is given
        softmax_logits, binary_logits = head.both_logits(pre_logits(model, images))
        probability = torch.sigmoid(binary_logits)
        predicted_positive = binary_logits > 0
        is_positive = F.one_hot(targets, binary_logits.shape[1]).to(torch.bool)
        confidence = torch.where(predicted_positive, probability, 1 - probability)
        calibration = mmce_weighted(confidence, predicted_positive == is_positive, self.bandwidth).mean()
        return (F.cross_entropy(softmax_logits, targets)
                + class_weighted_binary_cross_entropy(binary_logits, targets, self.zeta)
                + self.mmce_weight * calibration)

    def extra_repr(self) -> str:
        return f"zeta={self.zeta:g}, mmce_weight={self.mmce_weight:g}, bandwidth={self.bandwidth:g}"
