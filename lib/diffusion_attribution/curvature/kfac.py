"""K-FAC approximation of the diffusion-loss Hessian (paper Sec. 3.1, eqs. 9-12).

The influence estimate of eq. 6 needs ``(Hessian + lambda I)^{-1} v``. Following the paper, the
Hessian of the training loss is replaced by a generalised Gauss-Newton matrix and that by its
block-diagonal Kronecker-factored approximation (K-FAC, eq. 12). Two backends fit the same
matrices (defined below): this project's forward/backward hooks (:mod:`factors`, the default:
shardable sums over examples with shard-invariant MC noise) and curvlinops 3.0.1
(``KFACLinearOperator`` / ``EKFACLinearOperator``, the independent reference). Either way the
result is plain float64 Kronecker factors with cached eigendecompositions, so that damped
inverses are exact and a damping sweep costs no refit and no re-decomposition.

Layout: :class:`KFAC` is assembled from ``kronecker`` (the blocks ``G (x) A`` and their
eigendecompositions), ``factors`` (the hooks backend and its partial sums) and
``curvlinops_adapter`` (the noisy-row data, :func:`build_operator` and the reading of
curvlinops' factors: the only module that imports curvlinops). The names that moved there are
re-exported here.

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
gradients averaged over the S draws. Whoever combines these matrices with gradients (the influence module) must use
the per-pixel-mean loss lbar = l / D for the training gradients.

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

All factors are held in float64. Their eigendecompositions are computed once; eigenvalues of
``A`` and ``G`` below zero (float32 round-off) are clamped to 0 and the operator is *defined*
by the clamped eigendecomposition everywhere (``matvec``, ``to_dense``, ``inverse_apply``), so
``inverse_apply`` is the exact inverse of ``matvec`` plus damping.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.curvature.curvlinops_backend import (
    FisherKind,
    FlatEps,
    KFACKind,
    NoisyBatches,
    _fitting_mode,
    build_operator,
    noisy_rows,
    read_factors,
)
from diffusion_attribution.curvature.kronecker import KroneckerBlock, check_blocks, kronecker_blocks
from diffusion_attribution.diffusion.ddpm import NoiseSchedule

if TYPE_CHECKING:  # annotations only: no module but curvlinops_adapter imports curvlinops
    from diffusion_attribution.curvature.curvlinops_backend import KFACLinearOperator

__all__ = [
    "KFAC",
    "Backend",
    "Curvature",
    "DenseCurvature",
    "FisherKind",
    "FlatEps",
    "KFACKind",
    "KroneckerBlock",
    "NoisyBatches",
    "build_operator",
    "fit_kfac",
    "noisy_rows",
]

Backend = Literal["hooks", "curvlinops"]
"""Who computes the factors: this project's hooks (:mod:`diffusion_attribution.curvature.factors`,
shard-invariant MC noise) or curvlinops 3.0.1 (the independent reference)."""

_FORMAT = "diffusion_attribution.curvature.kfac.KFAC"
_VERSION = 1


def fit_kfac(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    fisher: FisherKind = "mc",
    kfac: KFACKind = "expand",
    batch_size: int = 256,
    mc_seed: int = 0,
    mc_samples: int = 1,
    ekfac: bool = False,
    separate_weight_and_bias: bool = True,
    progress: bool = False,
    backend: Backend = "hooks",
) -> KFAC:
    """Fit K-FAC (or EK-FAC) of the GGN of the diffusion loss over ``N * S`` noisy rows.

    ``model``: eps-model ``(x_t, t) -> eps`` (an ``nn.Module``); ``params``: the parameters
    to cover (Linear / Conv2d weights and biases only, normally ``kfac_parameters(model)``);
    ``x0`` (N, C, H, W); ``t`` (N, S) int64 timesteps in 1..T; ``eps`` (N, S, C, H, W): S
    pre-drawn ``(t, eps)`` per example. Rows are streamed lazily in batches of about
    ``batch_size`` with one pass over the data (two with ``ekfac``). The model runs in eval
    mode (restored afterwards). See the module docstring for the matrix approximated and its
    scaling.

    ``backend="hooks"`` (default) computes the factors with this project's hooks
    (:mod:`diffusion_attribution.curvature.factors`): the MC noise of example n depends only on
    ``(mc_seed, n)``, so the fit is the sum of fits on shards of examples
    (:func:`~diffusion_attribution.curvature.factors.factor_sums`). ``backend="curvlinops"`` fits with
    curvlinops 3.0.1, the independent reference: the same matrices, but its MC targets come
    from one generator seeded with ``mc_seed`` and running across its batches (the draws
    depend on ``batch_size``), so its MC factors agree with the hooks' in expectation only;
    the empirical and type-2 factors agree to float round-off. ``meta["backend"]`` records
    which one ran.
    """
    if backend not in ("hooks", "curvlinops"):
        raise ValueError(f"backend must be 'hooks' or 'curvlinops', got {backend!r}")
    params = list(params)
    t0 = time.perf_counter()
    meta = {
        "backend": backend,
        "fisher": fisher,
        "kfac": kfac,
        "ekfac": ekfac,
        "separate_weight_and_bias": separate_weight_and_bias,
        "num_examples": t.shape[0],
        "draws_per_example": t.shape[1],
        "num_rows": t.numel(),
        "output_dim": math.prod(x0.shape[1:]),
        "mc_seed": mc_seed,
        "mc_samples": mc_samples,
        "batch_size": batch_size,
    }
    if backend == "hooks":
        from diffusion_attribution.curvature import factors

        kw = dict(batch_size=batch_size, mc_seed=mc_seed, mc_samples=mc_samples)
        sums = factors.factor_sums(
            model, params, schedule, x0, t, eps, fisher=fisher, kfac=kfac, **kw
        )
        result = factors.to_kfac(sums, separate_weight_and_bias=separate_weight_and_bias, meta=meta)
        if ekfac:
            corr = factors.correction_sums(
                model, params, schedule, x0, t, eps, result, fisher=fisher, **kw
            )
            result = factors.apply_corrections(result, corr)
    else:
        with _fitting_mode(model, params):
            op = build_operator(
                model,
                params,
                schedule,
                x0,
                t,
                eps,
                fisher=fisher,
                kfac=kfac,
                batch_size=batch_size,
                mc_seed=mc_seed,
                mc_samples=mc_samples,
                ekfac=ekfac,
                separate_weight_and_bias=separate_weight_and_bias,
                progress=progress,
            )
            result = KFAC.from_operator(op, params, meta=meta)
    result.meta["fit_seconds"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# The curvature objects
# --------------------------------------------------------------------------------------------


class Curvature:
    """Interface shared by :class:`KFAC` and :class:`DenseCurvature` (flat layout, float64)."""

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


class DenseCurvature(Curvature):
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


class KFAC(Curvature):
    """Block-diagonal Kronecker-factored curvature in the flat parameter layout (float64).

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

    # -- construction from curvlinops ---------------------------------------------------------

    @classmethod
    def from_operator(
        cls,
        op: KFACLinearOperator,
        params: Sequence[Tensor],
        meta: dict[str, Any] | None = None,
    ) -> KFAC:
        """Extract the factors of a curvlinops 3.0.1 ``(E)KFACLinearOperator`` built on ``params``.

        Computes the factors if the operator has not yet (curvlinops adds to existing factors
        when ``compute_kronecker_factors`` runs twice, so it is called only when they are
        empty). Module names lose the ``model.`` prefix of :class:`FlatEps`. Raises
        ``FloatingPointError`` naming the layer if a factor is not finite.
        """
        params = list(params)
        factors = read_factors(op, params)
        shapes = [tuple(p.shape) for p in params]
        blocks = kronecker_blocks(
            factors.layers,
            shapes,
            ekfac=factors.ekfac,
            separate_weight_and_bias=factors.separate_weight_and_bias,
        )
        meta = dict(meta or {})
        meta.setdefault("ekfac", factors.ekfac)
        meta.setdefault("separate_weight_and_bias", factors.separate_weight_and_bias)
        meta.setdefault("num_rows", factors.num_data)
        return cls(blocks, shapes, meta)

    # -- linear algebra ------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Module names, in curvlinops' (module) order, without repeats."""
        return list(dict.fromkeys(b.layer for b in self.blocks))

    @property
    def device(self) -> torch.device:
        return self.blocks[0].QG.device

    def to(self, device: torch.device | str) -> KFAC:
        """A copy with every tensor on ``device`` (still float64): where :meth:`inverse_apply`
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
        M64 = M.to(self.device, torch.float64)
        out = torch.empty_like(M64)
        for b in self.blocks:
            b.scatter(out, b.apply(b.gather(M64), damping, inverse))
        return (out.squeeze(0) if vec else out).to(V.device, V.dtype)

    def matvec(self, V: Tensor, damping: float = 0.0) -> Tensor:
        """``(K + damping I) V`` for V (P,) or (Q, P); computed in float64, returned in V's dtype."""
        return self._apply(V, damping, inverse=False)

    def inverse_apply(self, V: Tensor, damping: float) -> Tensor:
        """``(K + damping I)^{-1} V`` for V (P,) or (Q, P), exact via the cached eigenbases.

        Computed in float64 on the factors' device (:meth:`to`): only V is converted there
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
        M64 = M.to(self.device, torch.float64)
        outs = [torch.empty_like(M64) for _ in dampings]
        for b in self.blocks:
            for out, res in zip(outs, b.inverse_sweep(b.gather(M64), dampings), strict=True):
                b.scatter(out, res)
        return {
            d: (o.squeeze(0) if vec else o).to(V.device, V.dtype)
            for d, o in zip(dampings, outs, strict=True)
        }

    def to_dense(self) -> Tensor:
        """The (P, P) float64 matrix, assembled block by block from ``kron(Q_G, Q_A)`` (tests)."""
        K = torch.zeros(self.num_params, self.num_params, dtype=torch.float64, device=self.device)
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
        blocks = []
        for b in self.blocks:
            d: dict[str, Any] = {
                "layer": b.layer,
                "kind": b.kind,
                "param_indices": list(b.param_indices),
                "offsets": list(b.offsets),
                "cols": list(b.cols),
                "out": b.out,
            }
            for k, v in b.tensors().items():
                d[k] = None if v is None else v.detach().cpu()
            blocks.append(d)
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
        blocks = [
            KroneckerBlock(
                layer=d["layer"],
                kind=d["kind"],
                param_indices=tuple(d["param_indices"]),
                offsets=tuple(d["offsets"]),
                cols=tuple(d["cols"]),
                out=int(d["out"]),
                **{k: d[k] for k in ("QG", "QA", "eig_g", "eig_a", "eig", "G", "A")},
            )
            for d in state["blocks"]
        ]
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
