"""The fan-out of retraining jobs: LDS subsets (App. G.4) and retraining without top
influences (App. G.6).

A :class:`RetrainJob` describes one model to train on a subset of a saved training set; it
holds only plain values, so the pickled job is small and portable. :func:`run_job` trains one
job (idempotent and resumable); :func:`run_jobs` runs many through `submitit`_.

Seeds ("shared seeds"). The k-th seed of every subset is the same number s_k (``retrain.seeds``,
disjoint from the full model's seed): a job's ``TrainConfig.seed`` is ``seed`` regardless of
``keep``. Seed s_k therefore fixes the
initialisation, the batch-order stream and the (t, eps) noise stream for every subset, so the
models of two subsets with the same seed differ because of the data they saw and (as little as
possible) because of training noise -- common random numbers in training. In a pilot this kept
the LDS ceiling at 0.71 where independent seeds per (subset, k) dropped it to 0.54, below a
method's score; shared seeds make a smaller number of subsets go further, and the evaluation
reports the LDS against independent seeds (one seed per subset) beside it. (The batch *order*
still differs between subsets, since it is a permutation of a different set; the generator
states are what is shared.)

Idempotence and resumption. A finished model (``job.output``) is never retrained. While a
job trains it checkpoints to ``<output>.<fingerprint>.ckpt`` (the fingerprint hashes the
configs, the subset's images and the training code, so a checkpoint is never resumed after any
of them changed); an interrupted job resumes from its last checkpoint and ends with the same
weights as an uninterrupted one. The checkpoint is removed once the model is saved.

Nothing finished is deleted: :func:`prune` moves the models and checkpoints of other settings
or code into a stale folder outside the DVC outputs
(:func:`~diffusion_attribution.identity.move_aside`), and models named by the fingerprints of
the legacy scheme are renamed by :func:`~diffusion_attribution.migrate.adopt_legacy_models`
instead of being retrained.

Execution settings are environment variables, never ``params.yaml`` (moving to a cluster must
not invalidate DVC results):

- ``DA_EXECUTOR``: ``local`` (default; submitit's local executor, one subprocess per job),
  ``slurm`` (a submitit job array) or ``inline`` (a plain loop in this process).
- ``DA_MAX_PARALLEL``: jobs running at once (default: ``os.cpu_count()``). Each job uses one
  torch thread, because several threaded jobs oversubscribe the cores badly.
- ``DA_DEVICE``: torch device the jobs train on (default ``cpu``), as for the pipeline stages.
  With the local executor and ``cuda``, jobs are spread round-robin over the visible GPUs.
- ``DA_SLURM_PARTITION`` (default: the cluster's default partition), ``DA_SLURM_TIME_MIN``
  (time limit per job in minutes, default 240) and ``DA_SLURM_GPUS`` (GPUs per job, default
  0): SLURM only.

.. _submitit: https://github.com/facebookincubator/submitit
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DiffusionConfig, ModelConfig, TrainConfig
from .data import ImageDataset
from .ddpm import NoiseSchedule
from .identity import code_digest, move_aside
from .identity import file_digest as file_digest
from .train import build_model, fingerprint, save_model, train_ddpm

EXECUTORS = ("local", "slurm", "inline")
# submitit's LocalExecutor kills a job after ``timeout_min`` (default: 2 minutes!).
_LOCAL_TIMEOUT_MIN = 7 * 24 * 60


@dataclass(frozen=True)
class RetrainJob:
    """One model to retrain.

    Attributes:
        name: label for progress and error messages, e.g. ``"subset_007_seed1"``.
        data_path: an :class:`~diffusion_attribution.data.ImageDataset` file.
        keep: ids (indices into that file) of the training examples kept.
        seed: the training seed k. Shared across subsets ("shared seeds", see the module
            docstring): it becomes ``TrainConfig.seed`` whatever ``keep`` is, overriding the
            ``seed`` in ``train``.
        model, diffusion, train: :class:`ModelConfig`, :class:`DiffusionConfig` and
            :class:`TrainConfig` as plain dicts (``cfg.model_dump(mode="json")``).
        output: path of the model file written by :func:`~diffusion_attribution.train.save_model`.
    """

    name: str
    data_path: str
    keep: tuple[int, ...]
    seed: int
    model: dict
    diffusion: dict
    train: dict
    output: str


def _configs(job: RetrainJob) -> tuple[ModelConfig, DiffusionConfig, TrainConfig]:
    train = TrainConfig(**{**job.train, "seed": job.seed})
    return ModelConfig(**job.model), DiffusionConfig(**job.diffusion), train


def _checkpoint_path(output: Path, *parts: object) -> Path:
    return output.with_name(f"{output.name}.{fingerprint(*parts)}.ckpt")


def _remove_checkpoints(output: Path, keep: Path | None = None) -> None:
    for ckpt in output.parent.glob(f"{output.name}.*.ckpt"):
        if ckpt != keep:
            ckpt.unlink(missing_ok=True)


def checkpoint_path(job: RetrainJob) -> Path:
    """Where :func:`run_job` checkpoints ``job`` while it trains (and resumes from)."""
    data = ImageDataset.load(job.data_path).subset(list(job.keep))
    return _checkpoint_path(Path(job.output), *_configs(job), data.images)


def _job_functions() -> tuple:
    """The code that turns a job into a model besides the modules ``train``, ``ddpm`` and
    ``unet`` (which :func:`~diffusion_attribution.train.fingerprint` covers): how a job's
    configs and seed are made, how it trains, and how its subset is cut (batch order)."""
    return (_configs, run_job, ImageDataset.subset)


@functools.cache
def _job_code() -> str:
    """:func:`~diffusion_attribution.identity.code_digest` of :func:`_job_functions` (once
    per process): docstrings and comments do not count."""
    return code_digest(*_job_functions())


def make_job(
    name: str,
    data_path: str | Path,
    keep: Sequence[int],
    seed: int,
    model: ModelConfig,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    out_dir: str | Path,
    data_digest: str | None = None,
) -> RetrainJob:
    """A job whose output file name carries a fingerprint of everything that defines the model
    (the training set's content, configs, kept ids, seed, the training code and
    :func:`_job_functions`, the code without docstrings and comments):
    ``<out_dir>/<name>-<fingerprint>.pt``. ``data_digest`` (:func:`file_digest` of
    ``data_path``, computed here when not given) lets many jobs share one hash of the data.

    A model left in ``out_dir`` by other settings or code therefore never passes for this
    one, so ``out_dir`` can persist across runs (DVC ``persist: true``) and a rerun after an
    interrupt skips exactly the finished models; :func:`prune` moves the stale ones aside.
    What the name covers and what it does not: :mod:`diffusion_attribution.identity`.
    """
    keep = tuple(int(i) for i in keep)
    digest = data_digest or file_digest(data_path)
    fp = fingerprint(digest, _job_code(), model, diffusion, train, keep, int(seed))
    return RetrainJob(
        name=name,
        data_path=str(data_path),
        keep=keep,
        seed=int(seed),
        model=model.model_dump(mode="json"),
        diffusion=diffusion.model_dump(mode="json"),
        train=train.model_dump(mode="json"),
        output=str(Path(out_dir) / f"{name}-{fp}.pt"),
    )


def subset_jobs(
    data_path: str | Path,
    masks: torch.Tensor,
    seeds: Sequence[int],
    model: ModelConfig,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    out_dir: str | Path,
    *,
    shared: bool = True,
) -> list[list[RetrainJob]]:
    """``jobs[i][k]``: the model of subset i (``masks[i]``, True = kept) with training seed
    ``seeds[k]`` (App. G.4). ``shared=True``: every subset's k-th model has seed ``seeds[k]``
    (shared seeds: module docstring). ``shared=False``: one model per subset, subset i with
    the seed ``seeds[i]`` of its own (``len(seeds) == len(masks)``), the independent-seed
    design."""
    digest = file_digest(data_path)
    if not shared and len(seeds) != len(masks):
        raise ValueError(f"independent seeds: {len(seeds)} seeds for {len(masks)} subsets")

    def job(i: int, mask: torch.Tensor, seed: int, tag: str) -> RetrainJob:
        keep = torch.nonzero(mask).flatten().tolist()
        return make_job(
            f"subset{i:03d}_{tag}{seed}", data_path, keep, seed, model, diffusion, train,
            out_dir, digest,
        )  # fmt: skip

    if not shared:
        return [[job(i, mask, seeds[i], "indep")] for i, mask in enumerate(masks)]
    return [[job(i, mask, s, "seed") for s in seeds] for i, mask in enumerate(masks)]


def reference_jobs(
    data_path: str | Path,
    num_train: int,
    seeds: Sequence[int],
    steps: int,
    model: ModelConfig,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    out_dir: str | Path,
) -> list[RetrainJob]:
    """``jobs[k]``: a model on the *full* training set with training seed ``seeds[k]`` for
    ``steps`` steps.

    The reference a subset model's measurement is compared with (Figs. 13-15): with ``steps``
    = subset steps / fraction it has seen each example as often as a subset model has seen each
    of its own (the paper's epoch-matched design, App. G.5) and shares its seed, so m(subset
    model) - m(reference) reflects the removed data, not shorter training or another seed."""
    digest = file_digest(data_path)
    ref_train = train.model_copy(update={"steps": int(steps)})
    return [
        make_job(
            f"reference_seed{s}",
            data_path,
            range(num_train),
            s,
            model,
            diffusion,
            ref_train,
            out_dir,
            digest,
        )
        for s in seeds
    ]


def prune(
    out_dir: str | Path, jobs: Sequence[RetrainJob], *, stale_dir: str | Path
) -> list[tuple[Path, Path]]:
    """Move the model files and checkpoints in ``out_dir`` that belong to none of ``jobs``
    (left by runs with other settings or code) into ``stale_dir/<UTC timestamp>/``; returns
    the ``(from, to)`` pairs. Nothing is deleted; ``stale_dir`` (required, so that no caller
    loses a model by accident) should lie outside the DVC outputs, e.g.
    ``.cache/stale/retrain``. Run :func:`~diffusion_attribution.migrate.adopt_legacy_models`
    first, or models of the older naming scheme are moved aside and retrained."""
    wanted = {Path(j.output).name for j in jobs}
    stale = [
        f
        for f in sorted(Path(out_dir).glob("*.pt*"))
        if f.name.split(".pt", 1)[0] + ".pt" not in wanted
    ]
    return move_aside(stale, stale_dir)


#: Environment variable through which :func:`run_jobs` tells local jobs its process id.
OWNER_ENV = "DA_RETRAIN_OWNER"


def exit_with_owner(poll_s: float = 0.5) -> None:
    """End this process as soon as the process named by ``DA_RETRAIN_OWNER`` is gone.

    A local job is started by a submitit controller that is meant to outlive the process that
    submitted it. If :func:`run_jobs` is killed (for the pipeline: the notebook's kernel, which
    runs in a session of its own), its jobs would otherwise train on as orphans beside a rerun.
    A daemon thread polls the owner's pid; checkpoints are written atomically, so exiting at any
    point loses at most the steps since the last checkpoint. No-op without the variable.
    """
    import threading

    owner = os.environ.get(OWNER_ENV)
    if not owner:
        return
    pid = int(owner)

    def alive() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
        except OSError:  # no /proc: ask the kernel
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def run_job(job: RetrainJob) -> str:
    """Train ``job`` and save its EMA model to ``job.output``; returns ``job.output``.

    Returns at once when ``job.output`` exists. Trains with one torch thread (several jobs run
    at once), on ``DA_DEVICE`` (default ``cpu``), checkpointing so that an interrupted job
    resumes where it stopped.
    """
    output = Path(job.output)
    if output.exists():
        _remove_checkpoints(output)  # one left by a kill between saving and cleaning up
        return job.output
    exit_with_owner()
    model_cfg, diff_cfg, train_cfg = _configs(job)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = ImageDataset.load(job.data_path).subset(list(job.keep))
        image_shape = tuple(data.images.shape[1:])
        schedule = NoiseSchedule.linear(
            diff_cfg.num_timesteps, diff_cfg.beta_start, diff_cfg.beta_end
        )
        ckpt = _checkpoint_path(output, model_cfg, diff_cfg, train_cfg, data.images)
        # one left by a run with other settings or code is never resumed
        _remove_checkpoints(output, keep=ckpt)
        result = train_ddpm(
            lambda: build_model(model_cfg, image_shape),
            data.images,
            schedule,
            train_cfg,
            checkpoint_path=ckpt,
            device=os.environ.get("DA_DEVICE", "cpu"),
            progress=False,
            desc=job.name,
        )
        save_model(output, result.ema_model.cpu(), model_cfg, image_shape)
        ckpt.unlink(missing_ok=True)
    finally:
        torch.set_num_threads(threads)
    return job.output


def _failure(job: RetrainJob, log: object | None, err: BaseException) -> RuntimeError:
    where = f"; see its submitit log {log}" if log is not None else ""
    return RuntimeError(f"retraining job {job.name!r} ({job.output}) failed{where}: {err}")


def run_jobs(
    jobs: Sequence[RetrainJob],
    *,
    executor: str | None = None,
    max_parallel: int | None = None,
    folder: str = ".cache/submitit",
    progress: bool = True,
) -> list[str]:
    """Run every job whose output does not exist yet; returns the outputs in job order.

    Args:
        jobs: the jobs; their outputs must be distinct.
        executor: ``"local"``, ``"slurm"`` or ``"inline"``; default ``DA_EXECUTOR`` or
            ``"local"``.
        max_parallel: jobs running at once (the SLURM array parallelism); default
            ``DA_MAX_PARALLEL`` or ``os.cpu_count()``.
        folder: submitit's folder for pickled jobs, results and per-job logs.
        progress: show a progress bar over finished jobs.

    Raises:
        RuntimeError: a job failed; the message names it and its submitit log.
    """
    from tqdm.auto import tqdm

    jobs = list(jobs)
    outputs = [j.output for j in jobs]
    if len(set(outputs)) != len(outputs):
        raise ValueError("two retraining jobs write the same output file")
    executor = executor or os.environ.get("DA_EXECUTOR", "local")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if max_parallel is None:
        max_parallel = int(os.environ.get("DA_MAX_PARALLEL", "0")) or os.cpu_count() or 1
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")

    todo = [j for j in jobs if not Path(j.output).exists()]
    for j in jobs:
        if Path(j.output).exists():
            _remove_checkpoints(Path(j.output))
    if len(todo) < len(jobs):
        print(f"retrain: {len(jobs) - len(todo)} of {len(jobs)} models exist, skipping them")
    if not todo:
        return outputs
    bar = tqdm(total=len(todo), desc=f"retraining ({executor})", disable=not progress)
    try:
        if executor == "inline":
            for job in todo:
                try:
                    run_job(job)
                except Exception as err:
                    raise _failure(job, None, err) from err
                bar.update(1)
        elif executor == "local":
            _run_local(todo, max_parallel, folder, bar)
        else:
            _run_slurm(todo, max_parallel, folder, bar)
    finally:
        bar.close()
    return outputs


def _wait(pairs: list, bar: object) -> None:
    """Poll submitted (job, submitit job) pairs until all are done, raising on a failure."""
    while pairs:
        for pair in [p for p in pairs if p[1].done()]:
            _result(*pair)
            pairs.remove(pair)
            bar.update(1)
        time.sleep(0.2)


def _result(job: RetrainJob, sjob: object) -> None:
    try:
        sjob.result()
    except Exception as err:
        raise _failure(job, sjob.paths.stderr, err) from err


def _run_local(todo: list[RetrainJob], max_parallel: int, folder: str, bar: object) -> None:
    """submitit's LocalExecutor has no concurrency cap: submit a job only when one finished."""
    import submitit

    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN)
    # Jobs inherit this environment: they exit when this process is gone (exit_with_owner).
    previous = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())
    # The local executor sets CUDA_VISIBLE_DEVICES to its own GPU list (empty by default).
    gpus = torch.cuda.device_count() if os.environ.get("DA_DEVICE", "cpu").startswith("cuda") else 0
    pending, running, n = deque(todo), [], 0
    try:
        while pending or running:
            while pending and len(running) < max_parallel:
                if gpus:
                    ex.update_parameters(gpus_per_node=1, visible_gpus=(n % gpus,))
                job = pending.popleft()
                running.append((job, ex.submit(run_job, job)))
                n += 1
            done = [p for p in running if p[1].done()]
            for pair in done:
                running.remove(pair)
                _result(*pair)
                bar.update(1)
            if not done:
                time.sleep(0.2)
    except BaseException:
        # Ctrl-C or a failed job: stop the others (their checkpoints let a rerun resume).
        for _, sjob in running:
            sjob.cancel(check=False)
        raise
    finally:
        if previous is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = previous


def _run_slurm(todo: list[RetrainJob], max_parallel: int, folder: str, bar: object) -> None:
    """One SLURM job array, at most ``max_parallel`` tasks running at once."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict = {
        "timeout_min": int(os.environ.get("DA_SLURM_TIME_MIN", "240")),
        "gpus_per_node": int(os.environ.get("DA_SLURM_GPUS", "0")),
        "cpus_per_task": 1,
        "slurm_array_parallelism": max_parallel,
        "name": "da_retrain",
    }
    if os.environ.get("DA_SLURM_PARTITION"):
        params["slurm_partition"] = os.environ["DA_SLURM_PARTITION"]
    ex.update_parameters(**params)
    sjobs = ex.map_array(run_job, todo)
    _wait(list(zip(todo, sjobs, strict=True)), bar)
