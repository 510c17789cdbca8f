"""Gram-matrix deviations over intermediate feature maps (Sastry & Oore, ICML 2020)."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, score_dtype
from .collect import gather_stacked
from .gaussian import resolve_layers

__all__ = ["Gram", "gram_features"]

#: Bounds closer to 0 than this divide deviations by it instead (the authors' code adds 1e-6).
BOUND_FLOOR = 1e-6


def gram_features(feature_map: torch.Tensor, max_power: int) -> torch.Tensor:
    """Row sums of the p-th order Gram matrices ``G^p = (F^p F^pᵀ)^(1/p)`` for p = 1..P, [B, P·C] float64.

    ``F`` is the map flattened to [C, H·W] (for a ViT: embedding dims x patch
    tokens), ``F^p`` elementwise, the root taken as ``sign(v) |v|^(1/p)``.
    Row i of ``F^p F^pᵀ`` sums to ``Σ_s F^p_is Σ_j F^p_js``, so no C x C
    matrix is formed. Ordered power-major: ``[p=1: C values, p=2: C values, ...]``.
    """
    flat = feature_map.flatten(2).to(torch.float64)  # [B, C, S]
    rows = []
    powered = flat
    for power in range(1, max_power + 1):
        if power > 1:
            powered = powered * flat  # F^p by one product per order: a generic pow is ~20x slower
        sums = torch.bmm(powered, powered.sum(dim=1).unsqueeze(2)).squeeze(2)  # [B, C]
        rows.append(sums.sign() * sums.abs().pow(1 / power))
    return torch.cat(rows, dim=1)


def _denominator(bounds: torch.Tensor) -> torch.Tensor:
    return bounds.abs().clamp_min(BOUND_FLOOR)


def _two_smallest(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The smallest and second-smallest value of each column within each group, [2, G, F] (+inf if absent).

    Order statistics count repeated values: a minimum that occurs twice is also
    the second smallest.
    """
    index = groups[:, None].expand_as(values)
    full = values.new_full((num_groups, values.shape[1]), torch.inf)
    first = full.scatter_reduce(0, index, values, "amin")
    is_first = values == first[groups]
    occurrences = torch.zeros_like(first).index_add_(0, groups, is_first.to(values.dtype))
    rest = full.scatter_reduce(0, index, values.masked_fill(is_first, torch.inf), "amin")
    return torch.stack([first, torch.where(occurrences >= 2, first, rest)])


def _merge_two_smallest(*pairs: torch.Tensor) -> torch.Tensor:
    """The two smallest of the union of several ``[2, ...]`` pairs of order statistics (elementwise)."""
    return functools.reduce(_merge_pair, pairs)


def _merge_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # with a0 <= a1 and b0 <= b1: the smallest is min(a0, b0), the second the smaller of the loser and the
    # winner's runner-up (min(a1, b1) covers both runners-up); a tie at the minimum is its own second
    return torch.stack([torch.minimum(a[0], b[0]), torch.minimum(torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1]))])


