"""K-FAC factors as sums over data, from forward/backward hooks (no curvlinops).

This module computes the matrices that ``curvature``'s module docstring defines -- the same
rows, normalisation, expand / reduce and bias handling as curvlinops 3.0.1 -- directly with
hooks on the ``nn.Linear`` / ``nn.Conv2d`` modules of ``params``, and keeps them as *sums over
rows* so that a fit can be split into shards of examples and the shards added.

Per layer l with inputs ``a_rs`` (a Conv2d input is ``unfold``-ed into patches of
``c_in * k1 * k2`` entries, channel-major, the order of ``weight.view(c_out, -1)``; attention's
q/k/v/out are Linear on tokens) and output gradients ``b_rs = d ||y_r - f_r||^2 / d out_rs`` at
positions ``s = 1..S_l`` of row r, one shard contributes (:class:`FactorSums`)

* expand: ``sum_{r,s} a_rs a_rs^T`` and ``sum_{r,s} a_rs`` (count ``R S_l``),
  ``sum_{r,s} b_rs b_rs^T``;
* reduce: ``sum_r abar_r abar_r^T`` and ``sum_r abar_r`` (``abar_r`` = mean over positions,
  count ``R``), ``sum_r (sum_s b_rs)(sum_s b_rs)^T``;

and :func:`to_kfac` normalises the combined sums, ``A = sum / (R S_l)`` (expand) or
``sum / R`` (reduce), ``G = sum / (R D)``, eigendecomposes them and returns a
:class:`~diffusion_attribution.curvature.kfac.KFAC`. With ``separate_weight_and_bias=False`` the
joint block's input covariance is that of ``[a, 1]``: ``[[A, abar], [abar^T, 1]]`` with
``abar`` the normalised sum of inputs, so the sums do not depend on the bias mode.

The residual that is back-propagated is ``y_r - f_r`` with ``b_r = -2 (y_r - f_r)``:

* ``fisher="mc"``: ``y_r = f_r + sqrt(1/2) xi_rm`` for ``m = 1..M`` (``mc_samples``), each
  draw weighted ``1/M``. The noise ``xi`` of example n (all its S draws and M samples,
  shape (S, M, C, H, W)) comes from a generator seeded with ``SeedSequence([mc_seed, n, tag])``
  (:func:`mc_noise`), so it depends only on ``(mc_seed, n)``: a shard of examples ``[a, b)``
  fitted with ``example_offset=a`` gets exactly the noise it gets in the whole set, and the
  sums of shards add up to the sums of the whole set (up to float round-off of batching).
  This differs from curvlinops, whose MC targets come from one generator running across its
  batches (they depend on the batch size); the two MC fits agree in expectation only.
* ``fisher="empirical"``: ``y_r = eps_r`` (one backward pass).
* ``fisher="type2"``: the exact loss Hessian ``2 I``: ``D`` backward passes of
  ``sqrt(2) e_c`` (an oracle for tests).

EK-FAC (George et al. 2018) needs a second pass (:func:`correction_sums`) in the eigenbases
of the combined factors: per block ``sum_r ((Q_G^T grad_W(r) Q_A)_ij)^2`` with the per-row
gradient ``grad_W(r) = sum_s b_rs a_rs^T`` (``[a, 1]`` for a joint block, ``sum_s b_rs`` for a
separate bias), MC draws weighted ``1/M``; :func:`apply_corrections` divides by ``R D``.

Sharded use (each call may run in its own job; the partial sums are plain tensors)::

    parts = [factor_sums(net, params, sched, x0[a:b], t[a:b], eps[a:b], example_offset=a)
             for a, b in shards]                       # or FactorSums.load(...) each
    K = to_kfac(combine(parts))                        # K-FAC
    corr = combine(correction_sums(net, params, sched, x0[a:b], t[a:b], eps[a:b], K,
                                   example_offset=a) for a, b in shards)
    E = apply_corrections(K, corr)                     # EK-FAC

Arithmetic: per batch in the model's dtype (float32 for a float32 model), accumulated into
float64 sums on the model's device.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.curvature.curvlinops_backend import (
    _check_draws,
    _fitting_mode,
    noisy_rows,
)
from diffusion_attribution.curvature.kronecker import (
    KroneckerBlock,
    LayerFactors,
    _check_finite,
    kronecker_blocks,
)
from diffusion_attribution.diffusion.ddpm import NoiseSchedule

if TYPE_CHECKING:
    from diffusion_attribution.curvature.kfac import KFAC

__all__ = [
    "CorrectionSums",
    "FactorSums",
    "apply_corrections",
    "combine",
    "correction_sums",
    "factor_sums",
    "mc_noise",
    "to_kfac",
]

_SUMS_FORMAT = "diffusion_attribution.curvature.factors.FactorSums"
_CORR_FORMAT = "diffusion_attribution.curvature.factors.CorrectionSums"
_VERSION = 1
_MC_TAG = 0x4D43  # a third, non-zero SeedSequence word: MC noise never shares a stream with
# the (t, eps) draws of ``measurements.example_generator(seed, n)`` even when the seeds agree
_FISHERS = ("mc", "empirical", "type2")
_KFACS = ("expand", "reduce")


# --------------------------------------------------------------------------------------------
# MC noise and layers
# --------------------------------------------------------------------------------------------


def mc_noise(
    mc_seed: int,
    example_ids: Iterable[int],
    num_draws: int,
    mc_samples: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal MC noise ``xi`` of shape (E, num_draws, mc_samples, *shape).

    Example ``n``'s block comes from a CPU generator seeded with
    ``SeedSequence([mc_seed, n, 0x4D43])``, drawn in one call, so it depends only on
    ``(mc_seed, n, num_draws, mc_samples, shape, dtype)`` -- not on batching or sharding.
    """
    if mc_seed < 0:
        raise ValueError(f"mc_seed must be >= 0, got {mc_seed}")
    blocks = []
    for n in example_ids:
        if n < 0:
            raise ValueError(f"example ids must be >= 0, got {n}")
        ss = np.random.SeedSequence([int(mc_seed), int(n), _MC_TAG])
        g = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0]))
        blocks.append(torch.randn((num_draws, mc_samples, *shape), generator=g, dtype=dtype))
    return torch.stack(blocks)


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    positions: dict[str, int]

    @property
    def d_out(self) -> int:
        m = self.module
        return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features

    @property
    def d_in(self) -> int:
        m = self.module
        if isinstance(m, nn.Conv2d):
            return m.in_channels * math.prod(m.kernel_size)
        return m.in_features


