"""Gram-matrix deviations over intermediate feature maps (Sastry & Oore, ICML 2020)."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from ..distributed import all_gather_stacked
from ..hookspecs import hookimpl
from ..tap import Need, Outputs, Tap
from .base import Detector, Requirements, all_reduce_sum, score_dtype
from .mahalanobis import resolve_layers

__all__ = ["Gram", "gram_features"]

#: Bounds closer to 0 than this divide deviations by it instead (the authors' code adds 1e-6).
BOUND_FLOOR = 1e-6
#: Values of a feature map that :func:`_row_sums` raises through all the orders at a time on a CPU: a
#: chunk of the batch this size stays in the cache, where a whole batch of an early map (tens of MB in
#: float64) would be streamed from memory four times per order
CPU_CHUNK_VALUES = 1 << 17
#: Relative slack of the cuts that screen row sums for deviations (:func:`_layer_deviation`): far above
#: the rounding of a p-th power and of a p-th root (a few ulps)
CUT_SLACK = 1e-12


def gram_features(feature_map: torch.Tensor, max_power: int) -> torch.Tensor:
    """Row sums of the p-th order Gram matrices ``G^p = (F^p F^pᵀ)^(1/p)`` for p = 1..P, [B, P·C] float64.

    ``F`` is the map flattened to [C, H·W] (for a ViT: embedding dims x patch
    tokens), ``F^p`` elementwise, the root taken as ``sign(v) |v|^(1/p)``.
    Row i of ``F^p F^pᵀ`` sums to ``Σ_s F^p_is Σ_j F^p_js``, so no C x C
    matrix is formed. Ordered power-major: ``[p=1: C values, p=2: C values, ...]``.
    """
    return _roots(_row_sums(feature_map, max_power))


def _row_sums(feature_map: torch.Tensor, max_power: int) -> torch.Tensor:
    """The row sums ``v = Σ_s F^p_is Σ_j F^p_js`` before their root, [B, P, C] float64.

    The root is monotonic, so order statistics and bound checks can be taken
    on these and only what they select rooted (the roots cost more than the sums).
    """
    flat = feature_map.flatten(2)  # [B, C, S]
    batch, channels, positions = flat.shape
    step = max(1, CPU_CHUNK_VALUES // max(1, channels * positions)) if flat.device.type == "cpu" else max(1, batch)
    # few positions per channel (late CNN stages): [b, S, C], so that the column sums run along whole rows
    # of channels and bmm takes one row vector times a short matrix (~2x faster there than [b, C, S])
    few = 4 * positions <= channels
    chunks = []
    for chunk in flat.split(step):  # an empty batch is one empty chunk
        chunk = (chunk.transpose(1, 2) if few else chunk).to(torch.float64, memory_format=torch.contiguous_format)
        powered, orders = chunk, []
        for power in range(1, max_power + 1):
            if power > 1:
                powered = powered * chunk  # F^p by one product per order: a generic pow is ~20x slower
            # the column sums as the transposed view of a kept dim: bmm's fast path for these small matrices
            # (a contiguous [b, S, 1] column is ~5x slower, a product and a sum ~1.5x)
            if few:
                orders.append(torch.bmm(powered.sum(dim=2, keepdim=True).mT, powered).squeeze(1))  # [b, C]
            else:
                orders.append(torch.bmm(powered, powered.sum(dim=1, keepdim=True).mT).squeeze(2))
        chunks.append(torch.stack(orders, dim=1))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _roots(row_sums: torch.Tensor) -> torch.Tensor:
    """The Gram values of row sums [..., P, C] (order p at position p - 1), power-major [..., P·C]."""
    return torch.cat([_root(sums, power) for power, sums in enumerate(row_sums.unbind(-2), start=1)], dim=-1)


def _root(sums: torch.Tensor, power: int | torch.Tensor) -> torch.Tensor:
    """``sign(v) |v|^(1/p)`` of row sums of order ``power``: an int, or a float64 tensor of orders.

    Both forms give the bits of torch's pow with a number (which takes the
    square root for p = 2 and returns ``v`` for p = 1). copysign instead of
    multiplying by the sign: one op fewer, and ±inf stays ±inf.
    """
    if isinstance(power, int):
        return sums if power == 1 else sums.abs().pow(1 / power).copysign(sums)
    magnitude = sums.abs()
    return torch.where(power == 2, magnitude.sqrt(), magnitude.pow(1 / power)).copysign(sums)


def _denominator(bounds: torch.Tensor) -> torch.Tensor:
    return bounds.abs().clamp_min(BOUND_FLOOR)


def _two_smallest(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The smallest and second-smallest value of each column within each group, [2, G, F] (+inf if absent).

    Order statistics count repeated values: a minimum that occurs twice is also
    the second smallest.
    """
    smallest = values.new_full((2, num_groups, values.shape[1]), torch.inf)
    for group in torch.unique(groups).tolist():  # reductions along the rows of each group beat scatter_reduce
        members = values[groups == group]  # a copy
        first = members.amin(dim=0)
        is_first = members == first
        rest = members.masked_fill_(is_first, torch.inf).amin(dim=0)
        smallest[0, group] = first
        smallest[1, group] = torch.where(is_first.sum(dim=0) >= 2, first, rest)
    return smallest


