"""Ground-truth measurements of the generated samples on retrained models (Sec. 4, App. G.4).

The LDS (eq. 13) and the counterfactual evaluation compare predicted with *measured* changes
m(theta_S, x) - m(theta, x). The measurements are Monte Carlo estimates, so two models are only
comparable when they are measured with the same randomness: every model here is measured with
the same pre-drawn (t, eps) per sample (common random numbers), which cancels most of the
Monte Carlo noise in the differences. (In a pilot on digits-2 the retraining ceiling rose from
0.55 to 0.71 between 16 and 256 draws.) Draws come from
:meth:`~diffusion_attribution.diffusion.measurements.Measurement.draw`, which depends only on (seed,
sample id, number of draws), so they are re-drawn per chunk of samples instead of being held:
at paper scale (200 samples x 5000 draws of 3 x 32 x 32 noise) they would take 12 GB.

:func:`measure` evaluates one model; :func:`measure_models` many, in worker processes with one
torch thread each, caching every model's values on disk so that an interrupted run resumes
without measuring a finished model again. A cache entry is keyed by :func:`cache_key`; entries
that no longer match are moved aside, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint, move_aside
from diffusion_attribution.core.io import CorruptFileError, atomic_save, check_finite, load
from diffusion_attribution.core.jobs import run_tasks
from diffusion_attribution.diffusion import conditional, ddpm, training, unet
from diffusion_attribution.diffusion import measurements as measurement_module
from diffusion_attribution.diffusion.conditional import bound, class_groups, load_conditional
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import (
    ELBO,
    DiffusionLoss,
    Measurement,
    TimestepLoss,
    TrajectoryLogProb,
)
from diffusion_attribution.diffusion.training import load_checked_model


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


@torch.no_grad()
def measure_by_class(
    model: nn.Module,
    measurements: Mapping[str, Measurement],
    queries: Tensor,
    labels: Tensor,
    num_draws: Mapping[str, int],
    seed: int,
    *,
    trajectories: Tensor | None = None,
    batch_size: int = 1024,
) -> dict[str, Tensor]:
    """:func:`measure` for a class-conditional model: the queries of each class (``labels``,
    (Q,)) measured with the model bound to their class, i.e. under ``p_theta(x | c)``. A
    query's draws are those of its row among its class's queries (common to every model, as
    :func:`measure`'s)."""
    out = {name: torch.empty(len(queries), dtype=torch.float64) for name in measurements}
    for c, ids in class_groups(labels):
        traj = None if trajectories is None else trajectories[:, ids]
        with bound(model, c):
            part = measure(
                model, measurements, queries[ids], num_draws, seed, trajectories=traj,
                batch_size=batch_size,
            )  # fmt: skip
        for name, values in part.items():
            out[name][ids] = values
    return out


def measurement_code() -> str:
    """:func:`~diffusion_attribution.core.identity.code_digest` of the code that computes a
    measurement (:func:`measure` and :func:`describe` here, the modules ``measurements``,
    ``ddpm``, ``unet``, ``training``): docstrings and comments do not count, nor does how the
    models are fanned out over processes or jobs."""
    return code_digest(*_MEASURED_BY, measurement_module, ddpm, unet, training)


def cache_settings(
    measurements: Mapping[str, Measurement],
    queries: Tensor,
    num_draws: Mapping[str, int],
    seed: int,
    trajectories: Tensor | None = None,
    batch_size: int = 1024,
    labels: Tensor | None = None,
) -> dict[str, object]:
    """What besides the model defines the cached values of a :func:`measure_models` call (the
    measurements, draws, seed, batch size and hashes of the queries and trajectories; with
    ``labels``, the queries' classes and the code of :func:`measure_by_class`), as plain
    JSON-able values."""
    if labels is not None:
        plain = cache_settings(measurements, queries, num_draws, seed, trajectories, batch_size)
        return {
            **plain,
            "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
            "by_class": code_digest(measure_by_class, conditional),
        }
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
    (what it covers: :mod:`diffusion_attribution.core.identity`)."""
    plain = json.dumps(settings, sort_keys=True, default=str)
    return fingerprint(plain, file_digest(model_path), measurement_code())


@dataclass(frozen=True)
class MeasureTask:
    """Models to measure in one job: ``models`` are (label, model file, cache file, cache
    key); ``inputs`` a tensor file with the queries and trajectories; ``output`` the last
    model's cache file (written last, so it exists only when the whole task is done)."""

    name: str
    output: str
    models: tuple[tuple[str, str, str, str], ...]
    inputs: str
    measurements: dict
    num_draws: dict
    seed: int
    batch_size: int
    threads: int = 1


def run_measure_task(task: MeasureTask) -> str:
    """Measure each model of ``task`` whose cache file does not exist yet (one torch thread
    per process by default), saving each model's values atomically as soon as they exist."""
    threads = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        inputs = torch.load(task.inputs, weights_only=True)
        for label, model_path, cache_path, key in task.models:
            if Path(cache_path).exists():
                continue
            device = os.environ.get("DA_DEVICE", "cpu")
            kw = dict(trajectories=inputs["trajectories"], batch_size=task.batch_size)
            args = (task.measurements, inputs["queries"])
            if inputs.get("labels") is None:
                model = load_checked_model(model_path, device=device)
                values = measure(model, *args, task.num_draws, task.seed, **kw)
            else:
                model = load_conditional(model_path, device=device)
                values = measure_by_class(
                    model, *args, inputs["labels"], task.num_draws, task.seed, **kw
                )
            check_finite(values, f"measure: model {label!r} ({model_path})")
            atomic_save({"key": key, "values": values}, cache_path)
    finally:
        torch.set_num_threads(threads)
    return task.output


def describe(m: Measurement) -> dict[str, object]:
    """What defines a measurement's values: its class, every plain setting and a hash of the
    noise schedule (a cache key must change with any of them)."""
    plain = {k: v for k, v in vars(m).items() if isinstance(v, (int, float, str, bool, type(None)))}
    betas = hashlib.sha256(m.schedule.betas.double().numpy().tobytes()).hexdigest()[:16]
    return {"class": type(m).__name__, "schedule": betas, **plain}


# The functions measurement_code() covers, bound here (a test that patches ``measure`` must
# not change the key).
_MEASURED_BY = (measure, describe)


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
    folder: str | Path | None = None,
    labels: Tensor | None = None,
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
    e.g. ``.cache/stale/measure``.

    The models are measured by tasks of :func:`~diffusion_attribution.core.jobs.run_tasks`
    (``DA_EXECUTOR``: in this process when ``workers`` is 1, else local subprocesses or a
    SLURM job array), several models per task locally (a process start costs seconds), one
    per task on SLURM (``DA_MODELS_PER_TASK`` overrides both); ``folder`` (default: a hidden
    folder beside ``cache_dir``) holds the tasks' shared inputs and submitit's files.
    ``labels`` (Q,): the queries' classes, for class-conditional models
    (:func:`measure_by_class`).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = cache_settings(
        measurements, queries, num_draws, seed, trajectories, batch_size, labels=labels
    )
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
            try:
                saved = load(cache, "measurement cache entry")
            except CorruptFileError as err:
                print(f"measure: {err}; moving it aside and measuring {label!r} again")
                saved = {}
            if saved.get("key") == key:
                results[label] = saved["values"]
                continue
            stale.append(cache)  # measured with other settings or code: kept aside
        todo.append((label, (path, cache, key)))
    moved = move_aside(stale, stale_dir)
    if moved:
        print(f"measure: moved {len(moved)} stale cache entries to {moved[0][1].parent}")
    if todo:
        _run_measure_tasks(
            todo,
            measurements,
            queries,
            num_draws,
            seed,
            (trajectories, labels),
            batch_size,
            workers=workers,
            folder=Path(folder) if folder else cache_dir.parent / f".{cache_dir.name}.jobs",
            progress=progress,
        )
        for label, (_, cache, key) in todo:
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") != key:
                raise RuntimeError(f"measure: {cache} was written with another key")
            results[label] = saved["values"]
    out = MeasuredModels({label: results[label] for label in models})
    out.measured = tuple(label for label, _ in todo)
    return out


def _run_measure_tasks(
    todo: list,
    measurements: Mapping[str, Measurement],
    queries: Tensor,
    num_draws: Mapping[str, int],
    seed: int,
    trajectories_and_labels: tuple[Tensor | None, Tensor | None],
    batch_size: int,
    *,
    workers: int | None,
    folder: Path,
    progress: bool,
) -> None:
    executor = os.environ.get("DA_EXECUTOR", "local")
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if workers == 1 and executor != "slurm":
        executor = "inline"
    per = int(os.environ.get("DA_MODELS_PER_TASK", "0")) or (
        1 if executor == "slurm" else math.ceil(len(todo) / (2 * workers))
    )
    folder.mkdir(parents=True, exist_ok=True)
    trajectories, labels = trajectories_and_labels
    if labels is None:
        inputs = folder / f"inputs_{fingerprint(queries, trajectories)}.pt"
    else:
        inputs = folder / f"inputs_{fingerprint(queries, trajectories, labels)}.pt"
    if not inputs.exists():
        saved = {"queries": queries, "trajectories": trajectories}
        atomic_save(saved if labels is None else {**saved, "labels": labels}, inputs)
    tasks = []
    for i in range(0, len(todo), per):
        group = todo[i : i + per]
        models = tuple((label, str(p), str(c), k) for label, (p, c, k) in group)
        tasks.append(
            MeasureTask(
                name=f"measure_{group[0][0]}"
                + (f"_and_{len(group) - 1}" if len(group) > 1 else ""),
                output=models[-1][2],
                models=models,
                inputs=str(inputs),
                measurements=dict(measurements),
                num_draws=dict(num_draws),
                seed=seed,
                batch_size=batch_size,
                threads=torch.get_num_threads() if executor == "inline" else 1,
            )
        )
    run_tasks(
        run_measure_task,
        tasks,
        name="measure",
        executor=executor,
        max_parallel=workers,
        folder=str(folder / "submitit"),
        progress=progress,
    )


def stack(
    results: Mapping[str, Mapping[str, Tensor]], labels: Sequence[Sequence[str]]
) -> dict[str, Tensor]:
    """``{name: (Q, M, K)}`` from per-model results, ``labels[i][k]`` naming the model of subset
    i and seed k (the layout :func:`~diffusion_attribution.evaluation.lds.lds` takes)."""
    names = list(results[labels[0][0]])
    return {
        n: torch.stack([torch.stack([results[lab][n] for lab in row], -1) for row in labels], 1)
        for n in names
    }