def _layers(model: nn.Module, params: Sequence[Tensor]) -> list[_Layer]:
    """The Linear/Conv2d modules owning ``params``, in ``model.named_modules()`` order (the
    order curvlinops uses), with the positions of their weight / bias in ``params``."""
    if not params:
        raise ValueError("params is empty")
    where = {id(p): i for i, p in enumerate(params)}
    if len(where) != len(params):
        raise ValueError("params contains a tensor twice")
    layers, found = [], set()
    for name, module in model.named_modules():
        pos = {}
        own = dict(module.named_parameters(recurse=False))
        for pname, p in own.items():
            if id(p) in where:
                if pname not in ("weight", "bias"):
                    raise ValueError(f"parameter {name}.{pname} is neither a weight nor a bias")
                pos[pname] = where[id(p)]
        if not pos:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) holds parameters in params; "
                "the hooks backend supports nn.Linear and nn.Conv2d only"
            )
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise ValueError(
                f"Conv2d {name!r}: the hooks backend needs groups=1, padding_mode='zeros' and "
                f"integer padding (got groups={module.groups}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r})"
            )
        found.update(pos.values())
        layers.append(_Layer(name, module, pos))
    missing = sorted(set(range(len(params))) - found)
    if missing:
        raise ValueError(
            f"params[{missing[0]}] (shape {tuple(params[missing[0]].shape)}) is not the weight "
            "or bias of a module of model"
        )
    return layers


def _conv_crops(conv: nn.Conv2d, x: Tensor) -> list[Tensor]:
    """The k1 * k2 strided crops of the zero-padded input, each (C, B, H', W'): crop
    ``(i, j)`` holds the input entry that kernel tap ``(i, j)`` multiplies at every output
    position, so stacking them after the channel gives ``unfold``'s patches (channel-major,
    then taps)."""
    (k1, k2), (s1, s2), (p1, p2), (d1, d2) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    xp = F.pad(x.transpose(0, 1), (p2, p2, p1, p1))  # (C, B, H + 2 p1, W + 2 p2)
    ho = (x.shape[2] + 2 * p1 - d1 * (k1 - 1) - 1) // s1 + 1
    wo = (x.shape[3] + 2 * p2 - d2 * (k2 - 1) - 1) // s2 + 1
    return [
        xp[:, :, i * d1 : i * d1 + s1 * (ho - 1) + 1 : s1, j * d2 : j * d2 + s2 * (wo - 1) + 1 : s2]
        for i in range(k1)
        for j in range(k2)
    ]