class Gram(Detector):
    """Gram-matrix deviations (Sastry & Oore, ICML 2020, Sec. 3).

    For each intermediate feature map ``F_l`` of ``forward_intermediates()`` and
    each order p = 1..P, the Gram matrix ``G_l^p = (F_l^p F_l^pᵀ)^(1/p)``,
    summarised by its row sums as in the authors' released code
    (:func:`gram_features`). Fit (no labels; classes are the model's
    predictions, as in the paper): the elementwise ``Mins[c]`` and ``Maxs[c]`` of
    these values over the training images predicted as class c, kept as
    streaming per-class order statistics. Deviation of a value v from [lo, hi]:
    ``(lo - v)/|lo|`` below, ``(v - hi)/|hi|`` above, 0 inside. Layer
    deviation ``δ_l(x)``: the sum over the orders and entries of layer l,
    against the bounds of the predicted class. Score: the total deviation
    ``Δ(x) = Σ_l δ_l(x) / E[δ_l]``, higher = more OOD (no negation).

    ``E[δ_l]``, the expected deviation of in-distribution inputs: the paper
    takes it on held-out validation data, which the held-out step does
    (``model.fit_held_out(id_data)``, :meth:`finish_held_out`).
    Until then it is the leave-one-out estimate on the fit data, exact from the
    same pass: each training image's deviation against the bounds of the
    other images of its class, which needs only the two smallest and two
    largest values per class and entry. A class never predicted on the fit
    data takes the bounds of all fit images.

    The paper taps every layer of its CNNs; here the layers are what timm's
    ``forward_intermediates()`` returns (stages of a CNN, blocks of a ViT,
    whose token maps, patch tokens only, are the ``F_l``).

    Args:
        max_power: P, the highest Gram order (paper: 10).
        layers: positions in the list of intermediate feature maps (negative
            from the end); None = all of them.
    """

    name = "gram"
    paper = ("Sastry & Oore, Detecting Out-of-Distribution Examples with In-distribution Examples and Gram "
             "Matrices, ICML 2020, Sec. 3")
    requirements = Requirements(outputs=frozenset({Need.INTERMEDIATES, Need.LOGITS}), fit=True, held_out="id")
    search_space: ClassVar = {"max_power": (1, 2, 5, 10)}
    fit_hyperparameters: ClassVar = frozenset({"max_power", "layers"})

    def __init__(self, max_power: int = 10, layers: list[int] | None = None) -> None:
        super().__init__()
        self.max_power = max_power
        self.layers = layers
        self.check_hyperparameters()
        self.register_buffer("layer_indices", None)  # positions in forward_intermediates' list [L]
        self.register_buffer("layer_sizes", None)  # Gram values per layer, P · C_l [L]
        self.register_buffer("mins", None)  # [K, F]
        self.register_buffer("maxs", None)  # [K, F]
        self.register_buffer("layer_normalizers", None)  # E[δ_l] [L]
        self._positions: list[int] = []
        self._sizes: list[int] = []
        self._smallest: torch.Tensor | None = None  # [2, K, F]
        self._largest: torch.Tensor | None = None  # [2, K, F] of negated values
        self._counts: torch.Tensor | None = None
        self._held_out_sums: torch.Tensor | None = None

    def check_hyperparameters(self) -> None:
        if not (isinstance(self.max_power, int) and self.max_power >= 1):
            raise ValueError(f"gram: max_power must be an int >= 1, got {self.max_power!r}")
        if self.layers is not None and not all(isinstance(i, int) for i in self.layers):
            raise ValueError(f"gram: layers must be a list of ints or None, got {self.layers!r}")

    def features(self, outputs: Outputs, positions: list[int] | None = None) -> torch.Tensor:
        """The Gram values of the selected layers, concatenated, [B, F] float64."""
        maps = outputs.intermediates
        positions = self.layer_indices.tolist() if positions is None else positions
        return torch.cat([gram_features(maps[p], self.max_power) for p in positions], dim=1)

    # -- fit ----------------------------------------------------------------------------------
    def reset_fit(self, tap: Tap) -> None:
        self._positions, self._sizes = [], []
        self._smallest = self._largest = self._counts = None

    def update_fit(self, outputs: Outputs, labels: torch.Tensor | None) -> None:
        if not self._positions:
            maps = outputs.intermediates
            self._positions = resolve_layers(self.layers, len(maps), self.name)
            self._sizes = [self.max_power * maps[p].shape[1] for p in self._positions]
        values = self.features(outputs, self._positions)
        logits = outputs.logits
        predicted, classes = logits.argmax(dim=1), logits.shape[1]
        smallest = _two_smallest(values, predicted, classes)
        largest = _two_smallest(-values, predicted, classes)
        counts = torch.bincount(predicted, minlength=classes).to(torch.float64)
        if self._smallest is None:
            self._smallest, self._largest, self._counts = smallest, largest, counts
        else:
            self._smallest = _merge_two_smallest(self._smallest, smallest)
            self._largest = _merge_two_smallest(self._largest, largest)
            self._counts += counts

    def finish_fit(self) -> None:
        if self._smallest is None:
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(self._counts)
        smallest = _merge_two_smallest(*gather_stacked(self._smallest))
        largest = -_merge_two_smallest(*gather_stacked(self._largest))  # [max, second max]
        seen = self._counts > 0
        mins = torch.where(seen[:, None], smallest[0], smallest[0].amin(dim=0))
        maxs = torch.where(seen[:, None], largest[0], largest[0].amax(dim=0))
        # leave-one-out: only the unique extreme image of a class and entry deviates from the others' bounds
        left_out = (smallest[1] - smallest[0]) / _denominator(smallest[1]) \
            + (largest[0] - largest[1]) / _denominator(largest[1])
        several = self._counts >= 2
        left_out = torch.where(several[:, None], left_out, torch.zeros_like(left_out)).sum(dim=0)  # [F]
        per_layer = torch.stack([chunk.sum() for chunk in left_out.split(self._sizes)])
        images = self._counts[several].sum()
        device = mins.device
        self.layer_indices = torch.tensor(self._positions, device=device)
        self.layer_sizes = torch.tensor(self._sizes, device=device)
        self.mins, self.maxs = mins, maxs
        self.layer_normalizers = _normalizers(per_layer / images.clamp_min(1))
        self._smallest = self._largest = self._counts = None

    # -- scoring ------------------------------------------------------------------------------
    def layer_deviations(self, outputs: Outputs) -> torch.Tensor:
        """``δ_l(x)`` of every layer against the bounds of the predicted class, [B, L] float64."""
        values = self.features(outputs)
        predicted = outputs.logits.argmax(dim=1)
        low, high = self.mins.to(torch.float64)[predicted], self.maxs.to(torch.float64)[predicted]
        deviations = (low - values).clamp_min(0) / _denominator(low) + (values - high).clamp_min(0) / _denominator(high)
        return torch.stack([chunk.sum(dim=1) for chunk in deviations.split(self.layer_sizes.tolist(), dim=1)], dim=1)

    def score(self, outputs: Outputs) -> torch.Tensor:
        total = (self.layer_deviations(outputs) / self.layer_normalizers.to(torch.float64)).sum(dim=1)
        return score_dtype(total.to(outputs.logits.dtype))

    # -- the held-out step: E[δ_l] on held-out in-distribution data (the paper's validation step) ------
    def reset_held_out(self) -> None:
        self._held_out_sums: torch.Tensor | None = None

    def update_held_out(self, outputs: Outputs, is_ood: bool) -> None:
        deviations = self.layer_deviations(outputs)  # [B, L]
        sums = torch.cat([deviations.sum(dim=0), deviations.new_tensor([len(deviations)])])
        self._held_out_sums = sums if self._held_out_sums is None else self._held_out_sums + sums

    def finish_held_out(self) -> None:
        """Set ``E[δ_l]`` to the mean layer deviation on the held-out in-distribution data.

        Run it through ``model.fit_held_out(id_data)`` with data that is not the
        fit data (whose deviations are all 0 against bounds taken from them).

        Raises:
            ValueError: the held-out data held no image.
        """
        sums = self._held_out_sums
        if sums is None:
            sums = torch.zeros(len(self.layer_sizes) + 1, dtype=torch.float64, device=self.mins.device)
        all_reduce_sum(sums)
        self._held_out_sums = None
        if float(sums[-1]) == 0:
            raise ValueError("gram: the held-out step received no in-distribution images")
        self.layer_normalizers = _normalizers(sums[:-1] / sums[-1]).to(self.mins.device)


def _normalizers(expected: torch.Tensor) -> torch.Tensor:
    """``E[δ_l]`` as divisors: a layer whose expected deviation is 0 is divided by 1 (pytorch-ood does the same)."""
    return torch.where(expected > 0, expected, torch.ones_like(expected))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [Gram]
