"""The fan-out of retraining jobs: LDS subsets (App. G.4) and retraining without top
influences (App. G.6).

A :class:`RetrainJob` describes one model to train on a subset of a saved training set; it
holds only plain values, so the pickled job is small and portable. :func:`run_job` trains one
job (idempotent and resumable); :func:`run_jobs` runs many through
:func:`~diffusion_attribution.core.jobs.run_tasks` (`submitit`_).

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
(:func:`~diffusion_attribution.core.identity.move_aside`).

Execution settings are environment variables and an optional cluster file, never
``params.yaml`` (moving to a cluster must not invalidate DVC results): ``DA_EXECUTOR``
(``local`` by default, ``slurm``, ``inline``), ``DA_MAX_PARALLEL``, ``DA_DEVICE`` (the torch
device jobs train on, default ``cpu``), ``DA_SLURM_*`` and ``DA_CLUSTER``; see
:mod:`diffusion_attribution.core.jobs`, which runs the jobs (tasks named ``retrain``). Each job
trains with one torch thread, because several threaded jobs oversubscribe the cores badly.
Under SLURM a job is requeueable: after a preemption or ``scontrol requeue`` it resumes from
its checkpoint.

.. _submitit: https://github.com/facebookincubator/submitit
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_attribution.core.executors import exit_with_owner
from diffusion_attribution.core.identity import code_digest, file_digest, move_aside
from diffusion_attribution.core.jobs import run_tasks
from diffusion_attribution.core.sections import DiffusionConfig, ModelConfig, TrainConfig
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.training import (
    build_model,
    fingerprint,
    save_model,
    train_stack,
)


@dataclass(frozen=True)
class RetrainJob:
    """One model to retrain.

    Attributes:
        name: label for progress and error messages, e.g. ``"subset_007_seed1"``.
        data_path: an :class:`~diffusion_attribution.diffusion.datasets.ImageDataset` file.
        keep: ids (indices into that file) of the training examples kept.
        seed: the training seed k. Shared across subsets ("shared seeds", see the module
            docstring): it becomes ``TrainConfig.seed`` whatever ``keep`` is, overriding the
            ``seed`` in ``train``.
        model, diffusion, train: :class:`ModelConfig`, :class:`DiffusionConfig` and
            :class:`TrainConfig` as plain dicts (``cfg.model_dump(mode="json")``).
        output: path of the model file written by :func:`~diffusion_attribution.diffusion.training.save_model`.
        stack: how many models are trained together with this one in one batched computation
            (:func:`~diffusion_attribution.diffusion.training.train_stack`, planned by
            :func:`stack_jobs`). It is part of the model's identity: a model's bits depend on
            the stack size (the grouped convolutions' kernels do), not on its partners or its
            place in the stack.
        lora: ``None``, or LoRA fine-tuning of a base model instead of training from scratch
            (:func:`~diffusion_attribution.evaluation.lora_retraining.lora_spec`: the base
            model's file and digest, rank, scale and code digest); trained by
            :func:`~diffusion_attribution.evaluation.lora_retraining.run_lora_stack`.
        conditional: ``None``, or a class-conditional model instead
            (:func:`~diffusion_attribution.evaluation.conditional_retraining.conditional_spec`).
    """

    name: str
    data_path: str
    keep: tuple[int, ...]
    seed: int
    model: dict
    diffusion: dict
    train: dict
    output: str
    stack: int = 1
    lora: dict | None = None
    conditional: dict | None = None


@dataclass(frozen=True)
class RetrainStack:
    """Jobs trained together (:func:`stack_jobs`); the task :func:`run_jobs` fans out. Its
    ``output`` -- the file whose existence means the task is done -- is the last job's whose
    model does not exist yet (the last job's when all do): :func:`run_stack` writes the missing
    models in order, so that one last. A stack whose last model exists but another does not
    (a member renamed, e.g. a method's damping changed) is therefore trained again."""

    jobs: tuple[RetrainJob, ...]

    @property
    def name(self) -> str:
        first, last = self.jobs[0].name, self.jobs[-1].name
        return first if len(self.jobs) == 1 else f"{first}..{last}"

    @property
    def output(self) -> str:
        missing = [job.output for job in self.jobs if not Path(job.output).exists()]
        return missing[-1] if missing else self.jobs[-1].output


def _configs(job: RetrainJob) -> tuple[ModelConfig, DiffusionConfig, TrainConfig]:
    train = TrainConfig(**{**job.train, "seed": job.seed})
    return ModelConfig(**job.model), DiffusionConfig(**job.diffusion), train


def _checkpoint_path(output: Path, *parts: object) -> Path:
    return output.with_name(f"{output.name}.{fingerprint(*parts)}.ckpt")


def _remove_checkpoints(output: Path, keep: Path | None = None) -> None:
    for ckpt in output.parent.glob(f"{output.name}.*.ckpt"):
        if ckpt != keep:
            ckpt.unlink(missing_ok=True)


def _images(job: RetrainJob) -> torch.Tensor:
    return ImageDataset.load(job.data_path).subset(list(job.keep)).images


#: What another kind of job runner (LoRA's,
#: :func:`~diffusion_attribution.evaluation.lora_retraining.run_lora_stack`) shares with
#: :func:`run_stack`: a job's configs and subset, its checkpoint's name, the clean-up.
job_configs, job_images, job_checkpoint, remove_checkpoints = (
    _configs, _images, _checkpoint_path, _remove_checkpoints,
)  # fmt: skip


def _stack_checkpoint(
    stack: RetrainStack, configs: Sequence[tuple], images: Sequence[torch.Tensor]
) -> Path:
    parts = [p for config, x in zip(configs, images, strict=True) for p in (*config, x)]
    return _checkpoint_path(Path(stack.jobs[-1].output), *parts)  # beside the last model


def checkpoint_path(job: RetrainJob | RetrainStack) -> Path:
    """Where :func:`run_stack` checkpoints a stack (or a lone job) while it trains (and
    resumes from): beside its last model, named after every member's data and configs."""
    stack = job if isinstance(job, RetrainStack) else RetrainStack((job,))
    members = stack.jobs
    return _stack_checkpoint(stack, [_configs(m) for m in members], [_images(m) for m in members])


def _job_functions() -> tuple:
    """The code that turns a job into a model besides the modules ``training``, ``ddpm``,
    ``stacked`` and ``unet`` (which :func:`~diffusion_attribution.diffusion.training.fingerprint`
    covers): how a job's configs and seed are made, how its stack trains, and how its subset
    is cut (batch order)."""
    return (_configs, run_stack, ImageDataset.subset)


@functools.cache
def _job_code() -> str:
    """:func:`~diffusion_attribution.core.identity.code_digest` of :func:`_job_functions` (once
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
    stack: int = 1,
    lora: dict | None = None,
    conditional: dict | None = None,
) -> RetrainJob:
    """A job whose output file name carries a fingerprint of everything that defines the model
    (the training set's content, configs, kept ids, seed, the training code and
    :func:`_job_functions`, the code without docstrings and comments):
    ``<out_dir>/<name>-<fingerprint>.pt``. ``data_digest`` (:func:`file_digest` of
    ``data_path``, computed here when not given) lets many jobs share one hash of the data.

    A model left in ``out_dir`` by other settings or code therefore never passes for this
    one, so ``out_dir`` can persist across runs (DVC ``persist: true``) and a rerun after an
    interrupt skips exactly the finished models; :func:`prune` moves the stale ones aside.
    What the name covers and what it does not: :mod:`diffusion_attribution.core.identity`.
    """
    keep = tuple(int(i) for i in keep)
    digest = data_digest or file_digest(data_path)
    parts = (digest, _job_code(), model, diffusion, train, keep, int(seed))
    # a LoRA job is named by its base's content, not where the file lies
    tuned = tuple(sorted((k, v) for k, v in (lora or {}).items() if k != "base"))
    # the same arguments as before the conditional recipe existed: no model is renamed
    extra = ("stack", int(stack)) if stack != 1 else ()
    extra += ("lora", tuned) if lora else ()
    extra += ("conditional", tuple(sorted(conditional.items()))) if conditional else ()
    fp = fingerprint(*parts, *extra)
    return RetrainJob(
        name=name,
        data_path=str(data_path),
        keep=keep,
        seed=int(seed),
        model=model.model_dump(mode="json"),
        diffusion=diffusion.model_dump(mode="json"),
        train=train.model_dump(mode="json"),
        output=str(Path(out_dir) / f"{name}-{fp}.pt"),
        stack=int(stack),
        lora=lora,
        conditional=conditional,
    )


def _stack_key(job: RetrainJob) -> str:
    """Jobs with one key can share a stack: the same data file, model, diffusion and training
    settings but the seed, and the same batch size."""
    train = {k: v for k, v in job.train.items() if k != "seed"}
    batch = min(int(job.train["batch_size"]), len(job.keep))
    recipe = (job.lora, job.conditional)
    return repr((job.data_path, job.model, job.diffusion, sorted(train.items()), batch, recipe))


def stack_jobs(jobs: Sequence[RetrainJob], max_size: int) -> list[RetrainJob]:
    """``jobs``, in their order, re-made as members of stacks of at most ``max_size`` models.

    Jobs that can share a stack (:func:`_stack_key`) are taken in order in chunks of
    ``max_size`` (the last chunk of a group may be smaller); each job is re-made with
    ``stack`` = its chunk's size, which renames its output (the stack size is part of a
    model's identity, :class:`RetrainJob`). :func:`run_jobs` forms the same stacks again from
    the returned list. ``max_size = 1`` trains every model alone, as LoRA jobs always are.
    """
    if max_size < 1:
        raise ValueError(f"stack_jobs: max_size must be >= 1, got {max_size}")
    sizes: dict[int, int] = {}
    for group in _groups(jobs, lambda ms: 1 if ms[0].lora or ms[0].conditional else max_size):
        sizes.update({id(job): len(group) for job in group})
    digests: dict[str, str] = {}
    remade = []
    for job in jobs:
        digest = digests.setdefault(job.data_path, file_digest(job.data_path))
        remade.append(
            make_job(
                job.name,
                job.data_path,
                job.keep,
                job.seed,
                ModelConfig(**job.model),
                DiffusionConfig(**job.diffusion),
                TrainConfig(**job.train),
                Path(job.output).parent,
                digest,
                stack=sizes[id(job)],
                lora=job.lora,
                conditional=job.conditional,
            )  # fmt: skip
        )
    return remade


def _groups(jobs: Sequence[RetrainJob], size_of) -> list[list[RetrainJob]]:
    """Jobs of one :func:`_stack_key`, in order, cut into consecutive chunks of
    ``size_of(remaining members)`` jobs."""
    by_key: dict[str, list[RetrainJob]] = {}
    for job in jobs:
        by_key.setdefault(_stack_key(job), []).append(job)
    groups = []
    for members in by_key.values():
        while members:
            n = size_of(members)
            groups.append(members[:n])
            members = members[n:]
    return groups


def _stacks(jobs: Sequence[RetrainJob]) -> list[RetrainStack]:
    """The stacks :func:`stack_jobs` planned, formed again from its jobs."""
    stacks = [RetrainStack(tuple(g)) for g in _groups(jobs, lambda members: members[0].stack)]
    for stack in stacks:
        if any(job.stack != len(stack.jobs) for job in stack.jobs):
            names = ", ".join(job.name for job in stack.jobs)
            raise ValueError(
                f"run_jobs: jobs {names} were planned for stacks of other sizes; pass the "
                "list stack_jobs returned, whole and in its order"
            )
    return stacks


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
    lora: dict | None = None,
    conditional: dict | None = None,
) -> list[list[RetrainJob]]:
    """``jobs[i][k]``: the model of subset i (``masks[i]``, True = kept) with training seed
    ``seeds[k]`` (App. G.4). ``shared=True``: every subset's k-th model has seed ``seeds[k]``
    (shared seeds: module docstring). ``shared=False``: one model per subset, subset i with
    the seed ``seeds[i]`` of its own (``len(seeds) == len(masks)``), the independent-seed
    design. ``lora``, ``conditional``: LoRA fine-tuning or a conditional model
    (:class:`RetrainJob`)."""
    digest = file_digest(data_path)
    if not shared and len(seeds) != len(masks):
        raise ValueError(f"independent seeds: {len(seeds)} seeds for {len(masks)} subsets")

    def job(i: int, mask: torch.Tensor, seed: int, tag: str) -> RetrainJob:
        keep = torch.nonzero(mask).flatten().tolist()
        return make_job(
            f"subset{i:03d}_{tag}{seed}", data_path, keep, seed, model, diffusion, train,
            out_dir, digest, lora=lora, conditional=conditional,
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
    lora: dict | None = None,
    conditional: dict | None = None,
) -> list[RetrainJob]:
    """``jobs[k]``: a model on the *full* training set with training seed ``seeds[k]`` for
    ``steps`` steps.

    The reference a subset model's measurement is compared with (Figs. 13-15): with ``steps``
    = subset steps / fraction it has seen each example as often as a subset model has seen each
    of its own (the paper's epoch-matched design, App. G.5) and shares its seed, so m(subset
    model) - m(reference) reflects the removed data, not shorter training or another seed."""
    digest = file_digest(data_path)
    ref_train = train.model_copy(update={"steps": int(steps)})
    common, kw = (model, diffusion, ref_train, out_dir, digest), {"lora": lora}
    kw["conditional"] = conditional
    everything = range(num_train)
    return [make_job(f"reference_seed{s}", data_path, everything, s, *common, **kw) for s in seeds]


def prune(
    out_dir: str | Path, jobs: Sequence[RetrainJob], *, stale_dir: str | Path
) -> list[tuple[Path, Path]]:
    """Move the model files and checkpoints in ``out_dir`` that belong to none of ``jobs``
    (left by runs with other settings or code) into ``stale_dir/<UTC timestamp>/``; returns
    the ``(from, to)`` pairs. Nothing is deleted; ``stale_dir`` (required, so that no caller
    loses a model by accident) should lie outside the DVC outputs, e.g.
    ``.cache/stale/retrain``."""
    wanted = {Path(j.output).name for j in jobs}
    stale = [
        f
        for f in sorted(Path(out_dir).glob("*.pt*"))
        if f.name.split(".pt", 1)[0] + ".pt" not in wanted
    ]
    return move_aside(stale, stale_dir)


def run_job(job: RetrainJob) -> str:
    """Train ``job`` (a stack of one) and save its EMA model to ``job.output``; returns
    ``job.output``. :func:`run_stack`."""
    return run_stack(RetrainStack((job,)))


def run_stack(stack: RetrainStack) -> str:
    """Train the jobs of ``stack`` together and save each EMA model to its ``output``;
    returns ``stack.output`` (the last job's, saved last).

    Returns at once when every output exists. Trains with one torch thread (several stacks
    run at once), on ``DA_DEVICE`` (default ``cpu``), checkpointing so that an interrupted
    stack resumes where it stopped; outputs that exist are not written again.
    """
    outputs = [Path(job.output) for job in stack.jobs]
    if all(out.exists() for out in outputs):
        _remove_checkpoints(outputs[-1])  # one left by a kill between saving and cleaning up
        return stack.output
    exit_with_owner()
    configs = [_configs(job) for job in stack.jobs]
    model_cfg, diff_cfg = configs[0][0], configs[0][1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = [_images(job) for job in stack.jobs]
        image_shape = tuple(images[0].shape[1:])
        schedule = NoiseSchedule.linear(
            diff_cfg.num_timesteps, diff_cfg.beta_start, diff_cfg.beta_end
        )
        ckpt = _stack_checkpoint(stack, configs, images)
        # one left by a run with other settings or code is never resumed
        _remove_checkpoints(outputs[-1], keep=ckpt)
        results = train_stack(
            lambda: build_model(model_cfg, image_shape),
            images,
            schedule,
            [config[2] for config in configs],
            checkpoint_path=ckpt,
            device=os.environ.get("DA_DEVICE", "cpu"),
            progress=False,
            desc=stack.name,
        )
        for out, result in zip(outputs, results, strict=False):
            if not out.exists():
                save_model(out, result.ema_model.cpu(), model_cfg, image_shape)
        ckpt.unlink(missing_ok=True)
    finally:
        torch.set_num_threads(threads)
    return stack.output


def run_jobs(
    jobs: Sequence[RetrainJob],
    *,
    executor: str | None = None,
    max_parallel: int | None = None,
    folder: str = ".cache/submitit",
    progress: bool = True,
    runner: Callable[[RetrainStack], str] | None = None,
) -> list[str]:
    """Run every job whose output does not exist yet; returns the outputs in job order.

    The jobs are trained in the stacks :func:`stack_jobs` planned (``stack`` 1: alone), one
    task per stack: :func:`~diffusion_attribution.core.jobs.run_tasks` of :func:`run_stack`
    under the name
    ``retrain``: executors, settings (environment variables, the ``DA_CLUSTER`` file),
    re-attaching to SLURM jobs after a crash and requeueing are described there. Checkpoints
    left beside finished models are removed first.

    Args:
        jobs: the jobs; their outputs must be distinct.
        executor: ``"local"``, ``"slurm"`` or ``"inline"``; default ``DA_EXECUTOR`` or
            ``"local"``.
        max_parallel: jobs running at once (the SLURM array parallelism); default
            ``DA_MAX_PARALLEL`` or ``os.cpu_count()``.
        folder: submitit's folder for pickled jobs, results and per-job logs
            (``<folder>/retrain``).
        progress: print progress lines (done / total, running, ETA).
        runner: what trains a stack (a module-level function, pickled by name): default
            :func:`run_stack`; LoRA jobs pass
            :func:`~diffusion_attribution.evaluation.lora_retraining.run_lora_stack`.

    Raises:
        RuntimeError: jobs failed (:class:`~diffusion_attribution.core.jobs.TasksFailed`); the
            message names each one and its submitit log; the other jobs finished.
    """
    jobs, runner = list(jobs), runner or run_stack
    # the longest stacks first, so that no worker is left alone with one at the end
    stacks = sorted(_stacks(jobs), key=lambda s: -len(s.jobs) * int(s.jobs[0].train["steps"]))
    for stack in stacks:
        if Path(stack.output).exists():
            _remove_checkpoints(Path(stack.output))
    run_tasks(
        runner,
        stacks,
        name="retrain",
        executor=executor,
        max_parallel=max_parallel,
        folder=folder,
        progress=progress,
        unit="stacks of models",
    )
    return [job.output for job in jobs]
