"""Ground-truth measurements of the generated samples on retrained models (Sec. 4, App. G.4).

The LDS (eq. 13) and the counterfactual evaluation compare predicted with *measured* changes
m(theta_S, x) - m(theta, x). The measurements are Monte Carlo estimates, so two models are only
comparable when they are measured with the same randomness: every model here is measured with
the same pre-drawn (t, eps) per sample (common random numbers), which cancels most of the
Monte Carlo noise in the differences. (In a pilot on digits-2 the retraining ceiling rose from
0.55 to 0.71 between 16 and 256 draws.) Draws come from
:meth:`~diffusion_attribution.measurements.Measurement.draw`, which depends only on (seed,
sample id, number of draws), so they are re-drawn per chunk of samples instead of being held:
at paper scale (200 samples x 5000 draws of 3 x 32 x 32 noise) they would take 12 GB.

:func:`measure` evaluates one model; :func:`measure_models` many, in worker processes with one
torch thread each, caching every model's values on disk so that an interrupted run resumes
without measuring a finished model again. A cache entry is keyed by :func:`cache_key`; entries
that no longer match are moved aside, never deleted, and entries keyed by the older scheme are
re-keyed by :func:`~diffusion_attribution.migrate.adopt_legacy_measurements`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .ddpm import NoiseSchedule
from .identity import code_digest, file_digest, fingerprint, move_aside
from .io import atomic_save
from .measurements import ELBO, DiffusionLoss, Measurement, TimestepLoss, TrajectoryLogProb


def ground_truth_measurements(
    schedule: NoiseSchedule, variance: str, levels: int, timesteps: Sequence[int]
) -> dict[str, Measurement]:
    """The measurements whose change is attributed: the loss l, the ELBO, the log-probability of
    the sampling trajectory and l_t at each of ``timesteps`` (Sec. 3.3, 4.1)."""
    return {
        "loss": DiffusionLoss(schedule),
        "elbo": ELBO(schedule, variance, levels=levels),
        "trajectory": TrajectoryLogProb(schedule, variance),
        **{f"l_t={t}": TimestepLoss(schedule, t) for t in timesteps},
    }


@torch.no_grad()
def measure(
    model: nn.Module,
    measurements: Mapping[str, Measurement],
    queries: Tensor,
    num_draws: Mapping[str, int],
    seed: int,
    *,
    trajectories: Tensor | None = None,
    batch_size: int = 1024,
) -> dict[str, Tensor]:
    """Every measurement of every query (Q, C, H, W) on ``model``: ``{name: (Q,) float64}``.

    Measurement ``name`` uses ``num_draws[name]`` draws per query with ``seed`` (the query's id
    is its row), so the values are a deterministic function of the model. At most
    ``batch_size`` rows go through the network at once; a query with more draws than that is
    measured in chunks of draws (every measurement is affine in the mean over its draws).
    ``trajectories`` (T + 1, Q, C, H, W) is needed for ``"trajectory"``.
    """
    device = next(model.parameters()).device
    ids = torch.arange(len(queries))
    out = {}
    for name, m in measurements.items():
        s = int(num_draws[name])
        per = max(1, batch_size // s)
        values = torch.empty(len(queries), dtype=torch.float64)
        for q0 in range(0, len(queries), per):
            rows = slice(q0, q0 + per)
            x0 = queries[rows]
            traj = None if trajectories is None else trajectories[:, rows]
            draws = m.draw(x0, ids[rows], s, seed, trajectories=traj)
            x0 = x0.to(device)
            total = torch.zeros(x0.shape[0], dtype=torch.float64)
            for s0 in range(0, s, batch_size):
                chunk = {k: v[:, s0 : s0 + batch_size].to(device) for k, v in draws.items()}
                width = next(iter(chunk.values())).shape[1]
                total += m(model, x0, chunk).double().cpu() * (width / s)
            values[rows] = total
        out[name] = values
    return out


def measurement_code() -> str:
    """:func:`~diffusion_attribution.identity.code_digest` of the modules that compute a
    measurement (this one, ``measurements``, ``ddpm``, ``unet``, ``train``): docstrings and
    comments do not count."""
    import sys

    from . import ddpm, measurements, train, unet

    return code_digest(sys.modules[__name__], measurements, ddpm, unet, train)


def cache_settings(
    measurements: Mapping[str, Measurement],
    queries: Tensor,
    num_draws: Mapping[str, int],
    seed: int,
    trajectories: Tensor | None = None,
    batch_size: int = 1024,
) -> dict[str, object]:
    """What besides the model defines the cached values of a :func:`measure_models` call (the
    measurements, draws, seed, batch size and hashes of the queries and trajectories), as
    plain JSON-able values."""
    return {
        "measurements": {k: describe(m) for k, m in measurements.items()},
        "draws": dict(num_draws),
        "seed": seed,
        "batch": batch_size,
        "queries": hashlib.sha256(queries.numpy().tobytes()).hexdigest(),
        "trajectories": None
        if trajectories is None
        else hashlib.sha256(trajectories.numpy().tobytes()).hexdigest(),
    }


def cache_key(settings: Mapping[str, object], model_path: str | Path) -> str:
    """Fingerprint of the settings (:func:`cache_settings`), the model file's bytes and
    :func:`measurement_code`, so a cached value is never served after any of them changed
    (what it covers: :mod:`diffusion_attribution.identity`)."""
    plain = json.dumps(settings, sort_keys=True, default=str)
    return fingerprint(plain, file_digest(model_path), measurement_code())


# What every job of one measure_models call shares: sent to each worker process once.
_SHARED: dict = {}


def _share(shared: dict) -> None:
    _SHARED.clear()
    _SHARED.update(shared)


def _measure_one(job: tuple) -> dict[str, Tensor]:
    model_path, cache_path, key = job
    from .train import load_model

    torch.set_num_threads(1)
    model = load_model(model_path, device=os.environ.get("DA_DEVICE", "cpu"))
    values = measure(
        model,
        _SHARED["measurements"],
        _SHARED["queries"],
        _SHARED["num_draws"],
        _SHARED["seed"],
        trajectories=_SHARED["trajectories"],
        batch_size=_SHARED["batch_size"],
    )
    atomic_save({"key": key, "values": values}, cache_path)
    return values


def describe(m: Measurement) -> dict[str, object]:
    """What defines a measurement's values: its class, every plain setting and a hash of the
    noise schedule (a cache key must change with any of them)."""
    plain = {k: v for k, v in vars(m).items() if isinstance(v, (int, float, str, bool, type(None)))}
    betas = hashlib.sha256(m.schedule.betas.double().numpy().tobytes()).hexdigest()[:16]
    return {"class": type(m).__name__, "schedule": betas, **plain}


class MeasuredModels(dict):
    """``{label: {name: (Q,)}}`` as :func:`measure_models` returns it, with ``measured``: the
    labels measured by that call (the others came from the cache)."""

    measured: tuple[str, ...] = ()


def measure_models(
    models: Mapping[str, str | Path],
    measurements: Mapping[str, Measurement],
    queries: Tensor,
    num_draws: Mapping[str, int],
    seed: int,
    cache_dir: str | Path,
    *,
    trajectories: Tensor | None = None,
    batch_size: int = 1024,
    workers: int | None = None,
    progress: bool = True,
    prune: bool = False,
    stale_dir: str | Path,
) -> MeasuredModels:
    """:func:`measure` on every model file (``{label: path}``); returns ``{label: {name: (Q,)}}``
    (a :class:`MeasuredModels`, which also says which labels were measured rather than cached).

    Each model's values are cached in ``cache_dir/<label>.pt`` under :func:`cache_key`, which
    hashes the model file, the measurements, the draws, the seed, the queries and the
    measurement code; a cached entry with the right key is reused, any other is moved into
    ``stale_dir/<UTC timestamp>/`` and recomputed. ``workers`` processes (default: the core
    count) each measure whole models with one torch thread. With ``prune``, cached entries of
    labels not in ``models`` are moved aside too. Nothing is deleted; ``stale_dir`` (required,
    so that no caller loses a measurement by accident) should lie outside the DVC outputs,
    e.g. ``.cache/stale/measure``. Entries of the older key scheme are recomputed unless
    :func:`~diffusion_attribution.migrate.adopt_legacy_measurements` re-keyed them first.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = cache_settings(measurements, queries, num_draws, seed, trajectories, batch_size)
    stale = sorted(f for f in cache_dir.glob("*.pt") if f.stem not in models) if prune else []
    results: dict[str, dict[str, Tensor]] = {}
    todo = []
    for label, path in models.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model {label!r} not found: {path}")
        cache = cache_dir / f"{label}.pt"
        key = cache_key(settings, path)
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") == key:
                results[label] = saved["values"]
                continue
            stale.append(cache)  # measured with other settings or code: kept aside
        todo.append((label, (path, cache, key)))
    moved = move_aside(stale, stale_dir)
    if moved:
        print(f"measure: moved {len(moved)} stale cache entries to {moved[0][1].parent}")
    if todo:
        shared = {
            "measurements": measurements,
            "queries": queries,
            "num_draws": dict(num_draws),
            "seed": seed,
            "trajectories": trajectories,
            "batch_size": batch_size,
        }
        workers = min(workers or os.cpu_count() or 1, len(todo))
        bar = tqdm(total=len(todo), desc="measuring models", disable=not progress)
        if workers == 1:
            threads = torch.get_num_threads()
            _share(shared)
            try:
                for label, job in todo:
                    results[label] = _measure_one(job)
                    bar.update(1)
            finally:
                torch.set_num_threads(threads)
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(workers, ctx, initializer=_share, initargs=(shared,)) as pool:
                futures = {pool.submit(_measure_one, job): label for label, job in todo}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
        bar.close()
    out = MeasuredModels({label: results[label] for label in models})
    out.measured = tuple(label for label, _ in todo)
    return out


def stack(
    results: Mapping[str, Mapping[str, Tensor]], labels: Sequence[Sequence[str]]
) -> dict[str, Tensor]:
    """``{name: (Q, M, K)}`` from per-model results, ``labels[i][k]`` naming the model of subset
    i and seed k (the layout :func:`~diffusion_attribution.lds.lds` takes)."""
    names = list(results[labels[0][0]])
    return {
        n: torch.stack([torch.stack([results[lab][n] for lab in row], -1) for row in labels], 1)
        for n in names
    }
