"""``gram``: Gram matrices' order statistics and deviations against the definition, on the hand-made feature model."""

from __future__ import annotations

import numpy as np
import torch

from timm_ood.detectors.gram import _merge_two_smallest, _two_smallest

from ._feature_model import CLASSES, fit, hand_made_data, logits_of, queries, scores_of


def gram_values(maps: torch.Tensor, max_power: int) -> np.ndarray:
    """Row sums of the full C x C Gram matrices, from the definition."""
    flat = maps.flatten(2).numpy()
    rows = []
    for power in range(1, max_power + 1):
        sums = np.stack([(f ** power @ (f ** power).T).sum(1) for f in flat])
        rows.append(np.sign(sums) * np.abs(sums) ** (1 / power))
    return np.concatenate(rows, axis=1)


def test_gram_order_statistics_stream_like_a_sort_of_everything() -> None:
    """Per class and column, the two smallest values (a repeated minimum counts twice), merged batch by batch."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (300, 7), generator=generator).to(torch.float64)  # many ties
    groups = torch.randint(0, 4, (300,), generator=generator)
    groups[groups == 3] = 2  # class 3 never occurs: +inf
    streamed = _merge_two_smallest(*[_two_smallest(values[i:i + 37], groups[i:i + 37], 4) for i in range(0, 300, 37)])
    for group in range(4):
        members = values[groups == group]
        expected = members.sort(dim=0).values[:2] if len(members) >= 2 else torch.full((2, 7), torch.inf)
        assert torch.equal(streamed[:, group], expected), group


def deviation(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    return float((np.maximum(low - values, 0) / np.abs(low) + np.maximum(values - high, 0) / np.abs(high)).sum())


def test_gram_deviations_normalised_by_the_leave_one_out_expected_deviation() -> None:
    maps, _ = hand_made_data()
    predicted = logits_of(maps).argmax(1)
    layers = [maps, torch.tanh(maps) + maps.square()]
    values = [gram_values(m, 3) for m in layers]
    bounds = [{c: (v[predicted == c].min(0), v[predicted == c].max(0)) for c in range(CLASSES)} for v in values]
    expected_deviation = []
    for v in values:  # each image against the bounds of the other images predicted as its class
        total = 0.0
        for i, c in enumerate(predicted):
            others = v[(predicted == c) & (np.arange(len(v)) != i)]
            total += deviation(v[i], others.min(0), others.max(0))
        expected_deviation.append(total / len(v))
    x = queries()
    x_values = [gram_values(m, 3) for m in (x, torch.tanh(x) + x.square())]
    expected = [sum(deviation(x_values[layer][i], *bounds[layer][c]) / expected_deviation[layer] for layer in range(2))
                for i, c in enumerate(logits_of(x).argmax(1))]
    ood = fit("gram", max_power=3)
    np.testing.assert_allclose(ood.detector.layer_normalisers.numpy(), expected_deviation, rtol=1e-9)
    np.testing.assert_allclose(scores_of(ood, x), expected, rtol=1e-9)
    held_out, _ = hand_made_data(12, seed=3)
    ood.fit_held_out([(held_out,)], progress=False)
    mean_deviation = [np.mean([deviation(gram_values(m, 3)[i], *bounds[layer][c]) for i, c in
                               enumerate(logits_of(held_out).argmax(1))]) for layer, m in
                      enumerate((held_out, torch.tanh(held_out) + held_out.square()))]
    np.testing.assert_allclose(ood.detector.layer_normalisers.numpy(), mean_deviation, rtol=1e-9)
