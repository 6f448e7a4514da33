"""The curvature stage's spectrum summary."""

import torch

from diffusion_attribution.pipeline.stages.curvature import spectrum_quantiles


def test_spectrum_quantiles_keep_the_ends():
    ev = torch.arange(100_000, dtype=torch.float64)
    q = spectrum_quantiles(ev, points=11)
    assert q[0] == 99_999 and q[-1] == 0 and len(q) == 11 and bool((q[:-1] >= q[1:]).all())
    assert torch.equal(spectrum_quantiles(ev[:5]), ev[:5].flip(0))
