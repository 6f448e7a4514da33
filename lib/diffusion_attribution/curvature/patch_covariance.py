"""The expand input factor of a convolution without materialising its patches.

K-FAC-expand's input factor of a ``Conv2d`` with a ``k x k`` kernel is the Gram matrix of the
``unfold`` patches, ``A = sum_{b, u} p_bu p_bu^T`` over batch rows b and output positions u,
indexed by ``(c, i, j)`` (channel-major, then the kernel tap, ``unfold``'s order). Built from
the patch matrix it costs ``(C k^2)^2 / 2`` multiply-adds per position (:func:`gram`, the upper
triangle), ``k^2 / 2`` times a forward pass of a ``C -> C`` layer. For stride 1 and dilation 1,
with the input ``x0`` zero outside the image,

    A[(c,i,j), (c',i',j')] = sum_{q in W_ij} P_delta[q][c, c'],
    P_delta[q] = sum_b x[b, :, q] x0[b, :, q + delta]^T,   delta = (i' - i, j' - j),

where ``W_ij`` is the box of input positions tap ``(i, j)`` reads inside the image (rows
``[i - p, i - p + H_out)`` intersected with ``[0, H)``, likewise columns; ``p`` the padding).
Two exact ways to get it from products of input positions, without patches
(``tests/curvature/test_patch_covariance.py`` checks both against ``unfold`` in float64):

* :func:`displacement_covariance`: the products ``P_delta`` at every position for half of the
  ``(2k - 1)^2`` displacements -- ``delta`` and ``-delta`` give transposed blocks,
  ``A[(c',i',j'), (c,i,j)] = A[(c,i,j), (c',i',j')]``, so ``delta`` rows ``>= 0`` (columns
  ``>= 0`` on row 0) suffice: ``(2k^2 - 2k + 1) C^2`` multiply-adds per position, 13 C^2 for
  ``k = 3`` against the patch matrix's 40.5 C^2 -- one batched matrix product per
  displacement, then every tap's box sum as one product with the taps' 0/1 window masks.
* :func:`position_gram_covariance`: the Gram ``M`` of the whole input vector, positions and
  channels, ``(H W C)^2 / 2`` multiply-adds per row (one large matrix product), then every
  block of ``A`` as one product of ``M`` with the 0/1 counts of the position pairs each tap
  pair reads. Fewer multiply-adds on small maps read by many rows: ``H W / 2`` per row
  against ``2k^2 - 2k + 1`` displacements, plus a cost per call that does not grow with the
  rows (:func:`input_covariance` counts both).

:func:`input_covariance` picks the cheaper one and returns the factor with its column sums
(:func:`patch_sums`). ``python benchmarks/bench_patch_covariance.py`` times each form on every
convolution of the default U-Net; ``benchmarks/bench_kronfluence.py`` times the whole fit.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

__all__ = [
    "displacement_covariance",
    "fast_path_applies",
    "gram",
    "input_covariance",
    "patch_sums",
    "position_gram_covariance",
]


def fast_path_applies(conv: nn.Conv2d) -> bool:
    """Whether :func:`input_covariance` handles ``conv``: stride 1, dilation 1, one group, a
    square kernel larger than 1 x 1, the same integer zero padding on every side."""
    k1, k2 = conv.kernel_size
    p = conv.padding
    return (
        conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and k1 == k2 > 1
        and isinstance(p, tuple)
        and p[0] == p[1]
        and conv.padding_mode == "zeros"
    )


def _check(conv: nn.Conv2d, x: Tensor) -> tuple[int, int]:
    if not fast_path_applies(conv):
        raise ValueError(f"patch covariance: {conv} is not a stride-1, one-group square conv")
    k, p = conv.kernel_size[0], conv.padding[0]
    if x.dim() != 4 or min(x.shape[-2:]) + 2 * p - k + 1 < 1:
        raise ValueError(f"patch covariance: {conv} has no output position on {tuple(x.shape)}")
    return k, p


def _displacements(k: int) -> list[tuple[int, int]]:
    """Half of ``[-(k-1), k-1]^2``: rows > 0 with any column, and row 0 with columns >= 0."""
    return [(dr, dc) for dr in range(k) for dc in range(1 - k, k) if dr > 0 or dc >= 0]


@functools.lru_cache(maxsize=64)
def _plan(k: int, p: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For the ``k^4`` tap pairs in ``(i, j, i', j')`` order: the displacement index, the tap
    whose window is summed, whether the block is the transpose of the mirrored pair's; and the
    (k^2, H (W + k - 1)) 0/1 window masks of the taps over rows of ``W + k - 1`` positions (the
    last ``k - 1`` of a row are zeros of the padding, outside every window)."""
    ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
    index = {d: n for n, d in enumerate(_displacements(k))}
    masks = torch.zeros(k, k, h, w + k - 1)
    for i in range(k):
        for j in range(k):
            rows = slice(max(0, i - p), max(0, min(h, i - p + ho)))
            cols = slice(max(0, j - p), max(0, min(w, j - p + wo)))
            masks[i, j, rows, cols] = 1
    delta, tap, flip = [], [], []
    for i in range(k):
        for j in range(k):
            for i2 in range(k):
                for j2 in range(k):
                    d = (i2 - i, j2 - j)
                    mirrored = d not in index  # then sum over the window of tap (i', j')
                    delta.append(index[(-d[0], -d[1])] if mirrored else index[d])
                    tap.append(i2 * k + j2 if mirrored else i * k + j)
                    flip.append(mirrored)
    return torch.tensor(delta), torch.tensor(tap), torch.tensor(flip), masks.view(k * k, -1)