def _rooted(row_sums: torch.Tensor, sizes: list[int], max_power: int) -> torch.Tensor:
    """The Gram values of row sums [..., F] laid out as :meth:`Gram.features` lays out its values."""
    return torch.cat([_roots(layer.unflatten(-1, (max_power, -1))) for layer in row_sums.split(sizes, dim=-1)], dim=-1)


def _layer_deviation(row_sums: torch.Tensor, predicted: torch.Tensor, low: torch.Tensor,
                     high: torch.Tensor) -> torch.Tensor:
    """``δ_l``: one layer's deviations from the bounds [K, P, C] of the predicted classes, summed, [B] float64.

    The root is monotonic, so a Gram value can deviate only where its row sum
    lies outside the bounds raised back to their order (:func:`_cut`): only
    those entries, a few percent on most data, are rooted and measured; the
    others deviate by exactly 0. They are summed in place among the zeros, so
    the sums are those of every entry's deviation.
    """
    _, max_power, channels = row_sums.shape
    width = max_power * channels
    orders = torch.arange(1, max_power + 1, dtype=torch.float64, device=row_sums.device)
    flat = row_sums.flatten(1)
    inside = ((flat >= _cut(low, orders[:, None], 1.0).flatten(1)[predicted])
              & (flat <= _cut(high, orders[:, None], -1.0).flatten(1)[predicted]))  # False for NaN
    index = (~inside).flatten().nonzero().squeeze(1)
    entry = index % width  # order-major within the layer, as the bounds
    values = _root(flat.flatten().take(index), orders[entry // channels])
    bound = predicted[index // width] * width + entry
    lo, hi = low.flatten().take(bound), high.flatten().take(bound)
    deviations = torch.zeros_like(flat).flatten().index_put_(
        (index,), (lo - values).clamp_min(0) / _denominator(lo) + (values - hi).clamp_min(0) / _denominator(hi))
    return deviations.view_as(flat).sum(dim=1)


def _cut(bounds: torch.Tensor, orders: torch.Tensor, side: float) -> torch.Tensor:
    """``sign(b) |b|^p`` of bounds [K, P, C] of orders [P, 1], moved into the bounds by the slack.

    ``side``: +1 for lower bounds (moved up), -1 for upper ones (moved down),
    so a cut only ever lets more entries be measured. A bound of 0 cuts at 0
    (ReLU maps have many zeros); the others move off 0 at least, where their
    power underflows. A cut that is not a number (an infinite bound) measures
    every entry.
    """
    raw = bounds.abs().pow(orders).copysign(bounds)
    slack = raw.abs() * CUT_SLACK + (bounds != 0).to(raw.dtype) * torch.finfo(raw.dtype).tiny
    return (raw + side * slack).nan_to_num(nan=side * torch.inf, posinf=torch.inf, neginf=-torch.inf)


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
        self.register_buffer("layer_normalisers", None)  # E[δ_l] [L]
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
        maps, logits = outputs.intermediates, outputs.logits
        if not self._positions:
            self._positions = resolve_layers(self.layers, len(maps), self.name)
            self._sizes = [self.max_power * maps[p].shape[1] for p in self._positions]
        predicted, classes = logits.argmax(dim=1), logits.shape[1]
        smallest_parts, largest_parts = [], []
        for position in self._positions:  # order statistics of the row sums: finish_fit roots them
            sums = _row_sums(maps[position], self.max_power).flatten(1)
            smallest_parts.append(_two_smallest(sums, predicted, classes))
            largest_parts.append(_two_smallest(sums.neg_(), predicted, classes))
        smallest, largest = torch.cat(smallest_parts, dim=2), torch.cat(largest_parts, dim=2)
        counts = torch.bincount(predicted, minlength=classes).to(torch.float64)
        if self._smallest is None or self._largest is None or self._counts is None:  # the three are set together
            self._smallest, self._largest, self._counts = smallest, largest, counts
        else:
            self._smallest = _merge_two_smallest(self._smallest, smallest)
            self._largest = _merge_two_smallest(self._largest, largest)
            self._counts += counts

    def finish_fit(self) -> None:
        counts = self._counts
        if self._smallest is None or self._largest is None or counts is None:  # the three are set together
            raise ValueError("fit received no samples: the in-distribution data is empty")
        all_reduce_sum(counts)
        # the root is monotonic: the rooted order statistics of the row sums are those of the Gram values
        smallest = _rooted(_merge_two_smallest(*all_gather_stacked(self._smallest)), self._sizes, self.max_power)
        largest = _rooted(-_merge_two_smallest(*all_gather_stacked(self._largest)), self._sizes, self.max_power)
        seen = counts > 0
        mins = torch.where(seen[:, None], smallest[0], smallest[0].amin(dim=0))
        maxs = torch.where(seen[:, None], largest[0], largest[0].amax(dim=0))
        # leave-one-out: only the unique extreme image of a class and entry deviates from the others' bounds
        left_out = (smallest[1] - smallest[0]) / _denominator(smallest[1]) \
            + (largest[0] - largest[1]) / _denominator(largest[1])
        several = counts >= 2
        left_out = torch.where(several[:, None], left_out, torch.zeros_like(left_out)).sum(dim=0)  # [F]
        per_layer = torch.stack([chunk.sum() for chunk in left_out.split(self._sizes)])
        images = counts[several].sum()
        device = mins.device
        self.layer_indices = torch.tensor(self._positions, device=device)
        self.layer_sizes = torch.tensor(self._sizes, device=device)
        self.mins, self.maxs = mins, maxs
        self.layer_normalisers = _normalisers(per_layer / images.clamp_min(1))
        self._smallest = self._largest = self._counts = None

    # -- scoring ------------------------------------------------------------------------------
    def layer_deviations(self, outputs: Outputs) -> torch.Tensor:
        """``δ_l(x)`` of every layer against the bounds of the predicted class, [B, L] float64."""
        maps, predicted = outputs.intermediates, outputs.logits.argmax(dim=1)
        sizes, orders = self.layer_sizes.tolist(), (self.max_power, -1)
        lows = self.mins.to(torch.float64).split(sizes, dim=1)
        highs = self.maxs.to(torch.float64).split(sizes, dim=1)
        return torch.stack([
            _layer_deviation(_row_sums(maps[position], self.max_power), predicted,
                             low.unflatten(1, orders), high.unflatten(1, orders))
            for position, low, high in zip(self.layer_indices.tolist(), lows, highs, strict=True)
        ], dim=1)

    def score(self, outputs: Outputs) -> torch.Tensor:
        total = (self.layer_deviations(outputs) / self.layer_normalisers.to(torch.float64)).sum(dim=1)
        return score_dtype(total.to(outputs.logits.dtype))

    # -- the held-out step: E[δ_l] on held-out in-distribution data (the paper's validation step) ------
    def reset_held_out(self) -> None:
        self._held_out_sums = None

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
        self.layer_normalisers = _normalisers(sums[:-1] / sums[-1]).to(self.mins.device)


def _normalisers(expected: torch.Tensor) -> torch.Tensor:
    """``E[δ_l]`` as divisors: a layer whose expected deviation is 0 is divided by 1 (pytorch-ood does the same)."""
    return torch.where(expected > 0, expected, torch.ones_like(expected))


@hookimpl
def timm_ood_detectors() -> list[type[Detector]]:
    return [Gram]
