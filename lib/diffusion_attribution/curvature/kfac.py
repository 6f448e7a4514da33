"""K-FAC approximation of the diffusion-loss Hessian (paper Sec. 3.1, eqs. 9-12).

The influence estimate of eq. 6 needs ``(Hessian + lambda I)^{-1} v``. Following the paper, the
Hessian of the training loss is replaced by a generalised Gauss-Newton matrix and that by its
block-diagonal Kronecker-factored approximation (K-FAC, eq. 12). Two backends fit the same
matrices (defined below): this project's forward/backward hooks (the default: shardable sums
over examples with shard-invariant MC noise) and curvlinops 3.0.1 (``KFACLinearOperator`` /
``EKFACLinearOperator``, the independent reference). Either way the result is plain float64
Kronecker factors with cached eigendecompositions, so that damped inverses are exact and a
damping sweep costs no refit and no re-decomposition.

Layout: the operators here, :class:`KFAC` and its brute-force oracle :class:`DenseCurvature`,
are built from float64 Kronecker blocks (:mod:`~diffusion_attribution.curvature.kronecker`).
:func:`~diffusion_attribution.curvature.fit.fit_kfac` fits them with one of two backends: the
hooks (:mod:`~diffusion_attribution.curvature.hooks`, whose shard-additive sums are
:mod:`~diffusion_attribution.curvature.partial_sums`) or curvlinops
(:mod:`~diffusion_attribution.curvature.curvlinops_backend`, the only module that imports
curvlinops). Both read the rows of :mod:`~diffusion_attribution.curvature.rows`.

Conventions
-----------
**Rows.** The data are ``N`` examples ``x0`` with ``S`` pre-drawn ``(t, eps)`` each. Row
``r = n * S + s`` is the noisy input ``x_t = q_sample(x0[n], t[n, s], eps[n, s])`` (eq. 1) with
target ``eps[n, s].flatten()``; there are ``R = N * S`` rows and ``D = C * H * W`` outputs per
row. Each row is one datum for curvlinops (``num_data = R``, one loss term per row).

**Flat parameter layout.** A *parameter vector* is ``torch.cat([p.flatten() for p in params])``
for the list ``params`` given at fit time (normally ``unet.kfac_parameters(model)``), in that
order. Every vector / matrix this module accepts or returns uses this layout: shape ``(P,)`` or
``(Q, P)`` (one vector per row).

**Normalisation.** The loss is curvlinops' ``nn.MSELoss(reduction="mean")`` on the flattened
prediction, i.e. the *per-pixel-mean* squared error averaged over rows,

    L(theta) = 1/R sum_r 1/D ||eps_r - f_r(theta)||^2,       f_r = eps_theta(x_t^(r), t_r),

whose Hessian w.r.t. one row's output is ``2 I / (R D)``. With ``J_r = d f_r / d theta``
(``D x P``) and ``g^_r = grad_theta ||y_r - f_r||^2`` (the gradient of the *summed* squared
error, the paper's per-draw loss of eq. 2) the matrices approximated are (verified in the tests):

* ``fisher="mc"`` (eq. 10, one sample ``y_r ~ N(f_r, I/2)`` per row) and ``fisher="type2"``
  (exact loss Hessian, an oracle costing D backward passes per batch) approximate
  GGN^model (eq. 9) of L:  ``2/(R D) sum_r J_r^T J_r  =  1/(R D) sum_r E_y[g^_r g^_r^T]``.
* ``fisher="empirical"`` (eq. 11, targets ``y_r = eps_r``): ``1/(R D) sum_r g^_r g^_r^T``,
  as curvlinops computes it (it scales the mean-reduced loss by ``sqrt(D)`` before
  back-propagating); in terms of the gradient ``g_r = g^_r / D`` of the per-pixel-mean loss of
  row r this is ``D/R sum_r g_r g_r^T``.

Both are ``1/(R D) sum_r g^_r g^_r^T``, with the residual ``y_r - f_r`` drawn from the model
(MC: ``N(0, I/2)``) or taken from the data (empirical: ``eps_r - f_r``). They are therefore on
one scale, as in curvlinops and the paper's own code: where the model's residuals are
``N(0, I/2)`` the two agree in expectation (a test checks it), and one damping value means the
same for both. The MC variant is ``1/D`` times the paper's eq. 9 written with the summed
squared error ``||eps - eps_theta||^2`` averaged over rows, the empirical one ``1/D`` times
eq. 11; eq. 11 is formed here from per-row (per-draw) gradients, not from per-example
gradients averaged over the S draws. Whoever combines these matrices with gradients (the
influence module) must use the per-pixel-mean loss lbar = l / D for the training gradients.

**Kronecker factors.** For a layer with weight ``W`` of shape ``(d_out, d_in)`` (a Conv2d
weight is viewed as ``(c_out, c_in * k1 * k2)``, matching ``unfold``'s patch order) K-FAC is

    K_l = G_l (x) A_l   acting on the row-major vec(W) = W.flatten(),

i.e. ``K_l vec(M) = vec(G_l M A_l)``. In the column-major notation of the paper (eq. 12) and of
curvlinops' docstring this is ``A_l (x) G_l``. ``A_l`` is the (uncentred) input covariance and
``G_l`` the covariance of loss-gradients w.r.t. the layer output; with positions ``s = 1..S_l``
of weight sharing (conv locations, attention tokens) curvlinops uses

* expand (Eschenhagen et al. 2023; the paper's default):
  ``A = 1/(R S_l) sum_{r,s} a_rs a_rs^T``, ``G = 1/(R D) sum_{r,s} b_rs b_rs^T``,
* reduce: ``A = 1/R sum_r abar_r abar_r^T`` (``abar`` = mean over positions),
  ``G = 1/(R D) sum_r (sum_s b_rs)(sum_s b_rs)^T``,

where ``b_rs`` is the gradient of ``||y_r - f_r||^2`` w.r.t. the layer's output at position s.
Biases: with ``separate_weight_and_bias=True`` (curvlinops' default) the bias block is
``G_l`` alone and weight and bias do not interact; with ``False`` the input is augmented by a
constant 1, the block acts on ``[W | b]`` (``d_out x (d_in + 1)``) and couples the two.

With ``ekfac=True`` the Kronecker eigenvalues ``g_i a_j`` are replaced by curvlinops' eigenvalue
correction (George et al. 2018) ``E_ij = sum_r ((Q_G^T grad_W(r) Q_A)_ij)^2`` (same scaling),
computed from per-row gradients.

All factors are held in float64 by default (``precision="float32"`` keeps them, their
eigendecompositions and the arithmetic of ``matvec`` / ``inverse_apply`` in float32:
:mod:`~diffusion_attribution.curvature.kronecker`). Their eigendecompositions are computed
once; eigenvalues of ``A`` and ``G`` below zero (round-off) are clamped to 0 and the operator
is *defined* by the clamped eigendecomposition everywhere (``matvec``, ``to_dense``,
``inverse_apply``), so ``inverse_apply`` is the inverse of ``matvec`` plus damping to the
round-off of the blocks' dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.curvature.kronecker import KroneckerBlock, check_blocks

__all__ = ["KFAC", "CurvatureOperator", "DenseCurvature", "FisherKind", "KFACKind"]

FisherKind = Literal["mc", "empirical", "example", "type2"]
"""``"mc"``: GGN^model via the MC Fisher of eq. 10 (``mc_samples`` draws per row, default 1);
``"empirical"``: GGN^loss, the empirical Fisher of eq. 11; ``"type2"``: exact GGN^model
(exact loss Hessian; D backward passes per batch — an oracle for tests)."""

KFACKind = Literal["expand", "reduce"]
"""K-FAC-expand (the paper's default) or K-FAC-reduce for weight-sharing layers
(Eschenhagen et al., 2023)."""

_FORMAT = "diffusion_attribution.curvature.KFAC"
_VERSION = 1


class CurvatureOperator:
    """The base of :class:`KFAC` and :class:`DenseCurvature`: a symmetric positive
    semi-definite (P, P) matrix K in the flat parameter layout (float64), applied to the rows
    of V (shape (P,) or (Q, P)); both satisfy
    :class:`~diffusion_attribution.core.operators.InverseCurvature`."""

    num_params: int

    def _as_matrix(self, V: Tensor) -> tuple[Tensor, bool]:
        if V.ndim not in (1, 2) or V.shape[-1] != self.num_params:
            raise ValueError(
                f"expected shape ({self.num_params},) or (Q, {self.num_params}) in the flat "
                f"parameter layout, got {tuple(V.shape)}"
            )
        return (V.unsqueeze(0) if V.ndim == 1 else V), V.ndim == 1

    def matvec(self, V: Tensor, damping: float = 0.0) -> Tensor:
        """``(K + damping I) V`` for V of shape (P,) or (Q, P) (rows are vectors)."""
        raise NotImplementedError

    def inverse_apply(self, V: Tensor, damping: float) -> Tensor:
        """``(K + damping I)^{-1} V`` for V of shape (P,) or (Q, P) (rows are vectors)."""
        raise NotImplementedError

    def inverse_apply_sweep(self, V: Tensor, dampings: Sequence[float]) -> dict[float, Tensor]:
        """:meth:`inverse_apply` for several dampings (subclasses share the work between them)."""
        return {d: self.inverse_apply(V, d) for d in dict.fromkeys(dampings)}

    def to_dense(self) -> Tensor:
        """The (P, P) float64 matrix K."""
        raise NotImplementedError

    def eigenvalues(self) -> Tensor:
        """All P eigenvalues of K (float64)."""
        raise NotImplementedError

    def mean_eigenvalue(self) -> float:
        """``trace(K) / P``: the scale to report damping against."""
        return float(self.eigenvalues().mean())


class DenseCurvature(CurvatureOperator):
    """An explicit symmetric (P, P) matrix with the :class:`KFAC` interface (brute-force oracle).

    The eigendecomposition of ``(M + M^T) / 2`` in float64 is computed once, so
    ``inverse_apply`` for several dampings costs two (P, P) products each.
    """

    def __init__(self, matrix: Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise FloatingPointError("matrix has non-finite entries")
        m = matrix.to(torch.float64)
        self.matrix = (m + m.T) / 2
        self.num_params = m.shape[0]
        self._eig: tuple[Tensor, Tensor] | None = None

    def _eigh(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.matrix)
        return self._eig

    def matvec(self, V: Tensor, damping: float = 0.0) -> Tensor:
        M, vec = self._as_matrix(V)
        M64 = M.to(self.matrix.device, torch.float64)
        out = M64 @ self.matrix + damping * M64
        return (out.squeeze(0) if vec else out).to(V.device, V.dtype)

    def inverse_apply(self, V: Tensor, damping: float) -> Tensor:
        M, vec = self._as_matrix(V)
        evals, Q = self._eigh()
        denom = evals + damping
        if bool((denom <= 0).any()):
            raise FloatingPointError(
                f"K + {damping} I is not positive definite (min eigenvalue {float(evals.min())})"
            )
        out = ((M.to(Q.device, torch.float64) @ Q) / denom) @ Q.T
        return (out.squeeze(0) if vec else out).to(V.device, V.dtype)

    def to_dense(self) -> Tensor:
        return self.matrix.clone()

    def eigenvalues(self) -> Tensor:
        return self._eigh()[0].clone()


class KFAC(CurvatureOperator):
    """Block-diagonal Kronecker-factored curvature in the flat parameter layout (float64, or
    float32 where fitted with ``precision="float32"``: :attr:`dtype`).

    Holds per layer the factors ``A`` (input covariance) and ``G`` (output-gradient
    covariance) with their eigendecompositions ``A = Q_A diag(a) Q_A^T``,
    ``G = Q_G diag(g) Q_G^T``, computed once. A block is ``G (x) A`` on the row-major
    ``vec(W)`` (see the module docstring), so

        (G (x) A + lambda I)^{-1} vec(M) = vec(Q_G [(Q_G^T M Q_A) / (g_i a_j + lambda)] Q_A^T),

    exact for every damping, and a damping sweep reuses the decompositions. EK-FAC replaces
    ``g_i a_j`` by corrected eigenvalues ``E_ij``. ``meta`` records how it was fitted.
    """

    def __init__(
        self,
        blocks: Sequence[KroneckerBlock],
        param_shapes: Sequence[Sequence[int]],
        meta: dict[str, Any] | None = None,
    ):
        self.blocks = list(blocks)
        self.param_shapes = [tuple(int(d) for d in s) for s in param_shapes]
        self.meta = dict(meta or {})
        self.num_params = sum(math.prod(s) for s in self.param_shapes)
        check_blocks(self.blocks, self.param_shapes)

    # -- linear algebra ------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Module names, in curvlinops' (module) order, without repeats."""
        return list(dict.fromkeys(b.layer for b in self.blocks))

    @property
    def device(self) -> torch.device:
        return self.blocks[0].QG.device

    @property
    def dtype(self) -> torch.dtype:
        """The blocks' dtype, in which :meth:`matvec` and :meth:`inverse_apply` compute."""
        return self.blocks[0].QG.dtype

    def to(self, device: torch.device | str) -> KFAC:
        """A copy with every tensor on ``device`` (same dtype): where :meth:`inverse_apply`
        and :meth:`inverse_apply_sweep` compute."""
        blocks = []
        for b in self.blocks:
            moved = {k: (None if v is None else v.to(device)) for k, v in b.tensors().items()}
            blocks.append(
                KroneckerBlock(b.layer, b.kind, b.param_indices, b.offsets, b.cols, b.out, **moved)
            )
        return KFAC(blocks, self.param_shapes, self.meta)

    def _apply(self, V: Tensor, damping: float, inverse: bool) -> Tensor:
        if damping < 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be finite and >= 0, got {damping}")
        M, vec = self._as_matrix(V)
        Mk = M.to(self.device, self.dtype)
        out = torch.empty_like(Mk)
        for b in self.blocks:
            b.scatter(out, b.apply(b.gather(Mk), damping, inverse))
        return (out.squeeze(0) if vec else out).to(V.device, V.dtype)

    def matvec(self, V: Tensor, damping: float = 0.0) -> Tensor:
        """``(K + damping I) V`` for V (P,) or (Q, P); computed in :attr:`dtype`, returned in V's dtype."""
        return self._apply(V, damping, inverse=False)

    def inverse_apply(self, V: Tensor, damping: float) -> Tensor:
        """``(K + damping I)^{-1} V`` for V (P,) or (Q, P), exact via the cached eigenbases.

        Computed in :attr:`dtype` on the factors' device (:meth:`to`): only V is converted there
        and the result back to V's dtype and device; no device-to-host reads (the singularity
        check uses eigenvalue minima cached once per block). Raises ``FloatingPointError`` if
        ``K + damping I`` is singular (``damping = 0`` with a zero eigenvalue).
        """
        return self._apply(V, damping, inverse=True)

    def inverse_apply_sweep(self, V: Tensor, dampings: Sequence[float]) -> dict[float, Tensor]:
        """:meth:`inverse_apply` for several dampings; each block rotates V into its
        eigenbasis once, so a sweep of k dampings costs (k + 1) / 2 single applications."""
        dampings = list(dict.fromkeys(dampings))
        for d in dampings:
            if d < 0 or not math.isfinite(d):
                raise ValueError(f"damping must be finite and >= 0, got {d}")
        M, vec = self._as_matrix(V)
        Mk = M.to(self.device, self.dtype)
        outs = [torch.empty_like(Mk) for _ in dampings]
        for b in self.blocks:
            for out, res in zip(outs, b.inverse_sweep(b.gather(Mk), dampings), strict=True):
                b.scatter(out, res)
        return {
            d: (o.squeeze(0) if vec else o).to(V.device, V.dtype)
            for d, o in zip(dampings, outs, strict=True)
        }

    def to_dense(self) -> Tensor:
        """The (P, P) matrix in :attr:`dtype`, assembled block by block from ``kron(Q_G, Q_A)`` (tests)."""
        K = torch.zeros(self.num_params, self.num_params, dtype=self.dtype, device=self.device)
        for b in self.blocks:
            idx = b.flat_index().flatten().to(self.device)
            K[idx[:, None], idx[None, :]] = b.dense()
        return K

    def eigenvalues(self) -> Tensor:
        """All P eigenvalues ``g_i a_j`` (or EK-FAC's ``E_ij``), concatenated block by block."""
        return torch.cat([b.eigenvalues().flatten() for b in self.blocks])

    def layer_eigenvalues(self) -> dict[str, Tensor]:
        """Eigenvalues grouped by layer name."""
        out: dict[str, list[Tensor]] = {}
        for b in self.blocks:
            out.setdefault(b.layer, []).append(b.eigenvalues().flatten())
        return {k: torch.cat(v) for k, v in out.items()}

    # -- persistence ---------------------------------------------------------------------------

    def check_params(self, params: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` unless ``params`` have the shapes K-FAC was fitted on."""
        shapes = [tuple(p.shape) for p in params]
        if shapes != self.param_shapes:
            diff = [
                (i, a, b)
                for i, (a, b) in enumerate(zip(self.param_shapes, shapes, strict=False))
                if a != b
            ]
            raise ValueError(
                f"parameter mismatch: K-FAC was fitted on {len(self.param_shapes)} tensors, "
                f"got {len(shapes)}; first differences (index, fitted, given): {diff[:3]}"
            )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (CPU), strings, numbers, lists and dicts: ``weights_only``-loadable."""
        blocks = [b.state() for b in self.blocks]
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "param_shapes": [list(s) for s in self.param_shapes],
            "meta": dict(self.meta),
            "blocks": blocks,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], params: Sequence[Tensor] | None = None) -> KFAC:
        """Rebuild from :meth:`state_dict`; checks finiteness and, if given, ``params``' shapes."""
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(
                f"not a {_FORMAT} v{_VERSION} state dict "
                f"(format={state.get('format')!r}, version={state.get('version')!r})"
            )
        blocks = [KroneckerBlock.from_state(d) for d in state["blocks"]]
        result = cls(blocks, state["param_shapes"], state.get("meta"))
        if params is not None:
            result.check_params(params)
        return result

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically (temporary file in the same folder, then rename)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, params: Sequence[Tensor] | None = None) -> KFAC:
        """Load with ``torch.load(weights_only=True)``; see :meth:`from_state_dict`."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_state_dict(state, params)
