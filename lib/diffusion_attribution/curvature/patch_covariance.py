"""The expand input factor of a convolution without materialising its patches.

K-FAC-expand's input factor of a ``Conv2d`` with a ``k x k`` kernel is the Gram matrix of the
``unfold`` patches, ``A = sum_{b, u} p_bu p_bu^T`` over batch rows b and output positions u,
indexed by ``(c, i, j)`` (channel-major, then the kernel tap, ``unfold``'s order). Built from
the patch matrix it costs ``2 (C k^2)^2`` flops per position, ``k^2`` times a forward pass of
a ``C -> C`` layer. For stride 1 and dilation 1 entry ``((c, i, j), (c', i', j'))`` only
depends on the displacement ``delta = (i' - i, j' - j)`` of the two taps and on the window of
input positions tap ``(i, j)`` reads::

    A[(c,i,j), (c',i',j')] = sum_b sum_{q in W_ij} x[b, c, q] x0[b, c', q + delta]

with ``x0`` the input, zero outside the image, and ``W_ij`` the input positions tap ``(i, j)``
meets inside the image (rows ``[i - p, i - p + H_out)`` intersected with ``[0, H)``, likewise
columns; ``p`` the padding). Over the whole image the sums for every ``delta`` in
``[-(k-1), k-1]^2`` are one weight gradient of a ``(2k - 1) x (2k - 1)`` convolution of ``x``
with itself (:func:`torch.nn.grad.conv2d_weight`, ``(2k-1)^2 C^2`` multiply-adds per position,
25 instead of 81 for ``k = 3``). A window ``W_ij`` is the image minus at most a band of rows
and a band of columns at the border, so its sums are the whole image's minus the bands', plus
their corner (inclusion-exclusion); a band has one row (or column) per unit of ``|i - p|``,
so it costs ``1 / H`` of the whole. :func:`patch_covariance` returns exactly ``cols @ cols.T``
of the patch matrix ``cols`` (``tests/curvature/test_patch_covariance.py`` checks it against
``unfold`` in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

__all__ = ["fast_path_applies", "gram", "patch_covariance", "patch_sums"]


#: Below this many input rows or columns the border bands cost more than they save: on 2 CPU
#: cores, batch 512, the patch matrix's Gram was faster at 4 x 4 (C = 32: 10 ms vs 17 ms) and
#: slower at 8 x 8 (C = 48: 78 ms vs 34 ms; C = 16: 9 ms vs 4.5 ms).
MIN_SIDE = 8


def fast_path_applies(conv: nn.Conv2d, x: Tensor | None = None) -> bool:
    """Whether :func:`patch_covariance` handles ``conv``: stride 1, dilation 1, one group,
    a square kernel larger than 1 x 1, the same integer zero padding on every side; with an
    input ``x``, also whether it is worth it (both sides at least :data:`MIN_SIDE`)."""
    k1, k2 = conv.kernel_size
    p = conv.padding
    if x is not None and min(x.shape[-2:]) < MIN_SIDE:
        return False
    return (
        conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and k1 == k2 > 1
        and isinstance(p, tuple)
        and p[0] == p[1]
        and conv.padding_mode == "zeros"
    )


def _correlation(
    xp: Tensor, x: Tensor, k: int, rows: tuple[int, int], cols: tuple[int, int]
) -> Tensor:
    """``sum_b sum_{q in rows x cols} x[b, c, q] x0[b, c', q + delta]`` for every ``delta`` in
    ``[-(k-1), k-1]^2``: shape (C, C, 2k - 1, 2k - 1), ``delta = (m - (k-1), n - (k-1))`` at
    ``[:, :, m, n]``. ``xp`` is ``x`` zero-padded by ``k - 1`` on every side."""
    (r0, r1), (c0, c1) = rows, cols
    c = x.shape[1]
    window = xp[:, :, r0 : r1 + 2 * (k - 1), c0 : c1 + 2 * (k - 1)]
    return conv2d_weight(window, (c, c, 2 * k - 1, 2 * k - 1), x[:, :, r0:r1, c0:c1])


def _bands(tap: int, pad: int, size: int, out_size: int) -> list[tuple[int, int]]:
    """The input rows (or columns) in ``[0, size)`` that tap ``tap`` never reads: a prefix
    and / or a suffix band, as (start, stop) ranges."""
    lo, hi = max(0, tap - pad), min(size, tap - pad + out_size)
    return [band for band in ((0, lo), (hi, size)) if band[1] > band[0]]


def patch_covariance(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``cols @ cols.T`` of the ``unfold`` patches of ``x`` (B, C, H, W) under ``conv``
    (module docstring), shape (C k^2, C k^2), in ``x``'s dtype. Needs
    :func:`fast_path_applies`."""
    if not fast_path_applies(conv):
        raise ValueError(f"patch_covariance: {conv} is not a stride-1, one-group square conv")
    k, p = conv.kernel_size[0], conv.padding[0]
    _, c, h, w = x.shape
    h_out, w_out = h + 2 * p - k + 1, w + 2 * p - k + 1
    xp = F.pad(x, (k - 1,) * 4)
    whole = _correlation(xp, x, k, (0, h), (0, w))
    cache: dict[tuple, Tensor] = {}

    def part(rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
        if (rows, cols) not in cache:
            cache[(rows, cols)] = _correlation(xp, x, k, rows, cols)
        return cache[(rows, cols)]

    # per tap (i, j): the sums over its window W_ij, by inclusion-exclusion of border bands
    per_tap = torch.empty(k, k, c, c, 2 * k - 1, 2 * k - 1, dtype=x.dtype, device=x.device)
    for i in range(k):
        row_bands = _bands(i, p, h, h_out)
        for j in range(k):
            col_bands = _bands(j, p, w, w_out)
            total = whole.clone()
            for rows in row_bands:
                total -= part(rows, (0, w))
            for cols in col_bands:
                total -= part((0, h), cols)
            for rows in row_bands:
                for cols in col_bands:
                    total += part(rows, cols)
            per_tap[i, j] = total
    # A[(c,i,j),(c',i',j')] = per_tap[i, j, c, c', i' - i + k - 1, j' - j + k - 1]
    taps = torch.arange(k, device=x.device)
    delta = taps[None, :] - taps[:, None] + k - 1  # [i, i'] -> index of i' - i
    blocks = per_tap[
        taps.view(k, 1, 1, 1),
        taps.view(1, k, 1, 1),
        :,
        :,
        delta.view(k, 1, k, 1),
        delta.view(1, k, 1, k),
    ]  # (i, j, i', j', c, c')
    return blocks.permute(4, 0, 1, 5, 2, 3).reshape(c * k * k, c * k * k)


def patch_sums(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``cols.sum(1)`` of the ``unfold`` patches of ``x`` under ``conv``, shape (C k^2,): per
    ``(c, i, j)`` the sum of the inputs tap ``(i, j)`` reads, a weight gradient against ones."""
    k, p = conv.kernel_size[0], conv.padding[0]
    b, c, h, w = x.shape
    ones = x.new_ones(b, 1, h + 2 * p - k + 1, w + 2 * p - k + 1)
    return conv2d_weight(x, (1, c, k, k), ones, padding=p).reshape(-1)


def gram(cols: Tensor, block: int = 64) -> Tensor:
    """``cols @ cols.T``, computing only the block upper triangle (the lower one is its
    transpose): about 1.3x faster for the 288-576 rows of a 3x3 conv's patches on 4x4 maps."""
    n = cols.shape[0]
    if n < 2 * block:
        return cols @ cols.T
    out = cols.new_empty(n, n)
    for i in range(0, n, block):
        rows = cols[i : i + block] @ cols[i:].T
        out[i : i + block, i:] = rows
        out[i + block :, i : i + block] = rows[:, block:].T
    return out
