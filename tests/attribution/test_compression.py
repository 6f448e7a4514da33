"""Quantisation and SVD compression of query gradients (App. C)."""

import pytest
import torch

from diffusion_attribution.attribution.compression import quantize, svd_compress, svd_nbytes


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    sizes = (7, 30, 1, 12)
    # blocks with very different scales, as gradients of different layers have
    x = torch.cat(
        [
            torch.randn(5, n, generator=g) * s
            for n, s in zip(sizes, (1e-4, 1.0, 3.0, 1e2), strict=True)
        ],
        1,
    )
    q = quantize(x, bits, sizes)
    err = (q.dequantize() - x).abs()
    half_step = torch.repeat_interleave(q.scales, torch.tensor(sizes), dim=1) / 2
    assert torch.all(err <= half_step * (1 + 1e-6) + 1e-12)
    qmax = 2 ** (bits - 1) - 1
    # the largest entry of each block is represented exactly (it defines the scale)
    torch.testing.assert_close(
        q.scales, torch.stack([b.abs().amax(1) for b in torch.split(x, sizes, 1)], 1) / qmax
    )


def test_hand_worked_int8():
    x = torch.tensor([[1.27, -0.635, 0.004, 0.0]])
    q = quantize(x, 8)
    assert q.scales.item() == pytest.approx(0.01)
    assert q.codes.tolist() == [[127, -64, 0, 0]]  # -63.5 rounds half to even
    assert q.codes.dtype == torch.int8


def test_4bit_packs_two_codes_per_byte_and_odd_widths():
    x = torch.tensor([[7.0, -7.0, 3.0, -1.0, 0.0]])
    q = quantize(x, 4)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (1, 3)
    torch.testing.assert_close(q.dequantize(), x)
    assert q.nbytes() < quantize(x, 8).nbytes() + 1


def test_zero_rows_and_row_slices():
    x = torch.zeros(3, 4)
    x[1] = torch.arange(4.0)
    q = quantize(x, 8)
    torch.testing.assert_close(q.dequantize(), x, atol=0.02, rtol=0)
    torch.testing.assert_close(q.dequantize(slice(1, 2)), q.dequantize()[1:2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(1, 2), 3)
    with pytest.raises(ValueError, match="block_sizes"):
        quantize(torch.ones(1, 4), 8, (1, 2))


def test_svd_full_rank_is_exact_and_rank_one_hand_worked():
    shapes = [torch.Size([3, 2, 2]), torch.Size([3])]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 15, generator=g, dtype=torch.float64)
    torch.testing.assert_close(svd_compress(x, shapes, rank=3), x)
    # a rank-one layer gradient survives rank-1 compression exactly
    u, v = torch.randn(3, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    row = torch.cat([(u @ v).flatten(), torch.ones(3, dtype=torch.float64)])[None]
    torch.testing.assert_close(svd_compress(row, shapes, rank=1), row)
    low = svd_compress(x, shapes, rank=1)
    assert not torch.allclose(low[:, :12], x[:, :12])
    torch.testing.assert_close(low[:, 12:], x[:, 12:])  # biases kept
    assert svd_nbytes(shapes, 1, rows=2) == 4 * 2 * ((3 + 4 + 1) + 3)
