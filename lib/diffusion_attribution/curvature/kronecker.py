"""Kronecker-factored blocks ``G (x) A`` and their eigendecompositions (paper eq. 12).

A layer with weight ``W`` of shape ``(d_out, d_in)`` gets the block ``K_l = G_l (x) A_l`` acting
on the row-major ``vec(W) = W.flatten()``, i.e. ``K_l vec(M) = vec(G_l M A_l)`` (``A_l (x) G_l``
in the paper's column-major notation). With ``A = Q_A diag(a) Q_A^T`` and
``G = Q_G diag(g) Q_G^T`` the block's eigenvectors are ``Q_G[:, i] (x) Q_A[:, j]`` with
eigenvalues ``g_i a_j`` (EK-FAC: corrected eigenvalues ``E_ij``), so

    (G (x) A + lambda I)^{-1} vec(M) = vec(Q_G [(Q_G^T M Q_A) / (g_i a_j + lambda)] Q_A^T).

This module knows nothing of curvlinops: :class:`LayerFactors` is what a fitter hands over
(:mod:`~diffusion_attribution.curvature.partial_sums` and
:mod:`~diffusion_attribution.curvature.curvlinops_backend` fill it) and
:func:`kronecker_blocks` turns it into :class:`KroneckerBlock` s with cached
eigendecompositions. The normalisation of the factors is derived in
:mod:`diffusion_attribution.curvature.kfac`'s module docstring.

**Precision.** Blocks are float64 by default. With ``precision="float32"`` the symmetrised
factor is eigendecomposed in float32 and every tensor of the block is kept in float32 (half
the memory, about 2x faster ``eigh`` on a CPU); eigenvectors are then orthonormal to ~1e-6, so
``Q (diag(e) + lambda)^{-1} Q^T`` is the inverse of ``Q (diag(e) + lambda) Q^T`` to that
relative accuracy rather than to float64 round-off. How far influence scores move is measured
in ``tests/curvature/test_precision.py`` and ``benchmarks/bench_eigh_precision.py``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from diffusion_attribution.core.io import check_finite

__all__ = [
    "PRECISIONS",
    "KroneckerBlock",
    "LayerFactors",
    "Precision",
    "check_blocks",
    "check_factor_finite",
    "kronecker_blocks",
    "precision_dtype",
]

Precision = Literal["float64", "float32"]
"""The dtype of a block's eigendecomposition and of every tensor it keeps."""

PRECISIONS: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of ``precision``; ``ValueError`` naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


@dataclass
class LayerFactors:
    """The raw factors of one layer, as a K-FAC fitter hands them over (any dtype).

    ``name``: the module name; ``positions``: ``{"weight": i, "bias": j}`` (either may be
    missing), the positions of the layer's parameters in ``params``. K-FAC: ``A`` (input
    covariance, ``None`` for a layer without weight) and ``G`` (gradient covariance). EK-FAC:
    ``QG`` / ``QA`` the eigenvectors of ``G`` / ``A`` and ``corrected`` the corrected
    eigenvalues: one tensor for a joint ``[W | b]`` block, else ``{param position: tensor}``;
    ``A`` and ``G`` are kept where the fitter still has them.
    """

    name: str
    positions: dict[str, int]
    A: Tensor | None = None
    G: Tensor | None = None
    QG: Tensor | None = None
    QA: Tensor | None = None
    corrected: Tensor | dict[int, Tensor] | None = None


