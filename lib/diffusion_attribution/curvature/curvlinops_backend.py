"""Everything that touches curvlinops 3.0.1 (pinned): the data it reads and its operator.

curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` call the model with one argument
and iterate over ``(X, y)`` batches. This module supplies both: :class:`FlatEps` wraps an
eps-model as ``{"x": x_t, "t": t} -> (B, D)``, and :class:`NoisyBatches` streams the rows
``r = n * S + s`` of pre-drawn ``(t, eps)`` (see ``curvature``'s module docstring for the
conventions and the normalisation). :func:`build_operator` sets up the operator and
:func:`read_factors` reads its factors -- including curvlinops' private state (``_mapping``,
``_model_func``) -- into plain :class:`~diffusion_attribution.curvature.kronecker.LayerFactors`. No other
module imports curvlinops; a change of curvlinops version is confined to this file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from diffusion_attribution.curvature.kronecker import LayerFactors, _check_finite
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample

if TYPE_CHECKING:  # curvlinops is imported lazily (it is slow to import and warns)
    from curvlinops import KFACLinearOperator

FisherKind = Literal["mc", "empirical", "type2"]
"""``"mc"``: GGN^model via the MC Fisher of eq. 10 (``mc_samples`` draws per row, default 1);
``"empirical"``: GGN^loss, the empirical Fisher of eq. 11; ``"type2"``: exact GGN^model
(exact loss Hessian; D backward passes per batch — an oracle for tests)."""

KFACKind = Literal["expand", "reduce"]
"""K-FAC-expand (the paper's default) or K-FAC-reduce for weight-sharing layers
(Eschenhagen et al., 2023)."""


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


@dataclass
class OperatorFactors:
    """What :func:`read_factors` takes from a curvlinops operator: one entry per layer, in
    curvlinops' (module) order, and the settings the factors were computed with."""

    layers: list[LayerFactors]
    ekfac: bool
    separate_weight_and_bias: bool
    num_data: int


def read_factors(op: KFACLinearOperator, params: Sequence[Tensor]) -> OperatorFactors:
    """The raw factors of a curvlinops 3.0.1 ``(E)KFACLinearOperator`` built on ``params``.

    Computes the factors if the operator has not yet (curvlinops adds to existing factors
    when ``compute_kronecker_factors`` runs twice, so it is called only when they are
    empty). For EK-FAC, ``A`` and ``G`` are returned only when computed here (curvlinops drops
    them after its eigenvalue correction). Module names lose the ``model.`` prefix of
    :class:`FlatEps`. Raises ``FloatingPointError`` naming the layer if a factor is not finite.
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

    layers = []
    for mod, pos in mapping.items():
        layer = LayerFactors(layer_name(mod), pos, A=A_raw.get(mod), G=G_raw.get(mod))
        if ekfac:
            layer.QG = state["gradient_covariances_eigenvectors"][mod]
            layer.QA = state["input_covariances_eigenvectors"].get(mod)
            layer.corrected = state["corrected_eigenvalues"][mod]
        layers.append(layer)
    return OperatorFactors(
        layers=layers,
        ekfac=ekfac,
        separate_weight_and_bias=bool(state["separate_weight_and_bias"]),
        num_data=int(state["num_data"]),
    )
