"""The expand input factor of a stride-1 convolution without patches, against ``unfold``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_attribution.curvature.patch_covariance import (
    displacement_covariance,
    fast_path_applies,
    gram,
    input_covariance,
    patch_sums,
    position_gram_covariance,
)

SHAPES = [
    (2, 8, 9, 3, 1),
    (3, 8, 8, 3, 0),
    (2, 9, 8, 5, 2),
    (2, 8, 10, 3, 2),
    (1, 12, 8, 5, 1),
    (3, 4, 4, 3, 1),
    (2, 3, 5, 3, 1),
    (2, 2, 2, 5, 2),
    (2, 3, 4, 7, 2),
    (1, 2, 3, 6, 2),
]
IDS = [
    "3x3-same",
    "3x3-valid",
    "5x5-same",
    "3x3-pad2",
    "5x5-pad1",
    "4x4",
    "3x5",
    "2x2-5x5",
    "3x4-7x7",
    "2x3-6x6",
]


def unfold_columns(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding)  # (B, C k^2, L)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


@pytest.mark.parametrize("method", [displacement_covariance, position_gram_covariance])
@pytest.mark.parametrize("c, h, w, k, p", SHAPES, ids=IDS)
def test_equals_the_gram_of_the_unfold_patches(method, c, h, w, k, p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, h, w, generator=g, dtype=torch.float64)
    conv = nn.Conv2d(c, 4, k, padding=p).double()
    cols = unfold_columns(conv, x)
    torch.testing.assert_close(method(conv, x), cols @ cols.T, rtol=0, atol=1e-11)
    torch.testing.assert_close(patch_sums(conv, x), cols.sum(1), rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    "rows, side, chosen",
    [
        (512, 4, position_gram_covariance),
        (64, 4, displacement_covariance),
        (512, 8, displacement_covariance),
    ],
    ids=["4x4-many-rows", "4x4-few-rows", "8x8"],
)
def test_input_covariance_takes_the_gram_on_small_maps_of_many_rows(
    rows, side, chosen, monkeypatch
):
    x = torch.randn(rows, 3, side, side, dtype=torch.float64)
    conv = nn.Conv2d(3, 3, 3, padding=1).double()
    cols = unfold_columns(conv, x)
    cov, sums = input_covariance(conv, x)
    torch.testing.assert_close(cov, cols @ cols.T, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sums, cols.sum(1), rtol=1e-12, atol=1e-10)
    called = []
    name = chosen.__name__
    module = "diffusion_attribution.curvature.patch_covariance"
    monkeypatch.setattr(f"{module}.{name}", lambda *a: called.append(name) or chosen(*a))
    input_covariance(conv, x)
    assert called == [name]


def test_strided_inputs_that_require_grad():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 8, 9, 4, generator=g, dtype=torch.float64)
    x = base.permute(0, 3, 1, 2)[:, 1:, :, ::2].requires_grad_()  # (3, 3, 8, 5), strided
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    cols = unfold_columns(conv, x.detach())
    for method in (displacement_covariance, position_gram_covariance):
        torch.testing.assert_close(method(conv, x).detach(), cols @ cols.T, rtol=0, atol=1e-11)


def test_float32_stays_float32_and_other_convolutions_are_refused():
    x = torch.randn(2, 3, 8, 8)
    assert displacement_covariance(nn.Conv2d(3, 3, 3, padding=1), x).dtype == torch.float32
    for conv in (
        nn.Conv2d(3, 3, 3, stride=2, padding=1),
        nn.Conv2d(3, 3, 3, padding=1, dilation=2),
        nn.Conv2d(3, 3, 1),
    ):
        assert not fast_path_applies(conv)
        with pytest.raises(ValueError, match="stride-1, one-group"):
            input_covariance(conv, x)
    with pytest.raises(ValueError, match="no output position"):
        input_covariance(nn.Conv2d(3, 3, 5), torch.randn(2, 3, 3, 8))


@pytest.mark.parametrize("n", [100, 128, 288, 577])
def test_blocked_gram_equals_the_product(n):
    cols = torch.randn(n, 300, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(gram(cols), cols @ cols.T, rtol=0, atol=1e-11)
