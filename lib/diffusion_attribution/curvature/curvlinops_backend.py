"""Everything that touches curvlinops 3.0.1 (pinned): the data it reads and its operator.

curvlinops' ``KFACLinearOperator`` / ``EKFACLinearOperator`` call the model with one argument
and iterate over ``(X, y)`` batches. This module supplies both: :class:`FlatEps` wraps an
eps-model as ``{"x": x_t, "t": t} -> (B, D)``, and :class:`NoisyBatches` streams the rows
``r = n * S + s`` of pre-drawn ``(t, eps)`` (:mod:`~diffusion_attribution.curvature.rows`; see
:mod:`~diffusion_attribution.curvature.kfac`'s module docstring for the conventions and the
normalisation). :func:`build_operator` sets up the operator, :func:`read_factors` reads its
factors -- including curvlinops' private state (``_mapping``, ``_model_func``) -- into plain
:class:`~diffusion_attribution.curvature.kronecker.LayerFactors` and :func:`kfac_from_operator`
turns them into a :class:`~diffusion_attribution.curvature.kfac.KFAC`. No other module imports
curvlinops; a change of curvlinops version is confined to this file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from diffusion_attribution.curvature.kfac import KFAC, FisherKind, KFACKind
from diffusion_attribution.curvature.kronecker import (
    LayerFactors,
    Precision,
    check_factor_finite,
    kronecker_blocks,
)
from diffusion_attribution.curvature.rows import check_draws, noisy_rows
from diffusion_attribution.diffusion.ddpm import NoiseSchedule

if TYPE_CHECKING:  # curvlinops is imported lazily (it is slow to import and warns)
    from curvlinops import KFACLinearOperator

__all__ = [
    "FlatEps",
    "NoisyBatches",
    "OperatorFactors",
    "build_operator",
    "kfac_from_operator",
    "read_factors",
]


# --------------------------------------------------------------------------------------------
# Data: the rows as curvlinops reads them, generated lazily
# --------------------------------------------------------------------------------------------


class NoisyBatches:
    """Re-iterable, lazily generated batches ``({"x": x_t, "t": t}, eps.flatten(1))``, with
    ``"y"``, the class of each row's example, when ``labels`` (N,) are given.

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
        labels: Tensor | None = None,
    ):
        n, s = check_draws(x0, t, eps, schedule.num_timesteps)
        if labels is not None and tuple(labels.shape) != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        # rows are example-major: row r belongs to example r // S
        self.row_labels = None if labels is None else labels.repeat_interleave(s)
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
            X = {"x": xt.to(self.device, self.dtype), "t": tt.to(self.device)}
            if self.row_labels is not None:
                X["y"] = self.row_labels[start : start + self.batch_size].to(self.device)
            yield X, y.to(self.device, self.dtype)


def _batch_size(X: dict[str, Tensor]) -> int:
    return X["x"].shape[0]


class FlatEps(nn.Module):
    """Wrap an eps-model for curvlinops: ``forward({"x": x_t, "t": t}) = eps_model(x_t, t).flatten(1)``
    (``eps_model(x_t, t, y)`` when the batch has classes ``"y"``).

    curvlinops calls the model with one argument and needs a 2-D (B, D) output (EK-FAC
    requires it); the wrapped model is registered as submodule ``model``.
    """

    def __init__(self, eps_model: nn.Module):
        super().__init__()
        self.model = eps_model

    def forward(self, X: dict[str, Tensor]) -> Tensor:
        if "y" in X:
            return self.model(X["x"], X["t"], X["y"]).flatten(1)
        return self.model(X["x"], X["t"]).flatten(1)


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
    labels: Tensor | None = None,
) -> KFACLinearOperator:
    """The (not yet fitted) curvlinops (E)KFAC operator for the rows of ``(x0, t, eps)``.

    Lower-level than :func:`~diffusion_attribution.curvature.fit.fit_kfac` (which calls this
    and :func:`kfac_from_operator`); the tests use it to compare with curvlinops' own
    ``operator @ v``. The factors are computed on first use, in the model's mode at that
    time: call it in eval mode.

    ``check_deterministic`` defaults to ``False``: curvlinops' check costs two extra passes
    over the data plus a matvec, and determinism holds by construction here (pre-drawn
    ``(t, eps)``, rows regenerated identically on every pass, MC noise from ``mc_seed``,
    dropout off in :func:`~diffusion_attribution.curvature.rows.fitting_mode`).
    """
    # curvlinops is imported here, on first use: it is slow to import and warns
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
    dtype, device = params[0].dtype, params[0].device
    data = NoisyBatches(schedule, x0, t, eps, batch_size, dtype, device, labels=labels)
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
    # curvlinops is imported here, on first use: it is slow to import and warns
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
            check_factor_finite(layer_name(mod), "input covariance A", A_raw.get(mod))
            check_factor_finite(layer_name(mod), "gradient covariance G", G_raw.get(mod))

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


def kfac_from_operator(
    op: KFACLinearOperator,
    params: Sequence[Tensor],
    meta: dict[str, Any] | None = None,
    precision: Precision = "float64",
) -> KFAC:
    """The :class:`~diffusion_attribution.curvature.kfac.KFAC` of a curvlinops 3.0.1
    ``(E)KFACLinearOperator`` built on ``params``: its factors (:func:`read_factors`) as
    Kronecker blocks in ``precision`` (:func:`~diffusion_attribution.curvature.kronecker.kronecker_blocks`).

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
        precision=precision,
    )
    meta = dict(meta or {})
    meta.setdefault("ekfac", factors.ekfac)
    meta.setdefault("separate_weight_and_bias", factors.separate_weight_and_bias)
    meta.setdefault("num_rows", factors.num_data)
    return KFAC(blocks, shapes, meta)
