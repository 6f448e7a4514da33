"""Fixtures of the hooks and partial-sums tests: the ``TINY_4X4`` U-Net in float64 (every layer
type: convolutions, token attention with Linear q/k/v/out, a time-embedding MLP, GroupNorm)
and a few examples with their pre-drawn ``(t, eps)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_attribution.diffusion.unet import UNet
from tests.curvature.oracles import F64, N, S, T


@pytest.fixture
def net(tiny_unet: UNet) -> nn.Module:
    """The seeded ``TINY_4X4`` U-Net (float64), in eval mode."""
    return tiny_unet.eval()


@pytest.fixture(scope="module")
def data():
    """N = 5 examples (1, 4, 4) with S = 2 draws each: ``(x0, t, eps)`` in float64."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(N, 1, 4, 4, generator=g, dtype=F64)
    t = torch.randint(1, T + 1, (N, S), generator=g)
    eps = torch.randn(N, S, 1, 4, 4, generator=g, dtype=F64)
    return x0, t, eps
