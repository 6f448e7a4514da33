"""Compression of (preconditioned) query gradients (paper Sec. 3.2 and App. C).

The paper stores the preconditioned query gradients H^{-1} grad m(theta, x_q) quantised to
8 bits (App. C, Fig. 6): quantisation keeps the ranking of the influence scores almost
exactly, while the low-rank (SVD) compression of Grosse et al. (2023) does not, because
gradients of diffusion measurements average many (t, eps) draws and are not low-rank.

Quantisation here is symmetric and per block: each row (one query) is split into blocks (one
per parameter tensor, so that layers with small gradients keep their resolution) and each
block x is stored as round(x / s) in [-(2^(b-1) - 1), 2^(b-1) - 1] with scale
s = max|x| / (2^(b-1) - 1). The round-trip error of each entry is at most s / 2 (half a
quantisation step). 8-bit codes are stored as int8; 4-bit codes are packed two to a byte.
(torch's own ``quantize_per_channel`` is deprecated and has no 4-bit per-channel kernel, hence
the few lines below.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Quantized:
    """Codes (Q, P) int8, or (Q, ceil(P / 2)) uint8 for 4 bits; scales (Q, num_blocks) float32."""

    codes: Tensor
    scales: Tensor
    bits: int
    block_sizes: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], sum(self.block_sizes))

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def dequantize(self, rows: slice | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float values of rows ``rows`` (all by default), shape (q, P)."""
        codes = self.codes if rows is None else self.codes[rows]
        scales = self.scales if rows is None else self.scales[rows]
        if self.bits == 4:
            codes = _unpack4(codes, sum(self.block_sizes))
        repeats = torch.tensor(self.block_sizes, device=scales.device)
        per_entry = torch.repeat_interleave(scales, repeats, dim=1)
        return codes.to(dtype) * per_entry.to(dtype)

    def to(self, device: torch.device | str) -> Quantized:
        """The same codes and scales on ``device``."""
        return Quantized(self.codes.to(device), self.scales.to(device), self.bits, self.block_sizes)


def _levels(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize(x: Tensor, bits: int = 8, block_sizes: Sequence[int] | None = None) -> Quantized:
    """Symmetric per-(row, block) quantisation of ``x`` (Q, P) to ``bits`` in {4, 8}.

    ``block_sizes`` partition the P columns (default: one block per row); use the sizes of
    the parameter tensors so each layer gets its own scale.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (Q, P), got shape {tuple(x.shape)}")
    qmax = _levels(bits)
    sizes = tuple(block_sizes) if block_sizes is not None else (x.shape[1],)
    if sum(sizes) != x.shape[1] or min(sizes) <= 0:
        raise ValueError(
            f"block_sizes must be positive and sum to {x.shape[1]}, got sum {sum(sizes)}"
        )
    blocks = torch.split(x.float(), sizes, dim=1)
    scales = torch.stack([b.abs().amax(1) for b in blocks], dim=1) / qmax  # (Q, num_blocks)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    per_entry = torch.repeat_interleave(safe, torch.tensor(sizes, device=x.device), dim=1)
    codes = torch.round(x.float() / per_entry).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        codes = _pack4(codes)
    return Quantized(codes=codes, scales=scales, bits=bits, block_sizes=sizes)


def _pack4(codes: Tensor) -> Tensor:
    """Two 4-bit codes in [-7, 7] per byte (offset by 8), low nibble first."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        pad = torch.full((u.shape[0], 1), 8, dtype=torch.uint8, device=u.device)
        u = torch.cat([u, pad], dim=1)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack4(packed: Tensor, width: int) -> Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :width]


def svd_compress(x: Tensor, shapes: Sequence[torch.Size], rank: int) -> Tensor:
    """Rank-``rank`` approximation of each row, layer by layer (Grosse et al., 2023).

    Each row of ``x`` (Q, P) is split into parameter tensors of the given ``shapes``; every
    tensor with two or more dimensions is viewed as a matrix (out, rest) and replaced by its
    best rank-``rank`` approximation (truncated SVD); vectors (biases) are kept. Returns the
    reconstructed (Q, P) matrix, for measuring what the compression does to the scores.
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"shapes cover {sum(sizes)} entries, x has {x.shape[1]} columns")
    out = []
    for block, shape in zip(torch.split(x, sizes, dim=1), shapes, strict=True):
        if len(shape) < 2:
            out.append(block)
            continue
        mats = block.reshape(x.shape[0], shape[0], -1)
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        r = min(rank, s.shape[1])
        low = (u[:, :, :r] * s[:, None, :r]) @ vh[:, :r, :]
        out.append(low.reshape(x.shape[0], -1))
    return torch.cat(out, dim=1)


def svd_nbytes(shapes: Sequence[torch.Size], rank: int, rows: int) -> int:
    """Bytes to store ``rows`` rank-``rank`` factorised gradients in float32."""
    total = 0
    for s in shapes:
        if len(s) < 2:
            total += int(torch.Size(s).numel())
        else:
            m, n = s[0], int(torch.Size(s[1:]).numel())
            r = min(rank, m, n)
            total += r * (m + n + 1)
    return 4 * total * rows


def score_agreement(reference: Tensor, other: Tensor) -> dict[str, float]:
    """How well compressed-query scores reproduce uncompressed ones (App. C, Fig. 6).

    Pearson and Spearman correlation between the rows of ``reference`` and ``other`` (Q, N):
    one correlation per query over the training examples; returns their mean and minimum.
    """
    from scipy.stats import pearsonr, spearmanr  # slow to import; only this check needs it

    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    a, b = reference.double().numpy(), other.double().numpy()
    pear = torch.tensor([pearsonr(x, y).statistic for x, y in zip(a, b, strict=True)])
    spear = torch.tensor([spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)])
    return {
        "pearson_mean": float(pear.mean()),
        "pearson_min": float(pear.min()),
        "spearman_mean": float(spear.mean()),
        "spearman_min": float(spear.min()),
    }