def _input_columns(module: nn.Module, x: Tensor, expand: bool) -> Tensor:
    """(d_in, rows) inputs as columns: expand, one column per (row, position) -- for a Conv2d
    the ``unfold`` patch, built from strided crops (faster than ``im2col`` on CPUs); reduce,
    one column per row, the mean over positions (for a Conv2d the mean of each crop, so no
    patch is materialised)."""
    if isinstance(module, nn.Conv2d):
        crops = _conv_crops(module, x)
        c, b = crops[0].shape[:2]
        if expand:
            return torch.stack(crops, 1).reshape(c * len(crops), -1)
        return torch.stack([cr.mean((2, 3)) for cr in crops], 1).reshape(c * len(crops), b)
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    return (rows.reshape(-1, rows.shape[-1]) if expand else rows.mean(1)).T


def _inputs(module: nn.Module, x: Tensor) -> Tensor:
    """(B, S_l, d_in) inputs at the layer's positions (Conv2d: ``unfold`` patches)."""
    if isinstance(module, nn.Conv2d):
        cols = _input_columns(module, x, expand=True)
        return cols.reshape(cols.shape[0], x.shape[0], -1).permute(1, 2, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """(B, S_l, d_out) gradients w.r.t. the layer's output at its positions."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


@contextmanager
def _capture(layers: Sequence[_Layer]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Forward hooks recording each layer's (input, output) of one forward pass."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if name in seen:
                raise ValueError(
                    f"module {name!r} ran twice in one forward pass; K-FAC needs each layer "
                    "to be called once per forward"
                )
            seen[name] = (inputs[0], output)

        return fn

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(hook(layer.name)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def _check_output(f: Tensor, seen: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Raise ``FloatingPointError`` naming the first layer (in execution order) whose output
    is not finite, if the model's output is not (the MC residual is drawn, not computed from
    the output, so a NaN output would otherwise go unnoticed)."""
    if bool(torch.isfinite(f).all()):
        return
    bad = next((n for n, (_, out) in seen.items() if not bool(torch.isfinite(out).all())), None)
    where = f"first in the output of layer {bad!r}" if bad else "outside the K-FAC layers"
    raise FloatingPointError(f"non-finite values (NaN/Inf) in the model output, {where}")


def _residual_grads(
    fisher: str, f: Tensor, y: Tensor, noise: Tensor | None
) -> list[tuple[Tensor, float]]:
    """(d ||y - f||^2 / d f, weight) per backward pass: MC draws (weight 1/M), the data
    residual (empirical) or the columns ``sqrt(2) e_c`` of the Hessian square root (type2)."""
    if fisher == "empirical":
        return [(2.0 * (f.detach() - y), 1.0)]
    if fisher == "mc":  # y = f + sqrt(1/2) xi  ->  b = -sqrt(2) xi
        m = noise.shape[1]
        return [(-math.sqrt(2.0) * noise[:, i], 1.0 / m) for i in range(m)]
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device) * math.sqrt(2.0)
    return [(eye[c].expand_as(f), 1.0) for c in range(f.shape[1])]