def _blocks_to_matrix(blocks: Tensor, c: int, k: int) -> Tensor:
    """(i, j, i', j', c, c') blocks -> the (C k^2, C k^2) factor in ``unfold``'s order."""
    return blocks.view(k, k, k, k, c, c).permute(4, 0, 1, 5, 2, 3).reshape(c * k * k, c * k * k)


def displacement_covariance(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``cols @ cols.T`` of the ``unfold`` patches of ``x`` (B, C, H, W) under ``conv`` from
    the products ``P_delta`` of half the displacements (module docstring), shape
    (C k^2, C k^2), in ``x``'s dtype.

    The input is laid out once, zero-padded, as rows of ``W' = W + k - 1`` positions (B, C)
    each: the ``k - 1`` zeros at the start of a row are also those past the end of the row
    before. Then ``x0[q + delta]`` for every position q is one contiguous slice, shifted by
    ``delta_row W' + delta_col``, and each ``P_delta`` one batched product without copies, at
    ``W' / W`` times the multiply-adds (the padding positions give zero products). Memory: the
    padded input, one (H W', C, C) product and the (n, k^2, C^2) window sums. No autograd
    graph (the products are written in place)."""
    k, p = _check(conv, x)
    x = x.detach()
    b, c, h, w = x.shape
    delta, tap, flip, masks = _plan(k, p, h, w)
    wp, n = w + k - 1, h * (w + k - 1)
    rows = h + k - 1 + -(-2 * (k - 1) // wp)  # zero rows below: the last slice ends inside
    xs = x.new_zeros(rows * wp, b, c)
    xs.view(rows, wp, b, c)[:h, k - 1 :] = x.permute(2, 3, 0, 1)
    xq = xs[k - 1 : k - 1 + n].transpose(1, 2)  # (n, C, B): x at q, a transposed view
    masks, disp = masks.to(x), _displacements(k)
    prod, sums = x.new_empty(n, c, c), x.new_empty(len(disp), k * k, c * c)
    for m, (dr, dc) in enumerate(disp):
        start = k - 1 + dr * wp + dc
        torch.bmm(xq, xs[start : start + n], out=prod)  # P_delta at every q
        torch.matmul(masks, prod.view(n, c * c), out=sums[m])  # (k^2 windows, C^2)
    boxes = sums[delta.to(x.device), tap.to(x.device)].view(-1, c, c)
    boxes = torch.where(flip.to(x.device).view(-1, 1, 1), boxes.transpose(1, 2), boxes)
    return _blocks_to_matrix(boxes, c, k)


@functools.lru_cache(maxsize=64)
def _pair_counts(k: int, p: int, h: int, w: int) -> Tensor:
    """(k^4, (H W)^2): for tap pair ``(i, j, i', j')`` and input positions ``(q, q')``, the
    number of output positions u with ``q = u + (i, j) - p`` and ``q' = u + (i', j') - p``,
    both inside the image."""
    ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
    counts = torch.zeros(k, k, k, k, h * w, h * w)
    for i, j, i2, j2 in itertools.product(range(k), repeat=4):
        for ur, uc in itertools.product(range(ho), range(wo)):
            r, s, r2, s2 = ur + i - p, uc + j - p, ur + i2 - p, uc + j2 - p
            if 0 <= r < h and 0 <= s < w and 0 <= r2 < h and 0 <= s2 < w:
                counts[i, j, i2, j2, r * w + s, r2 * w + s2] += 1
    return counts.view(k**4, (h * w) ** 2)


def position_gram_covariance(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``cols @ cols.T`` of the ``unfold`` patches of ``x`` (B, C, H, W) under ``conv`` from
    the Gram ``M`` of the whole input (positions, then channels): ``A[(c,i,j), (c',i',j')] =
    sum_u M[(u + (i, j) - p, c), (u + (i', j') - p, c')]`` over the output positions ``u``
    whose two inputs lie inside the image, as one product of 0/1 counts with ``M``; memory
    twice ``(H W C)^2`` (``M`` and its reordered copy), for small maps."""
    k, p = _check(conv, x)
    b, c, h, w = x.shape
    m = gram(x.permute(0, 2, 3, 1).reshape(b, h * w * c).T)  # rows (position, channel)
    m = m.view(h * w, c, h * w, c).transpose(1, 2).reshape((h * w) ** 2, c * c)
    return _blocks_to_matrix(_pair_counts(k, p, h, w).to(x) @ m, c, k)


def patch_sums(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``cols.sum(1)`` of the ``unfold`` patches, shape (C k^2,): a weight gradient of the
    batch-summed input against ones (the ones are the same for every row)."""
    k, p = _check(conv, x)
    _, c, h, w = x.shape
    ones = x.new_ones(1, 1, h + 2 * p - k + 1, w + 2 * p - k + 1)
    return conv2d_weight(x.sum(0, keepdim=True), (1, c, k, k), ones, padding=p).reshape(-1)


def input_covariance(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(cols @ cols.T, cols.sum(1))`` of ``conv``'s ``unfold`` patches of ``x`` (B, C, H, W),
    by whichever form takes fewer multiply-adds (in units of ``H W C^2``): the whole input's
    Gram, ``B H W / 2`` plus ``k^4 H W`` for its product with the pair counts, or the
    displacement products, ``n B`` plus ``n k^2`` for the window sums, ``n = 2k^2 - 2k + 1``;
    the Gram only where it is no larger than the patch matrix (``H W C <= k^2 B``). For 3 x 3
    kernels that is the Gram on 4 x 4 maps from 236 rows on, never from 26 positions on."""
    k, _ = _check(conv, x)
    b, c = x.shape[:2]
    positions, n = x.shape[-2] * x.shape[-1], len(_displacements(k))
    cheaper = b * positions / 2 + k**4 * positions < n * b + n * k * k
    small = cheaper and positions * c <= k * k * b
    cov = position_gram_covariance(conv, x) if small else displacement_covariance(conv, x)
    return cov, patch_sums(conv, x)


def gram(cols: Tensor, block: int = 64) -> Tensor:
    """``cols @ cols.T``, computing only the block upper triangle (the lower one is its
    transpose; from 128 rows on): the patch matrix of the convolutions without a fast path and
    the whole input of :func:`position_gram_covariance`."""
    n = cols.shape[0]
    if n < 2 * block:
        return cols @ cols.T
    out = cols.new_empty(n, n)
    for i in range(0, n, block):
        rows = cols[i : i + block] @ cols[i:].T
        out[i : i + block, i:] = rows
        out[i + block :, i : i + block] = rows[:, block:].T
    return out