@dataclass
class KroneckerBlock:
    """One Kronecker block ``G (x) A`` (row-major) of a layer, acting on a ``(out, k)`` matrix.

    The block's matrix ``M`` (out, k) is the concatenation along columns of its parameters
    viewed as (out, cols): ``kind="weight"`` (the weight, ``k = d_in``), ``"bias"`` (``k = 1``,
    ``A = [[1]]``) or ``"joint"`` (``[W | b]``, ``k = d_in + 1``). ``param_indices[i]`` is
    the position in ``params`` of the i-th part and ``offsets[i]`` its flat offset.
    ``G``/``A`` are the raw factors (in the block's dtype, ``None`` where curvlinops does not keep them, as
    for EK-FAC after its eigenvalue correction). ``QG``/``QA`` are orthonormal eigenvectors,
    ``eig_g``/``eig_a`` the clamped eigenvalues (K-FAC) and ``eig`` the (out, k) corrected
    eigenvalues (EK-FAC, replacing ``outer(eig_g, eig_a)``).
    """

    layer: str
    kind: str
    param_indices: tuple[int, ...]
    offsets: tuple[int, ...]
    cols: tuple[int, ...]
    out: int
    QG: Tensor
    QA: Tensor
    eig_g: Tensor | None = None
    eig_a: Tensor | None = None
    eig: Tensor | None = None
    G: Tensor | None = None
    A: Tensor | None = None
    _index: Tensor | None = field(default=None, repr=False)
    _min_eig: float | None = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return sum(self.cols)

    def min_eigenvalue(self) -> float:
        """The smallest eigenvalue, read from the device once and cached (the eigenvalues never
        change), so that the singularity check of :meth:`apply` costs no device sync."""
        if self._min_eig is None:
            self._min_eig = float(self.eigenvalues().min())
        return self._min_eig

    def _check_damping(self, damping: float) -> None:
        # min_i fl(e_i + d) = fl(min_i e_i + d): rounding is monotonic
        if self.min_eigenvalue() + damping <= 0:
            raise FloatingPointError(
                f"layer {self.layer!r} ({self.kind}): K + {damping} I is singular "
                f"(min eigenvalue {self.min_eigenvalue()}); use a positive damping"
            )

    def eigenvalues(self) -> Tensor:
        """(out, k) eigenvalues of the block, entry (i, j) for eigenvector ``QG[:, i] (x) QA[:, j]``."""
        if self.eig is not None:
            return self.eig
        return torch.outer(self.eig_g, self.eig_a)

    def flat_index(self) -> Tensor:
        """(out, k) int64: flat-layout position of each entry of the block's matrix ``M``."""
        if self._index is None:
            parts = [
                off + torch.arange(self.out * c).reshape(self.out, c)
                for off, c in zip(self.offsets, self.cols, strict=True)
            ]
            self._index = torch.cat(parts, dim=1)
        return self._index

    def gather(self, V: Tensor) -> Tensor:
        """(Q, P) flat vectors -> (Q, out, k) block matrices."""
        parts = [
            V[:, off : off + self.out * c].reshape(-1, self.out, c)
            for off, c in zip(self.offsets, self.cols, strict=True)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def scatter(self, out: Tensor, M: Tensor) -> None:
        """Write (Q, out, k) block matrices into the (Q, P) flat ``out``."""
        start = 0
        for off, c in zip(self.offsets, self.cols, strict=True):
            out[:, off : off + self.out * c] = M[:, :, start : start + c].reshape(M.shape[0], -1)
            start += c

    def apply(self, M: Tensor, damping: float, inverse: bool) -> Tensor:
        """``(K + damping I)^{+-1}`` on (Q, out, k) matrices via the eigendecomposition, on the
        device of the factors (``M`` must be there, in the block's dtype)."""
        if inverse:
            self._check_damping(damping)
        lam = self.eigenvalues() + damping
        Mt = self.QG.T @ M @ self.QA
        Mt = Mt / lam if inverse else Mt * lam
        return self.QG @ Mt @ self.QA.T

    def inverse_sweep(self, M: Tensor, dampings: Sequence[float]) -> list[Tensor]:
        """``(K + d I)^{-1} M`` for each damping d, rotating into the eigenbasis only once."""
        Mt = self.QG.T @ M @ self.QA
        out = []
        for d in dampings:
            self._check_damping(d)
            lam = self.eigenvalues() + d
            out.append(self.QG @ (Mt / lam) @ self.QA.T)
        return out

    def dense(self) -> Tensor:
        """The block as a dense (out*k, out*k) matrix in the order of ``flat_index().flatten()``."""
        Q = torch.kron(self.QG, self.QA)
        return (Q * self.eigenvalues().flatten()) @ Q.T

    def scale(self, c: float) -> None:
        """Multiply the block by ``c > 0`` (scales G and its eigenvalues, or the EK-FAC ones)."""
        for name in ("G", "eig_g", "eig"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value * c)
        self._min_eig = None

    def state(self) -> dict:
        """Plain values and CPU tensors (``weights_only``-loadable); :meth:`from_state` inverts it.
        The strings are interned, so that a K-FAC saved from freshly decomposed blocks and one
        saved from blocks read back from their layer files pickle to the same bytes."""
        d: dict = {
            "layer": sys.intern(self.layer),
            "kind": sys.intern(self.kind),
            "param_indices": list(self.param_indices),
            "offsets": list(self.offsets),
            "cols": list(self.cols),
            "out": self.out,
        }
        for k, v in self.tensors().items():
            d[k] = None if v is None else v.detach().cpu()
        return d

    @classmethod
    def from_state(cls, d: dict) -> KroneckerBlock:
        return cls(
            layer=d["layer"],
            kind=d["kind"],
            param_indices=tuple(d["param_indices"]),
            offsets=tuple(d["offsets"]),
            cols=tuple(d["cols"]),
            out=int(d["out"]),
            **{k: d[k] for k in ("QG", "QA", "eig_g", "eig_a", "eig", "G", "A")},
        )

    def tensors(self) -> dict[str, Tensor | None]:
        return {
            "QG": self.QG,
            "QA": self.QA,
            "eig_g": self.eig_g,
            "eig_a": self.eig_a,
            "eig": self.eig,
            "G": self.G,
            "A": self.A,
        }


def check_factor_finite(layer: str, what: str, x: Tensor | None) -> None:
    """``FloatingPointError`` (:class:`~diffusion_attribution.core.io.NonFiniteError`) naming the
    layer, the factor, and the index and value of the first NaN / Inf."""
    if x is not None:
        check_finite(x, f"non-finite values (NaN/Inf) in {what} of layer {layer!r}")


def _psd_eigh(M: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigendecomposition in ``dtype`` of the symmetric part of M (formed in the wider of M's
    dtype and ``dtype``), eigenvalues clamped at 0."""
    M = M.to(torch.promote_types(M.dtype, dtype))
    sym = (M + M.T) / 2
    evals, evecs = torch.linalg.eigh(sym.to(dtype))
    if sym.dtype != dtype:
        Q = evecs.to(sym.dtype)
        evals = ((sym @ Q) * Q).sum(0).to(dtype)
    return evals.clamp_min(0.0), evecs


def _orthonormalise(Q: Tensor) -> Tensor:
    """Nearest-basis re-orthonormalisation in float64 (QR with positive diagonal of R).

    EK-FAC eigenvectors come from curvlinops in the model's dtype (float32 for a float32
    model), orthonormal only to ~1e-7; in float64 this makes ``Q diag(E) Q^T`` and its
    damped inverse exact inverses of each other.
    """
    Q = Q.to(torch.float64)
    q, r = torch.linalg.qr(Q)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def check_blocks(blocks: Sequence[KroneckerBlock], param_shapes: Sequence[Sequence[int]]) -> None:
    """Raise unless ``blocks`` tile the flat layout of ``param_shapes``: every parameter in
    exactly one block at its offset, eigenvectors of the block's size, all tensors finite
    (``FloatingPointError`` naming the layer)."""
    sizes = [math.prod(s) for s in param_shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    covered = [0] * len(sizes)
    dtypes = {b.QG.dtype for b in blocks}
    if len(dtypes) > 1:
        raise ValueError(f"every block must have one dtype, got {sorted(map(str, dtypes))}")
    for b in blocks:
        if b.QG.shape != (b.out, b.out) or b.QA.shape != (b.k, b.k):
            raise ValueError(f"layer {b.layer!r}: eigenvector shapes do not match the block")
        for i, off, c in zip(b.param_indices, b.offsets, b.cols, strict=True):
            if not 0 <= i < len(sizes) or off != offsets[i] or b.out * c != sizes[i]:
                raise ValueError(
                    f"layer {b.layer!r}: part ({i}, offset {off}, {b.out}x{c}) does not "
                    f"match the parameter shapes {param_shapes}"
                )
            covered[i] += 1
        for name, x in b.tensors().items():
            check_factor_finite(b.layer, name, x)
    if covered != [1] * len(sizes):
        raise ValueError(f"every parameter must be in exactly one block, got {covered}")


def kronecker_blocks(
    layers: Sequence[LayerFactors],
    param_shapes: Sequence[Sequence[int]],
    *,
    ekfac: bool,
    separate_weight_and_bias: bool,
    precision: Precision = "float64",
) -> list[KroneckerBlock]:
    """Blocks in ``precision`` (module docstring), in the order of ``layers``, for parameters
    of ``param_shapes``.

    K-FAC: ``G`` and ``A`` are eigendecomposed here (:func:`_psd_eigh`, eigenvalues clamped
    at 0). EK-FAC: the given eigenvectors are re-orthonormalised (:func:`_orthonormalise`) and
    the corrected eigenvalues reshaped to (out, k). With ``separate_weight_and_bias=False`` a
    layer with weight and bias gets one joint block on ``[W | b]``; otherwise weight and bias
    get one block each, the bias block being ``G`` alone (``A = [[1]]``). Raises
    ``FloatingPointError`` naming the layer if EK-FAC eigenvectors are not finite.
    """
    sizes = [math.prod(s) for s in param_shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    dtype = precision_dtype(precision)
    blocks = []
    for layer in layers:
        name, pos = layer.name, layer.positions
        out = int(param_shapes[next(iter(pos.values()))][0])
        for what, x in (("G (gradient covariance)", layer.G), ("A (input covariance)", layer.A)):
            check_factor_finite(name, what, x)
        if ekfac:
            check_factor_finite(name, "corrected eigenvalues", layer.corrected)
        if ekfac:
            QG_e, QA_e, corrected = layer.QG, layer.QA, layer.corrected
            for what, x in (("eigenvectors of G", QG_e), ("eigenvectors of A", QA_e)):
                check_factor_finite(name, what, x)
            QG = _orthonormalise(QG_e).to(dtype)
            QA = None if QA_e is None else _orthonormalise(QA_e).to(dtype)
        else:
            if layer.G is None:
                raise ValueError(f"layer {name!r}: curvlinops kept no gradient covariance")
            eig_g, QG = _psd_eigh(layer.G, dtype)
            eig_a, QA = (None, None) if layer.A is None else _psd_eigh(layer.A, dtype)
        G = None if layer.G is None else layer.G.to(dtype)
        A = None if layer.A is None else layer.A.to(dtype)
        one = torch.ones(1, 1, dtype=dtype, device=QG.device)

        if not separate_weight_and_bias and "weight" in pos and "bias" in pos:
            w, b = pos["weight"], pos["bias"]
            parts = [(w, sizes[w] // out), (b, 1)]
            blk = dict(kind="joint", A=A, QA=QA)
            if ekfac:
                blk["eig"] = corrected.to(dtype).reshape(out, -1)
            else:
                blk["eig_a"] = eig_a
            specs = [(parts, blk)]
        else:
            specs = []
            for p_name, i in pos.items():
                if p_name == "weight":
                    blk = dict(kind="weight", A=A, QA=QA)
                    if not ekfac:
                        blk["eig_a"] = eig_a
                    parts = [(i, sizes[i] // out)]
                else:
                    blk = dict(kind="bias", A=None, QA=one)
                    if not ekfac:
                        blk["eig_a"] = one[0]
                    parts = [(i, 1)]
                if ekfac:
                    blk["eig"] = corrected[i].to(dtype).reshape(out, -1)
                specs.append((parts, blk))
        for parts, blk in specs:
            blocks.append(
                KroneckerBlock(
                    layer=name,
                    param_indices=tuple(i for i, _ in parts),
                    offsets=tuple(offsets[i] for i, _ in parts),
                    cols=tuple(c for _, c in parts),
                    out=out,
                    QG=QG,
                    G=G,
                    eig_g=None if ekfac else eig_g,
                    **blk,
                )
            )
    return blocks