def _batches(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    fisher: str,
    example_offset: int,
    batch_size: int,
    mc_seed: int,
    mc_samples: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """(x_t, t, y, noise) for whole examples, about ``batch_size`` rows at a time (at least
    one example); noise is (B, M, D) for MC, else ``None``."""
    n, s = t.shape
    per = max(1, batch_size // s)
    for e0 in range(0, n, per):
        e1 = min(n, e0 + per)
        xt, tt, y = noisy_rows(schedule, x0, t, eps, e0 * s, e1 * s)
        noise = None
        if fisher == "mc":
            ids = range(example_offset + e0, example_offset + e1)
            xi = mc_noise(mc_seed, ids, s, mc_samples, x0.shape[1:], dtype)
            noise = xi.reshape((e1 - e0) * s, mc_samples, -1).to(device)
        yield xt.to(device, dtype), tt.to(device), y.to(device, dtype), noise


def _check_settings(fisher: str, kfac: str, mc_samples: int, example_offset: int) -> None:
    if fisher not in _FISHERS:
        raise ValueError(f"fisher must be one of {list(_FISHERS)}, got {fisher!r}")
    if kfac not in _KFACS:
        raise ValueError(f"kfac must be one of {list(_KFACS)}, got {kfac!r}")
    if mc_samples < 1 or (fisher != "mc" and mc_samples != 1):
        raise ValueError(f"mc_samples must be >= 1, and 1 unless fisher='mc'; got {mc_samples}")
    if example_offset < 0:
        raise ValueError(f"example_offset must be >= 0, got {example_offset}")


def _model_dtype_device(params: Sequence[Tensor]) -> tuple[torch.dtype, torch.device]:
    dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"params must share one dtype and device, got {dtypes}, {devices}")
    return next(iter(dtypes)), next(iter(devices))


def _disjoint(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged half-open ranges; raises if two overlap."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a < out[-1][1]:
            raise ValueError(
                f"example ranges overlap: [{out[-1][0]}, {out[-1][1]}) and [{a}, {b}); "
                "each example may be counted in one shard only"
            )
        if out and a == out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


# --------------------------------------------------------------------------------------------
# Pass 1: factor sums
# --------------------------------------------------------------------------------------------


@dataclass
class FactorSums:
    """Unnormalised K-FAC factor sums of a shard of examples (module docstring).

    ``A[name]`` / ``a[name]``: sum of input outer products / of inputs (expand: over rows and
    positions, reduce: of the position means over rows; ``None`` for a layer without weight
    in params); ``G[name]``: sum of output-gradient outer products (MC draws weighted 1/M);
    all float64. ``positions[name]`` is ``S_l``, ``num_rows`` the rows ``R`` summed,
    ``examples`` the half-open ranges of global example ids covered. Add shards with ``+`` or
    :func:`combine`; :meth:`save` / :meth:`load` use plain tensors (``weights_only=True``).
    """

    fisher: str
    kfac: str
    mc_seed: int
    mc_samples: int
    output_dim: int
    draws_per_example: int
    layers: list[str]
    param_positions: list[dict[str, int]]
    param_shapes: list[tuple[int, ...]]
    positions: dict[str, int]
    A: dict[str, Tensor | None]
    a: dict[str, Tensor | None]
    G: dict[str, Tensor]
    num_rows: int
    examples: list[tuple[int, int]] = field(default_factory=list)

    def _settings(self) -> tuple:
        return (
            self.fisher,
            self.kfac,
            self.mc_seed if self.fisher == "mc" else None,
            self.mc_samples,
            self.output_dim,
            self.draws_per_example,
            tuple(self.layers),
            tuple(tuple(sorted(p.items())) for p in self.param_positions),
            tuple(self.param_shapes),
            tuple(sorted(self.positions.items())),
        )

    def __add__(self, other: FactorSums) -> FactorSums:
        if not isinstance(other, FactorSums):
            return NotImplemented
        if self._settings() != other._settings():
            raise ValueError(
                "cannot add factor sums fitted with different settings or layers: "
                f"{self._settings()[:6]} vs {other._settings()[:6]}"
            )
        examples = _disjoint([*self.examples, *other.examples])

        def add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
            return None if x is None else x + y.to(x.device)

        return FactorSums(
            **{k: getattr(self, k) for k in ("fisher", "kfac", "mc_seed", "mc_samples")},
            output_dim=self.output_dim,
            draws_per_example=self.draws_per_example,
            layers=list(self.layers),
            param_positions=[dict(p) for p in self.param_positions],
            param_shapes=list(self.param_shapes),
            positions=dict(self.positions),
            A={k: add(v, other.A[k]) for k, v in self.A.items()},
            a={k: add(v, other.a[k]) for k, v in self.a.items()},
            G={k: v + other.G[k].to(v.device) for k, v in self.G.items()},
            num_rows=self.num_rows + other.num_rows,
            examples=examples,
        )

    @property
    def num_examples(self) -> int:
        return sum(b - a for a, b in self.examples)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (CPU), strings, numbers, lists and dicts: ``weights_only``-loadable."""

        def cpu(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.detach().cpu()

        return {
            "format": _SUMS_FORMAT,
            "version": _VERSION,
            "fisher": self.fisher,
            "kfac": self.kfac,
            "mc_seed": self.mc_seed,
            "mc_samples": self.mc_samples,
            "output_dim": self.output_dim,
            "draws_per_example": self.draws_per_example,
            "layers": [
                {
                    "name": name,
                    "param_positions": dict(pos),
                    "positions": self.positions[name],
                    "A": cpu(self.A[name]),
                    "a": cpu(self.a[name]),
                    "G": cpu(self.G[name]),
                }
                for name, pos in zip(self.layers, self.param_positions, strict=True)
            ],
            "param_shapes": [list(s) for s in self.param_shapes],
            "num_rows": self.num_rows,
            "examples": [list(r) for r in self.examples],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FactorSums:
        _check_format(state, _SUMS_FORMAT)
        layers = state["layers"]
        return cls(
            fisher=state["fisher"],
            kfac=state["kfac"],
            mc_seed=int(state["mc_seed"]),
            mc_samples=int(state["mc_samples"]),
            output_dim=int(state["output_dim"]),
            draws_per_example=int(state["draws_per_example"]),
            layers=[d["name"] for d in layers],
            param_positions=[dict(d["param_positions"]) for d in layers],
            param_shapes=[tuple(s) for s in state["param_shapes"]],
            positions={d["name"]: int(d["positions"]) for d in layers},
            A={d["name"]: d["A"] for d in layers},
            a={d["name"]: d["a"] for d in layers},
            G={d["name"]: d["G"] for d in layers},
            num_rows=int(state["num_rows"]),
            examples=[(int(a), int(b)) for a, b in state["examples"]],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically (``io.atomic_save``)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FactorSums:
        """Load with ``torch.load(weights_only=True)``."""
        return cls.from_state_dict(torch.load(path, map_location=device, weights_only=True))


def _check_format(state: dict[str, Any], fmt: str) -> None:
    if state.get("format") != fmt or state.get("version") != _VERSION:
        raise ValueError(
            f"not a {fmt} v{_VERSION} state dict "
            f"(format={state.get('format')!r}, version={state.get('version')!r})"
        )


def combine(parts: Iterable[FactorSums] | Iterable[CorrectionSums]):
    """The sum of shards' :class:`FactorSums` (or :class:`CorrectionSums`); raises if their
    settings differ or two shards cover the same example."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine needs at least one part")
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _accumulate(total: dict[str, Tensor | None], key: str, x: Tensor) -> None:
    x = x.to(torch.float64, copy=True)  # a copy: q, k and v add the same covariance
    total[key] = x if total.get(key) is None else total[key].add_(x)


def factor_sums(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    fisher: str = "mc",
    kfac: str = "expand",
    example_offset: int = 0,
    batch_size: int = 512,
    mc_seed: int = 0,
    mc_samples: int = 1,
) -> FactorSums:
    """K-FAC factor sums over the ``N * S`` rows of examples ``example_offset ..
    example_offset + N - 1`` (module docstring).

    ``x0`` (N, C, H, W), ``t`` (N, S), ``eps`` (N, S, C, H, W) are the shard's examples and
    their pre-drawn ``(t, eps)``; ``example_offset`` is the global id of ``x0[0]`` (it seeds
    the MC noise). Rows go through the model about ``batch_size`` at a time (whole
    examples). The model runs in eval mode (restored afterwards).
    """
    _check_settings(fisher, kfac, mc_samples, example_offset)
    params = list(params)
    layers = _layers(model, params)
    dtype, device = _model_dtype_device(params)
    _check_draws(x0, t, eps, schedule.num_timesteps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    A: dict[str, Tensor | None] = {ly.name: None for ly in layers}
    a: dict[str, Tensor | None] = {ly.name: None for ly in layers}
    G: dict[str, Tensor | None] = {ly.name: None for ly in layers}
    positions: dict[str, int] = {}
    expand = kfac == "expand"
    with _fitting_mode(model, params):
        for xt, tt, y, noise in _batches(
            schedule,
            x0,
            t,
            eps,
            fisher=fisher,
            example_offset=example_offset,
            batch_size=batch_size,
            mc_seed=mc_seed,
            mc_samples=mc_samples,
            dtype=dtype,
            device=device,
        ):
            with _capture(layers) as seen:
                f = model(xt, tt).flatten(1)
            _check_output(f, seen)
            outputs = []
            shared: dict[tuple, tuple[Tensor, Tensor]] = {}
            for ly in layers:
                x, out = seen[ly.name]
                x = x.detach()  # (shares storage: the key below identifies it)
                outputs.append(out)
                s_l = out[0].numel() // ly.d_out
                if positions.setdefault(ly.name, s_l) != s_l:
                    raise ValueError(f"layer {ly.name!r}: the number of positions changed")
                if "weight" not in ly.positions:
                    continue
                m = ly.module
                key = (
                    x.data_ptr(),
                    tuple(x.shape),
                    x.stride(),
                    type(m),
                    getattr(m, "kernel_size", None),
                    getattr(m, "stride", None),
                    getattr(m, "padding", None),
                    getattr(m, "dilation", None),
                )
                if key not in shared:  # q, k, v read the same tokens: one covariance
                    cols = _input_columns(m, x, expand)
                    shared[key] = (cols @ cols.T, cols.sum(1))
                aaT, asum = shared[key]
                _accumulate(A, ly.name, aaT)
                _accumulate(a, ly.name, asum)
            seeds = _residual_grads(fisher, f, y, noise)
            for i, (g_f, w) in enumerate(seeds):
                grads = torch.autograd.grad(
                    f, outputs, g_f, retain_graph=i < len(seeds) - 1, allow_unused=True
                )
                for ly, g, out in zip(layers, grads, outputs, strict=True):
                    g = torch.zeros_like(out) if g is None else g
                    b = _output_grads(ly.module, g)
                    b = b.reshape(-1, b.shape[-1]) if expand else b.sum(1)
                    bbT = b.T @ b
                    _accumulate(G, ly.name, bbT if w == 1.0 else bbT * w)
    return FactorSums(
        fisher=fisher,
        kfac=kfac,
        mc_seed=mc_seed,
        mc_samples=mc_samples,
        output_dim=math.prod(x0.shape[1:]),
        draws_per_example=t.shape[1],
        layers=[ly.name for ly in layers],
        param_positions=[dict(ly.positions) for ly in layers],
        param_shapes=[tuple(p.shape) for p in params],
        positions=positions,
        A=A,
        a=a,
        G=G,
        num_rows=t.numel(),
        examples=[(example_offset, example_offset + t.shape[0])],
    )


def _normalised(sums: FactorSums, name: str, joint: bool) -> tuple[Tensor | None, Tensor]:
    """(A, G) of layer ``name``: ``A = sum / (R S_l)`` (expand) or ``sum / R`` (reduce),
    augmented to ``[[A, abar], [abar^T, 1]]`` for a joint block; ``G = sum / (R D)``."""
    r = sums.num_rows
    G = sums.G[name] / (r * sums.output_dim)
    A_sum = sums.A[name]
    if A_sum is None:
        return None, G
    count = r * sums.positions[name] if sums.kfac == "expand" else r
    A = A_sum / count
    if joint:
        abar = (sums.a[name] / count)[:, None]
        one = torch.ones(1, 1, dtype=A.dtype, device=A.device)
        A = torch.cat([torch.cat([A, abar], 1), torch.cat([abar.T, one], 1)], 0)
    return A, G


def to_kfac(
    sums: FactorSums,
    *,
    separate_weight_and_bias: bool = True,
    meta: dict[str, Any] | None = None,
) -> KFAC:
    """Normalise combined factor sums (:func:`_normalised`) and eigendecompose them: the
    :class:`~diffusion_attribution.curvature.kfac.KFAC` of the rows summed. Raises
    ``FloatingPointError`` naming the layer if a factor is not finite."""
    from diffusion_attribution.curvature.kfac import KFAC

    layers = []
    for name, pos in zip(sums.layers, sums.param_positions, strict=True):
        joint = not separate_weight_and_bias and "weight" in pos and "bias" in pos
        A, G = _normalised(sums, name, joint)
        _check_finite(name, "input covariance A", A)
        _check_finite(name, "gradient covariance G", G)
        layers.append(LayerFactors(name, dict(pos), A=A, G=G))
    blocks = kronecker_blocks(
        layers, sums.param_shapes, ekfac=False, separate_weight_and_bias=separate_weight_and_bias
    )
    info = {
        "backend": "hooks",
        "fisher": sums.fisher,
        "kfac": sums.kfac,
        "ekfac": False,
        "separate_weight_and_bias": separate_weight_and_bias,
        "num_examples": sums.num_examples,
        "draws_per_example": sums.draws_per_example,
        "num_rows": sums.num_rows,
        "output_dim": sums.output_dim,
        "mc_seed": sums.mc_seed,
        "mc_samples": sums.mc_samples,
        "examples": [list(r) for r in sums.examples],
    }
    info.update(meta or {})
    return KFAC(blocks, sums.param_shapes, info)


# --------------------------------------------------------------------------------------------
# Pass 2: EK-FAC eigenvalue corrections
# --------------------------------------------------------------------------------------------


def basis_fingerprint(basis: KFAC) -> str:
    """SHA-256 of every block's eigenvectors (float64 bytes): identifies the eigenbases the
    corrections were computed in."""
    h = hashlib.sha256()
    for b in basis.blocks:
        for Q in (b.QG, b.QA):
            h.update(Q.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CorrectionSums:
    """Unnormalised EK-FAC corrections of a shard: ``E[i]`` (out, k) float64 for block ``i``
    of the basis (module docstring), ``num_rows`` rows summed, ``examples`` the ranges of
    global example ids covered, ``basis`` the :func:`basis_fingerprint` of the eigenbases."""

    fisher: str
    mc_seed: int
    mc_samples: int
    output_dim: int
    basis: str
    E: list[Tensor]
    num_rows: int
    examples: list[tuple[int, int]] = field(default_factory=list)

    def _settings(self) -> tuple:
        mc = self.mc_seed if self.fisher == "mc" else None
        shapes = tuple(tuple(e.shape) for e in self.E)
        return (self.fisher, mc, self.mc_samples, self.output_dim, self.basis, shapes)

    def __add__(self, other: CorrectionSums) -> CorrectionSums:
        if not isinstance(other, CorrectionSums):
            return NotImplemented
        if self._settings() != other._settings():
            raise ValueError(
                "cannot add corrections computed with different settings or eigenbases: "
                f"{self._settings()[:5]} vs {other._settings()[:5]}"
            )
        return CorrectionSums(
            fisher=self.fisher,
            mc_seed=self.mc_seed,
            mc_samples=self.mc_samples,
            output_dim=self.output_dim,
            basis=self.basis,
            E=[x + y.to(x.device) for x, y in zip(self.E, other.E, strict=True)],
            num_rows=self.num_rows + other.num_rows,
            examples=_disjoint([*self.examples, *other.examples]),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _CORR_FORMAT,
            "version": _VERSION,
            "fisher": self.fisher,
            "mc_seed": self.mc_seed,
            "mc_samples": self.mc_samples,
            "output_dim": self.output_dim,
            "basis": self.basis,
            "E": [e.detach().cpu() for e in self.E],
            "num_rows": self.num_rows,
            "examples": [list(r) for r in self.examples],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CorrectionSums:
        _check_format(state, _CORR_FORMAT)
        return cls(
            fisher=state["fisher"],
            mc_seed=int(state["mc_seed"]),
            mc_samples=int(state["mc_samples"]),
            output_dim=int(state["output_dim"]),
            basis=state["basis"],
            E=list(state["E"]),
            num_rows=int(state["num_rows"]),
            examples=[(int(a), int(b)) for a, b in state["examples"]],
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> CorrectionSums:
        return cls.from_state_dict(torch.load(path, map_location=device, weights_only=True))


def correction_sums(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    basis: KFAC,
    *,
    fisher: str | None = None,
    example_offset: int = 0,
    batch_size: int = 512,
    mc_seed: int | None = None,
    mc_samples: int | None = None,
) -> CorrectionSums:
    """EK-FAC correction sums of a shard in the eigenbases of ``basis`` (module docstring).

    ``basis`` is the K-FAC of pass 1 (:func:`to_kfac` of the combined sums); its blocks fix
    the bias mode. ``fisher``, ``mc_seed`` and ``mc_samples`` default to ``basis.meta``'s,
    so the MC noise of pass 2 is that of pass 1.
    """
    fisher = basis.meta.get("fisher", "mc") if fisher is None else fisher
    mc_seed = int(basis.meta.get("mc_seed", 0)) if mc_seed is None else mc_seed
    mc_samples = int(basis.meta.get("mc_samples", 1)) if mc_samples is None else mc_samples
    _check_settings(fisher, "expand", mc_samples, example_offset)
    params = list(params)
    basis.check_params(params)
    layers = _layers(model, params)
    by_layer: dict[str, list[tuple[int, KroneckerBlock]]] = {}
    for i, b in enumerate(basis.blocks):
        by_layer.setdefault(b.layer, []).append((i, b))
    if set(by_layer) != {ly.name for ly in layers}:
        raise ValueError(
            f"basis layers {sorted(by_layer)} differ from the model's {[ly.name for ly in layers]}"
        )
    dtype, device = _model_dtype_device(params)
    _check_draws(x0, t, eps, schedule.num_timesteps)
    rot = {i: (b.QG.to(device, dtype), b.QA.to(device, dtype)) for i, b in enumerate(basis.blocks)}
    E: list[Tensor | None] = [None] * len(basis.blocks)
    with _fitting_mode(model, params):
        for xt, tt, y, noise in _batches(
            schedule,
            x0,
            t,
            eps,
            fisher=fisher,
            example_offset=example_offset,
            batch_size=batch_size,
            mc_seed=mc_seed,
            mc_samples=mc_samples,
            dtype=dtype,
            device=device,
        ):
            with _capture(layers) as seen:
                f = model(xt, tt).flatten(1)
            _check_output(f, seen)
            outputs = [seen[ly.name][1] for ly in layers]
            acts = {}
            for ly in layers:
                if "weight" in ly.positions:
                    acts[ly.name] = _inputs(ly.module, seen[ly.name][0].detach())
            seeds = _residual_grads(fisher, f, y, noise)
            for s_i, (g_f, w) in enumerate(seeds):
                grads = torch.autograd.grad(
                    f, outputs, g_f, retain_graph=s_i < len(seeds) - 1, allow_unused=True
                )
                for ly, g, out in zip(layers, grads, outputs, strict=True):
                    g = torch.zeros_like(out) if g is None else g
                    b_rs = _output_grads(ly.module, g)  # (B, S_l, d_out)
                    for i, blk in by_layer[ly.name]:
                        QG, QA = rot[i]
                        bt = b_rs @ QG
                        if blk.kind == "bias":
                            e = bt.sum(1).square().sum(0)[:, None]
                        else:
                            x = acts[ly.name]
                            if blk.kind == "joint":
                                x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
                            e = _rotated_square_sum(bt, x, QA)
                        _accumulate_list(E, i, e if w == 1.0 else e * w)
    return CorrectionSums(
        fisher=fisher,
        mc_seed=mc_seed,
        mc_samples=mc_samples,
        output_dim=math.prod(x0.shape[1:]),
        basis=basis_fingerprint(basis),
        E=E,
        num_rows=t.numel(),
        examples=[(example_offset, example_offset + t.shape[0])],
    )


def _rotated_square_sum(bt: Tensor, x: Tensor, QA: Tensor) -> Tensor:
    """``sum_r ((Q_G^T grad_W(r) Q_A)_ij)^2`` from rotated gradients ``bt`` (B, S, out) and
    inputs ``x`` (B, S, k): per-row gradients formed in the eigenbasis (``bt^T (x Q_A)``) when
    the positions are few, else formed first and rotated."""
    bsz, s, k = x.shape
    out = bt.shape[2]
    if out * k * (out + k) < s * (out * out + k * k):  # gradient first, then rotate by Q_A
        grad = bt.transpose(1, 2) @ x  # (B, out, k), already rotated by Q_G
        rotated = grad @ QA
    else:
        rotated = bt.transpose(1, 2) @ (x @ QA)
    return rotated.square().sum(0)


def _accumulate_list(total: list[Tensor | None], i: int, x: Tensor) -> None:
    x = x.to(torch.float64, copy=True)
    total[i] = x if total[i] is None else total[i].add_(x)


def apply_corrections(basis: KFAC, corrections: CorrectionSums) -> KFAC:
    """EK-FAC: ``basis`` with its Kronecker eigenvalues replaced by
    ``corrections.E / (R D)``. Raises if the corrections were computed in other eigenbases or
    on other examples than the basis' factors."""
    from diffusion_attribution.curvature.kfac import KFAC

    if corrections.basis != basis_fingerprint(basis):
        raise ValueError("the corrections were computed in other eigenbases than basis")
    examples = basis.meta.get("examples")
    if examples is not None and [list(r) for r in corrections.examples] != examples:
        raise ValueError(
            f"corrections cover examples {corrections.examples}, the basis' factors {examples}"
        )
    scale = 1.0 / (corrections.num_rows * corrections.output_dim)
    blocks = []
    for b, e in zip(basis.blocks, corrections.E, strict=True):
        _check_finite(b.layer, "EK-FAC eigenvalue corrections", e)
        blocks.append(
            KroneckerBlock(
                b.layer,
                b.kind,
                b.param_indices,
                b.offsets,
                b.cols,
                b.out,
                QG=b.QG,
                QA=b.QA,
                eig=(e * scale).to(b.QG.device),
                G=b.G,
                A=b.A,
            )
        )
    meta = {**basis.meta, "ekfac": True}
    return KFAC(blocks, basis.param_shapes, meta)
