"""Streaming percentiles (``timm_ood.detectors.quantiles``) against NumPy's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from timm_ood.detectors.quantiles import StreamingHistogram, histogram_percentile, linear_percentile


def test_streaming_histogram_percentiles_are_within_one_bin_of_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(500, generator=generator, dtype=torch.float64) * 10.0**k for k in (-3, 0, 2)]
    chunks.append(torch.zeros(300, dtype=torch.float64))
    values = torch.cat(chunks)
    streamed, whole = StreamingHistogram(), StreamingHistogram()
    for chunk in chunks:
        streamed.update(chunk)
    whole.update(values[torch.randperm(len(values), generator=generator)])
    (counts, exponent), (whole_counts, whole_exponent) = streamed.finish(), whole.finish()
    assert torch.equal(counts, whole_counts) and int(exponent) == int(whole_exponent)  # order and batching free
    width = 2.0 ** int(exponent)
    assert width <= float(values.abs().max()) / 2**14
    for percentile in (0, 5, 33.3, 50, 90, 99, 100):
        exact = np.percentile(values.numpy(), percentile)
        assert abs(float(histogram_percentile(counts, exponent, percentile)) - exact) < width
        assert float(linear_percentile(values, percentile)) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="NaN or infinite"):
        streamed.update(torch.tensor([1.0, float("nan")]))
