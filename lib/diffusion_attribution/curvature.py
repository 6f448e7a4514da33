"""K-FAC approximation of the diffusion-loss Hessian (paper Sec. 3.1, eqs. 9-12).

The influence estimate of eq. 6 needs ``(Hessian + lambda I)^{-1} v``. Following the paper, the
Hessian of the training loss is replaced by a generalised Gauss-Newton matrix and that by its
block-diagonal Kronecker-factored approximation (K-FAC, eq. 12), fitted with curvlinops 3.0.1
(``KFACLinearOperator`` / ``EKFACLinearOperator``). This module turns the fitted operator into
plain float64 Kronecker factors with cached eigendecompositions, so that damped inverses are
exact and a damping sweep costs no refit and no re-decomposition.

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
* ``fisher="empirical"`` (eq. 11, targets ``y_r = eps_r``): curvlinops computes
  ``1/(R D) sum_r g^_r g^_r^T``; it scales the mean-reduced loss by ``sqrt(D)`` before
  back-propagating, so in terms of the gradient ``g_r = g^_r / D`` of the per-pixel-mean loss
  of row r this is ``D/R sum_r g_r g_r^T``. :func:`fit_kfac` divides it by ``D``, so that the
  returned operator is ``1/R sum_r g_r g_r^T`` -- the empirical Fisher of the same
  per-pixel-mean loss L whose GGN^model the MC variant approximates. (:func:`build_operator`
  returns curvlinops' unscaled operator.)

The MC variant is ``1/D`` times the paper's eq. 9 written with the summed squared error
``||eps - eps_theta||^2`` averaged over rows, the empirical one ``1/D^2`` times eq. 11; eq. 11
is formed here from per-row (per-draw) gradients, not from per-example gradients averaged over
the S draws. Whoever combines these matrices with gradients (the influence module) must use
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from diffusion_attribution.ddpm import NoiseSchedule, q_sample
from diffusion_attribution.io import atomic_save

if TYPE_CHECKING:  # curvlinops is imported lazily (it is slow to import and warns)
    from curvlinops import KFACLinearOperator

FisherKind = Literal["mc", "empirical", "type2"]
"""``"mc"``: GGN^model via the MC Fisher of eq. 10 (``mc_samples`` draws per row, default 1);
``"empirical"``: GGN^loss, the empirical Fisher of eq. 11; ``"type2"``: exact GGN^model
(exact loss Hessian; D backward passes per batch — an oracle for tests)."""

KFACKind = Literal["expand", "reduce"]
"""K-FAC-expand (the paper's default) or K-FAC-reduce for weight-sharing layers
(Eschenhagen et al., 2023)."""

_FORMAT = "diffusion_attribution.curvature.KFAC"
_VERSION = 1


# --------------------------------------------------------------------------------------------
# Data: rows of noisy inputs, generated lazily
# --------------------------------------------------------------------------------------------


def _check_draws(x0: Tensor, t: Tensor, eps: Tensor, num_timesteps: int) -> tuple[int, int]:
    if x0.ndim != 4:
        raise ValueError(f"x0 must have shape (N, C, H, W), got {tuple(x0.shape)}")
    if t.ndim != 2 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape (N, S) with N={x0.shape[0]}, got {tuple(t.shape)}")
    n, s = t.shape
    if tuple(eps.shape) != (n, s, *x0.shape[1:]):
        raise ValueError(f"eps must have shape {(n, s, *x0.shape[1:])}, got {tuple(eps.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"t must be an integer tensor, got {t.dtype}")
    if n * s == 0:
        raise ValueError("need at least one example and one draw")
    if int(t.min()) < 1 or int(t.max()) > num_timesteps:
        raise ValueError(f"timesteps must lie in 1..{num_timesteps}")
    return n, s


def noisy_rows(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    start: int = 0,
    stop: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``start..stop-1`` of the curvature data (row ``r = n * S + s``).

    ``x0`` (N, C, H, W), ``t`` (N, S) int, ``eps`` (N, S, C, H, W). Returns the noisy inputs
    ``x_t = sqrt(alpha_bar_t) x0[n] + sqrt(1 - alpha_bar_t) eps[n, s]`` (B, C, H, W) (eq. 1),
    their timesteps (B,) and the regression targets ``eps[n, s].flatten()`` (B, D).
    """
    n, s = t.shape
    stop = n * s if stop is None else min(stop, n * s)
    rows = torch.arange(start, stop, device=t.device)
    x0_r = x0[(rows // s).to(x0.device)]
    t_r = t.reshape(-1)[rows]
    eps_r = eps.reshape(n * s, *x0.shape[1:])[rows.to(eps.device)].to(x0_r.dtype)
    return q_sample(schedule, x0_r, t_r, eps_r), t_r, eps_r.flatten(1)


class NoisyBatches:
    """Re-iterable, lazily generated batches ``({"x": x_t, "t": t}, eps.flatten(1))``.

    Every iteration regenerates the same rows in the same order (the draws are given), so the
    batches are deterministic; at most ``batch_size`` rows exist at a time. Batches are cast
    to ``dtype`` and moved to ``device`` (curvlinops does not move dict inputs).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        x0: Tensor,
        t: Tensor,
        eps: Tensor,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        _check_draws(x0, t, eps, schedule.num_timesteps)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.schedule, self.x0, self.t, self.eps = schedule, x0, t, eps
        self.batch_size, self.dtype, self.device = batch_size, dtype, device
        self.num_rows = t.numel()

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        for start in range(0, self.num_rows, self.batch_size):
            xt, tt, y = noisy_rows(
                self.schedule, self.x0, self.t, self.eps, start, start + self.batch_size
            )
            x = xt.to(self.device, self.dtype)
            yield {"x": x, "t": tt.to(self.device)}, y.to(self.device, self.dtype)


def _batch_size(X: dict[str, Tensor]) -> int:
    return X["x"].shape[0]


class FlatEps(nn.Module):
    """Wrap an eps-model for curvlinops: ``forward({"x": x_t, "t": t}) = eps_model(x_t, t).flatten(1)``.

    curvlinops calls the model with one argument and needs a 2-D (B, D) output (EK-FAC
    requires it); the wrapped model is registered as submodule ``model``.
    """

    def __init__(self, eps_model: nn.Module):
        super().__init__()
        self.model = eps_model

    def forward(self, X: dict[str, Tensor]) -> Tensor:
        return self.model(X["x"], X["t"]).flatten(1)


@contextmanager
def _fitting_mode(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode (no dropout: the factors must be deterministic), grads enabled for ``params``."""
    was_training = model.training
    requires = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)
        for p, r in zip(params, requires, strict=True):
            p.requires_grad_(r)


# --------------------------------------------------------------------------------------------
# Fitting with curvlinops
# --------------------------------------------------------------------------------------------


def build_operator(
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
    check_deterministic: bool = False,
) -> KFACLinearOperator:
    """The (not yet fitted) curvlinops (E)KFAC operator for the rows of ``(x0, t, eps)``.

    Lower-level than :func:`fit_kfac` (which calls this and :meth:`KFAC.from_operator`); the
    tests use it to compare with curvlinops' own ``operator @ v``. The factors are computed on
    first use, in the model's mode at that time: call it in eval mode.

    ``check_deterministic`` defaults to ``False``: curvlinops' check costs two extra passes
    over the data plus a matvec, and determinism holds by construction here (pre-drawn
    ``(t, eps)``, rows regenerated identically on every pass, MC noise from ``mc_seed``,
    dropout off in :func:`fit_kfac`).
    """
    from curvlinops import EKFACLinearOperator, FisherType, KFACLinearOperator, KFACType

    fisher_types = {
        "mc": FisherType.MC,
        "empirical": FisherType.EMPIRICAL,
        "type2": FisherType.TYPE2,
    }
    kfac_types = {"expand": KFACType.EXPAND, "reduce": KFACType.REDUCE}
    if fisher not in fisher_types:
        raise ValueError(f"fisher must be one of {sorted(fisher_types)}, got {fisher!r}")
    if kfac not in kfac_types:
        raise ValueError(f"kfac must be one of {sorted(kfac_types)}, got {kfac!r}")
    if mc_samples < 1 or (fisher != "mc" and mc_samples != 1):
        raise ValueError(f"mc_samples must be >= 1, and 1 unless fisher='mc'; got {mc_samples}")
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"params must share one dtype and device, got {dtypes}, {devices}")
    data = NoisyBatches(
        schedule, x0, t, eps, batch_size, dtype=params[0].dtype, device=params[0].device
    )
    cls = EKFACLinearOperator if ekfac else KFACLinearOperator
    return cls(
        FlatEps(model),
        nn.MSELoss(reduction="mean"),
        params,
        data,
        progressbar=progress,
        check_deterministic=check_deterministic,
        seed=mc_seed,
        fisher_type=fisher_types[fisher],
        mc_samples=mc_samples,
        kfac_approx=kfac_types[kfac],
        num_per_example_loss_terms=1,  # (B, D) outputs: one loss term (a row) per datum
        separate_weight_and_bias=separate_weight_and_bias,
        num_data=data.num_rows,
        batch_size_fn=_batch_size,
    )


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
) -> KFAC:
    """Fit K-FAC (or EK-FAC) of the GGN of the diffusion loss over ``N * S`` noisy rows.

    ``model``: eps-model ``(x_t, t) -> eps`` (an ``nn.Module``); ``params``: the parameters
    to cover (Linear / Conv2d weights and biases only, normally ``kfac_parameters(model)``);
    ``x0`` (N, C, H, W); ``t`` (N, S) int64 timesteps in 1..T; ``eps`` (N, S, C, H, W): S
    pre-drawn ``(t, eps)`` per example. Rows are streamed lazily in batches of
    ``batch_size`` with one pass over the data (two with ``ekfac``). The model runs in eval
    mode (restored afterwards). MC targets come from a generator seeded with ``mc_seed`` at
    the start of the pass, so the same call gives the same factors (the MC draws depend on
    ``batch_size``). See the module docstring for the matrix approximated and its scaling.
    """
    params = list(params)
    t0 = time.perf_counter()
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
        meta = {
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
        result = KFAC.from_operator(op, params, meta=meta)
    if fisher == "empirical":
        # curvlinops' empirical Fisher is D/R sum_r g_r g_r^T (module docstring); divide by D
        # so that every variant approximates the curvature of the same per-pixel-mean loss
        # (1/R sum_r g_r g_r^T here) and a damping value means the same for all of them.
        for block in result.blocks:
            block.scale(1.0 / meta["output_dim"])
        meta["empirical_scaled_by"] = 1.0 / meta["output_dim"]
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


@dataclass
class KroneckerBlock:
    """One Kronecker block ``G (x) A`` (row-major) of a layer, acting on a ``(out, k)`` matrix.

    The block's matrix ``M`` (out, k) is the concatenation along columns of its parameters
    viewed as (out, cols): ``kind="weight"`` (the weight, ``k = d_in``), ``"bias"`` (``k = 1``,
    ``A = [[1]]``) or ``"joint"`` (``[W | b]``, ``k = d_in + 1``). ``param_indices[i]`` is
    the position in ``params`` of the i-th part and ``offsets[i]`` its flat offset.
    ``G``/``A`` are the raw factors (float64, ``None`` where curvlinops does not keep them, as
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

    @property
    def k(self) -> int:
        return sum(self.cols)

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
        """``(K + damping I)^{+-1}`` on (Q, out, k) matrices via the eigendecomposition."""
        lam = self.eigenvalues() + damping
        if inverse and bool((lam <= 0).any()):
            raise FloatingPointError(
                f"layer {self.layer!r} ({self.kind}): K + {damping} I is singular "
                f"(min eigenvalue {float(self.eigenvalues().min())}); use a positive damping"
            )
        Mt = self.QG.T @ M @ self.QA
        Mt = Mt / lam if inverse else Mt * lam
        return self.QG @ Mt @ self.QA.T

    def inverse_sweep(self, M: Tensor, dampings: Sequence[float]) -> list[Tensor]:
        """``(K + d I)^{-1} M`` for each damping d, rotating into the eigenbasis only once."""
        Mt = self.QG.T @ M @ self.QA
        out = []
        for d in dampings:
            lam = self.eigenvalues() + d
            if bool((lam <= 0).any()):
                raise FloatingPointError(
                    f"layer {self.layer!r} ({self.kind}): K + {d} I is singular; use a positive damping"
                )
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


def _check_finite(layer: str, what: str, x: Tensor | None) -> None:
    if x is not None and not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"non-finite values (NaN/Inf) in {what} of layer {layer!r}")


def _psd_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the symmetric part of M in float64, eigenvalues clamped at 0."""
    M = M.to(torch.float64)
    evals, evecs = torch.linalg.eigh((M + M.T) / 2)
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
        sizes = [math.prod(s) for s in self.param_shapes]
        self.num_params = sum(sizes)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        covered = [0] * len(sizes)
        for b in self.blocks:
            if b.QG.shape != (b.out, b.out) or b.QA.shape != (b.k, b.k):
                raise ValueError(f"layer {b.layer!r}: eigenvector shapes do not match the block")
            for i, off, c in zip(b.param_indices, b.offsets, b.cols, strict=True):
                if not 0 <= i < len(sizes) or off != offsets[i] or b.out * c != sizes[i]:
                    raise ValueError(
                        f"layer {b.layer!r}: part ({i}, offset {off}, {b.out}x{c}) does not "
                        f"match the parameter shapes {self.param_shapes}"
                    )
                covered[i] += 1
            for name, x in b.tensors().items():
                _check_finite(b.layer, name, x)
        if covered != [1] * len(sizes):
            raise ValueError(f"every parameter must be in exactly one block, got {covered}")

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
        from curvlinops import EKFACLinearOperator

        params = list(params)
        if op.shape[1] != sum(p.numel() for p in params):
            raise ValueError("params do not match the operator's parameter space")
        ekfac = isinstance(op, EKFACLinearOperator)
        mapping: dict[str, dict[str, int]] = op._mapping  # noqa: SLF001 (pinned curvlinops 3.0.1)
        prefix = "model." if isinstance(op._model_func, FlatEps) else ""  # noqa: SLF001

        def layer_name(mod: str) -> str:
            return mod[len(prefix) :] if prefix and mod.startswith(prefix) else mod

        def _check_factors(A_raw: dict[str, Tensor], G_raw: dict[str, Tensor]) -> None:
            for mod in mapping:
                _check_finite(layer_name(mod), "input covariance A", A_raw.get(mod))
                _check_finite(layer_name(mod), "gradient covariance G", G_raw.get(mod))

        state = op.state_dict()
        done = state["corrected_eigenvalues"] if ekfac else state["gradient_covariances"]
        A_raw: dict[str, Tensor] = {}
        G_raw: dict[str, Tensor] = {}
        if not done:
            if not state["gradient_covariances"]:
                op.compute_kronecker_factors()
                state = op.state_dict()
            A_raw = {k: v.detach().clone() for k, v in state["input_covariances"].items()}
            G_raw = {k: v.detach().clone() for k, v in state["gradient_covariances"].items()}
            if ekfac:  # check before curvlinops decomposes (and drops) the factors
                _check_factors(A_raw, G_raw)
                op.compute_eigenvalue_correction()
                state = op.state_dict()
        elif not ekfac:
            A_raw, G_raw = state["input_covariances"], state["gradient_covariances"]
        _check_factors(A_raw, G_raw)
        separate = bool(state["separate_weight_and_bias"])

        sizes = [p.numel() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        f64 = torch.float64
        blocks = []
        for mod, pos in mapping.items():
            name = layer_name(mod)
            out = params[next(iter(pos.values()))].shape[0]
            G = G_raw.get(mod)
            A = A_raw.get(mod)
            G = None if G is None else G.to(f64)
            A = None if A is None else A.to(f64)
            if ekfac:
                QG_e = state["gradient_covariances_eigenvectors"][mod]
                QA_e = state["input_covariances_eigenvectors"].get(mod)
                corrected = state["corrected_eigenvalues"][mod]
                for what, x in (("eigenvectors of G", QG_e), ("eigenvectors of A", QA_e)):
                    _check_finite(name, what, x)
                QG = _orthonormalise(QG_e)
                QA = None if QA_e is None else _orthonormalise(QA_e)
            else:
                if G is None:
                    raise ValueError(f"layer {name!r}: curvlinops kept no gradient covariance")
                eig_g, QG = _psd_eigh(G)
                eig_a, QA = (None, None) if A is None else _psd_eigh(A)
            one = torch.ones(1, 1, dtype=f64, device=QG.device)

            if not separate and "weight" in pos and "bias" in pos:
                w, b = pos["weight"], pos["bias"]
                parts = [(w, sizes[w] // out), (b, 1)]
                blk = dict(kind="joint", A=A, QA=QA)
                if ekfac:
                    blk["eig"] = corrected.to(f64).reshape(out, -1)
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
                        blk["eig"] = corrected[i].to(f64).reshape(out, -1)
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
        meta = dict(meta or {})
        meta.setdefault("ekfac", ekfac)
        meta.setdefault("separate_weight_and_bias", separate)
        meta.setdefault("num_rows", int(state["num_data"]))
        return cls(blocks, [tuple(p.shape) for p in params], meta)

    # -- linear algebra ------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Module names, in curvlinops' (module) order, without repeats."""
        return list(dict.fromkeys(b.layer for b in self.blocks))

    @property
    def device(self) -> torch.device:
        return self.blocks[0].QG.device

    def to(self, device: torch.device | str) -> KFAC:
        """A copy with every tensor on ``device``."""
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

        Computed in float64, returned in V's dtype and device. Raises ``FloatingPointError``
        if ``K + damping I`` is singular (``damping = 0`` with a zero eigenvalue).
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
