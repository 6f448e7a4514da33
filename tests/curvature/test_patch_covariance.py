"""The expand input factor of a stride-1 convolution without patches, against ``unfold``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_attribution.curvature.patch_covariance import (
    fast_path_applies,
    gram,
    patch_covariance,
    patch_sums,
)


def unfold_columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding)  # (B, C k^2, L)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


@pytest.mark.parametrize(
    "c, h, w, k, p",
    [(2, 8, 9, 3, 1), (3, 8, 8, 3, 0), (2, 9, 8, 5, 2), (2, 8, 10, 3, 2), (1, 12, 8, 5, 1)],
    ids=["3x3-same", "3x3-valid", "5x5-same", "3x3-pad2", "5x5-pad1"],
)
def test_equals_the_gram_of_the_unfold_patches(c, h, w, k, p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, h, w, generator=g, dtype=torch.float64)
    conv = nn.Conv2d(c, 4, k, padding=p).double()
    assert fast_path_applies(conv, x)
    cols = unfold_columns(conv, x)
    torch.testing.assert_close(patch_covariance(conv, x), cols @ cols.T, rtol=0, atol=1e-11)
    torch.testing.assert_close(patch_sums(conv, x), cols.sum(1), rtol=0, atol=1e-11)


def test_other_convolutions_and_small_maps_take_the_patch_matrix():
    x = torch.randn(2, 3, 8, 8)
    assert not fast_path_applies(nn.Conv2d(3, 3, 3, stride=2, padding=1), x)
    assert not fast_path_applies(nn.Conv2d(3, 3, 1), x)
    assert not fast_path_applies(nn.Conv2d(3, 3, 3, padding=1, dilation=2), x)
    assert not fast_path_applies(nn.Conv2d(3, 3, 3, padding=1), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="stride-1, one-group"):
        patch_covariance(nn.Conv2d(3, 3, 3, stride=2), x)


@pytest.mark.parametrize("n", [100, 128, 288, 577])
def test_blocked_gram_equals_the_product(n):
    cols = torch.randn(n, 300, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(gram(cols), cols @ cols.T, rtol=0, atol=1e-11)
