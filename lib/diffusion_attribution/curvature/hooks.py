"""The hooks backend (the default): K-FAC factors by forward / backward hooks, no curvlinops.

This module computes the matrices that :mod:`~diffusion_attribution.curvature.kfac`'s module
docstring defines -- the same rows, normalisation, expand / reduce and bias handling as
curvlinops 3.0.1 -- directly with hooks on the ``nn.Linear`` / ``nn.Conv2d`` modules of
``params`` (:mod:`~diffusion_attribution.curvature.layers`), as sums over rows
(:class:`~diffusion_attribution.curvature.partial_sums.FactorSums`), so that a fit can be split
into shards of examples and the shards added.

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
separate bias), MC draws weighted ``1/M``;
:func:`~diffusion_attribution.curvature.partial_sums.apply_corrections` divides by ``R D``.

Sharded use (each call may run in its own job; the partial sums are plain tensors; ``to_kfac``,
``combine`` and ``apply_corrections`` are :mod:`~diffusion_attribution.curvature.partial_sums`')::

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

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.curvature.kronecker import KroneckerBlock
from diffusion_attribution.curvature.layers import (
    capture,
    check_output,
    input_columns,
    layer_inputs,
    layer_output_grads,
    owning_layers,
)
from diffusion_attribution.curvature.partial_sums import (
    CorrectionSums,
    FactorSums,
    basis_fingerprint,
    combine,
)
from diffusion_attribution.curvature.patch_covariance import (
    fast_path_applies,
    gram,
    input_covariance,
)
from diffusion_attribution.curvature.rows import check_draws, fitting_mode, noisy_rows
from diffusion_attribution.diffusion.conditional import bound, class_runs
from diffusion_attribution.diffusion.ddpm import NoiseSchedule

__all__ = ["correction_sums", "factor_sums", "mc_noise"]

_MC_TAG = 0x4D43  # a third, non-zero SeedSequence word: MC noise never shares a stream with
# the (t, eps) draws of ``measurements.example_generator(seed, n)`` even when the seeds agree
_FISHERS = ("mc", "empirical", "example", "type2")
_KFACS = ("expand", "reduce")


# --------------------------------------------------------------------------------------------
# MC noise, residuals and batches
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


def _residual_grads(
    fisher: str, f: Tensor, y: Tensor, noise: Tensor | None
) -> list[tuple[Tensor, float]]:
    """(d ||y - f||^2 / d f, weight) per backward pass: MC draws (weight 1/M), the data
    residual (empirical) or the columns ``sqrt(2) e_c`` of the Hessian square root (type2)."""
    if fisher in ("empirical", "example"):
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


# --------------------------------------------------------------------------------------------
# Pass 1: factor sums
# --------------------------------------------------------------------------------------------


def _input_covariance(module: nn.Module, x: Tensor, expand: bool) -> tuple[Tensor, Tensor]:
    """``(cols @ cols.T, cols.sum(1))`` of the layer's input columns; for a stride-1 conv
    under expand from products of input positions, without forming the patches
    (:mod:`~diffusion_attribution.curvature.patch_covariance`)."""
    if expand and isinstance(module, nn.Conv2d) and fast_path_applies(module):
        return input_covariance(module, x)
    cols = input_columns(module, x, expand)
    return gram(cols), cols.sum(1)


def draw_mean(x: Tensor, draws: int) -> Tensor:
    """``fisher="example"``: the mean of a layer's inputs or output gradients (rows first,
    ``draws`` consecutive rows per example) over each example's draws, times ``sqrt(draws)``.

    The empirical Fisher of eq. 11 as the paper writes it is the outer product of each
    *example's* gradient, of its loss averaged over its S draws, ``grad lbar_n = 1/S sum_s
    g_ns``. Within a layer ``grad_W lbar_n = sum_p bbar_np abar_np^T`` exactly when the inputs
    ``a_nsp`` do not depend on the draw s (then ``bbar = mean_s b``, ``abar = a``); K-FAC of
    the per-example Fisher takes ``abar_np = mean_s a_nsp``, ``bbar_np = mean_s b_nsp`` at
    every position p (expand) or summed over positions (reduce). The factor ``sqrt(S)`` on
    each makes the sums over the N examples' averaged rows carry the weight of the N * S rows
    that :func:`~diffusion_attribution.curvature.partial_sums.to_kfac` divides by, so the
    result is ``A = 1/(N S_l) sum abar abar^T``, ``G = 1/(N D) sum bbar bbar^T``. With one draw
    (or identical draws) it is the per-draw empirical Fisher."""
    if draws == 1:
        return x
    return x.reshape(-1, draws, *x.shape[1:]).mean(1) * math.sqrt(draws)


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
    labels: Tensor | None = None,
) -> FactorSums:
    """K-FAC factor sums (:class:`~diffusion_attribution.curvature.partial_sums.FactorSums`)
    over the ``N * S`` rows of examples ``example_offset .. example_offset + N - 1``.

    ``x0`` (N, C, H, W), ``t`` (N, S), ``eps`` (N, S, C, H, W) are the shard's examples and
    their pre-drawn ``(t, eps)``; ``example_offset`` is the global id of ``x0[0]`` (it seeds
    the MC noise). Rows go through the model about ``batch_size`` at a time (whole
    examples). The model runs in eval mode (restored afterwards). ``labels`` (N,): the class
    of each example, for a :class:`~diffusion_attribution.diffusion.conditional.ConditionalUNet`:
    the sum over the runs of equal labels (one per class in a class-sorted set) of their sums,
    each with the model bound to its class and its examples' own ids (so their MC noise).
    """
    if labels is not None:
        kw = dict(fisher=fisher, kfac=kfac, batch_size=batch_size, mc_seed=mc_seed)
        kw["mc_samples"] = mc_samples
        args = (model, params, schedule, x0, t, eps)
        return _per_class(factor_sums, args, labels, example_offset, kw)
    _check_settings(fisher, kfac, mc_samples, example_offset)
    params = list(params)
    layers = owning_layers(model, params)
    dtype, device = _model_dtype_device(params)
    check_draws(x0, t, eps, schedule.num_timesteps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    A: dict[str, Tensor | None] = {ly.name: None for ly in layers}
    a: dict[str, Tensor | None] = {ly.name: None for ly in layers}
    G: dict[str, Tensor | None] = {ly.name: None for ly in layers}
    positions: dict[str, int] = {}
    expand = kfac == "expand"
    draws = t.shape[1] if fisher == "example" else 1  # rows averaged per example
    with fitting_mode(model, params):
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
            with capture(layers) as seen:
                f = model(xt, tt).flatten(1)
            check_output(f, seen)
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
                    aaT, asum = _input_covariance(m, draw_mean(x, draws), expand)
                    shared[key] = aaT, asum * math.sqrt(draws)  # the sum: S mean_s, not sqrt
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
                    b = draw_mean(layer_output_grads(ly.module, g), draws)
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


# --------------------------------------------------------------------------------------------
# Pass 2: EK-FAC eigenvalue corrections
# --------------------------------------------------------------------------------------------


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
    labels: Tensor | None = None,
) -> CorrectionSums:
    """EK-FAC correction sums of a shard in the eigenbases of ``basis`` (module docstring).

    ``basis`` is the K-FAC of pass 1
    (:func:`~diffusion_attribution.curvature.partial_sums.to_kfac` of the combined sums); its
    blocks fix the bias mode. ``fisher``, ``mc_seed`` and ``mc_samples`` default to
    ``basis.meta``'s, so the MC noise of pass 2 is that of pass 1. ``labels``: as in
    :func:`factor_sums`.
    """
    if labels is not None:
        kw = dict(fisher=fisher, batch_size=batch_size, mc_seed=mc_seed, mc_samples=mc_samples)
        args = (model, params, schedule, x0, t, eps, basis)
        return _per_class(correction_sums, args, labels, example_offset, kw)
    fisher = basis.meta.get("fisher", "mc") if fisher is None else fisher
    mc_seed = int(basis.meta.get("mc_seed", 0)) if mc_seed is None else mc_seed
    mc_samples = int(basis.meta.get("mc_samples", 1)) if mc_samples is None else mc_samples
    _check_settings(fisher, "expand", mc_samples, example_offset)
    params = list(params)
    basis.check_params(params)
    layers = owning_layers(model, params)
    by_layer: dict[str, list[tuple[int, KroneckerBlock]]] = {}
    for i, b in enumerate(basis.blocks):
        by_layer.setdefault(b.layer, []).append((i, b))
    if set(by_layer) != {ly.name for ly in layers}:
        raise ValueError(
            f"basis layers {sorted(by_layer)} differ from the model's {[ly.name for ly in layers]}"
        )
    dtype, device = _model_dtype_device(params)
    check_draws(x0, t, eps, schedule.num_timesteps)
    rot = {i: (b.QG.to(device, dtype), b.QA.to(device, dtype)) for i, b in enumerate(basis.blocks)}
    E: list[Tensor | None] = [None] * len(basis.blocks)
    with fitting_mode(model, params):
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
            with capture(layers) as seen:
                f = model(xt, tt).flatten(1)
            check_output(f, seen)
            outputs = [seen[ly.name][1] for ly in layers]
            acts = {}
            for ly in layers:
                if "weight" in ly.positions:
                    acts[ly.name] = layer_inputs(ly.module, seen[ly.name][0].detach())
            seeds = _residual_grads(fisher, f, y, noise)
            for s_i, (g_f, w) in enumerate(seeds):
                grads = torch.autograd.grad(
                    f, outputs, g_f, retain_graph=s_i < len(seeds) - 1, allow_unused=True
                )
                for ly, g, out in zip(layers, grads, outputs, strict=True):
                    g = torch.zeros_like(out) if g is None else g
                    b_rs = layer_output_grads(ly.module, g)  # (B, S_l, d_out)
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


def _per_class(fn, args: tuple, labels: Tensor, example_offset: int, kw: dict):
    """``combine`` of ``fn`` (:func:`factor_sums` or :func:`correction_sums`) over the runs of
    equal ``labels``, each with the model bound to its class; ``args`` = (model, params,
    schedule, x0, t, eps[, basis])."""
    model, params, schedule, x0, t, eps, *rest = args
    if tuple(labels.shape) != (x0.shape[0],):
        raise ValueError(f"labels must have shape ({x0.shape[0]},), got {tuple(labels.shape)}")
    parts = []
    for c, rows in class_runs(labels):
        with bound(model, c):
            part_args = (model, params, schedule, x0[rows], t[rows], eps[rows], *rest)
            parts.append(fn(*part_args, example_offset=example_offset + rows.start, **kw))
    return combine(parts)


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
