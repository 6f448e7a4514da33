"""One fan-out for every per-model / per-shard task: inline, local subprocesses or a SLURM
job array, through `submitit`_.

:func:`run_tasks` ``(fn, tasks, name=..., folder=...)`` calls ``fn(task)`` for every task whose
output does not exist yet and returns the outputs in task order.

- ``fn`` is a module-level function (pickled by reference for the local and SLURM executors).
- A task is a small picklable frozen dataclass with ``.name`` (a label for messages) and
  ``.output`` (a path). A task is *finished* iff ``.output`` exists, so ``fn`` must write it
  atomically and last; a task whose output exists is never submitted, and one that was
  interrupted is simply run again (``fn`` resumes from checkpoints of its own if it has any,
  as :func:`~diffusion_attribution.evaluation.retraining.run_job` does).
- Failures: a failed task is reported when it fails (its name, output, submitit log and the
  last lines of that log); the other tasks finish (``on_failure="finish"``, default) or are
  cancelled (``on_failure="cancel"``); then one :class:`TasksFailed` lists every failed task.
- Progress (``progress=True``): a plain line, e.g. ``retrain: 12/48 done, 2 running, ETA
  3m10s``, when something changed and 5 s passed since the last one, and at least once a
  minute.

Executors (:mod:`~diffusion_attribution.core.executors`, :mod:`~diffusion_attribution.core.slurm`):

- ``inline``: a loop in this process.
- ``local`` (default): submitit's LocalExecutor, one subprocess per task, at most
  ``max_parallel`` at once (submitit has no cap of its own). The subprocesses exit as soon as
  this process is gone (:func:`~diffusion_attribution.core.executors.exit_with_owner`), so a
  killed driver leaves no orphan beside a rerun. With ``DA_DEVICE=cuda...`` tasks are spread
  round-robin over the visible GPUs.
- ``slurm``: submitit job arrays (one per 1000 tasks), ``#SBATCH --requeue``, at most
  ``array_parallelism`` tasks running at once. The job ids are recorded atomically in
  ``<folder>/<name>/submitted.json`` (keyed by output). A rerun after the driver died (or was
  interrupted: Ctrl-C leaves SLURM tasks running) re-attaches to the recorded tasks still
  pending or running (``squeue``, which works without accounting) and submits only the rest;
  finished tasks are skipped by their outputs. A task that leaves the queue without a result
  (cancelled, node failure, out of memory) is reported as failed after a grace period of
  ``lost_after_s``. Preemption and requeue: SLURM sends SIGTERM and later runs the same batch
  script again; a task exits at once on SIGTERM without writing a result, and its rerun
  resumes (``fn`` from its own checkpoint, otherwise from the start). Before its time limit
  (``--signal=USR2@90``) a task asks submitit to requeue it
  (:meth:`~diffusion_attribution.core.executors.TaskCall.checkpoint` resubmits the same call;
  at most 3 time-outs). Two drivers on the same ``<folder>/<name>`` at once are not supported;
  a driver killed between ``sbatch`` and the record may leave a task that a rerun submits
  again (both runs write the same output atomically).

Execution settings are never in ``params.yaml`` (moving to a cluster must not invalidate DVC
results). Environment variables:

- ``DA_EXECUTOR``: ``local`` (default), ``slurm`` or ``inline``.
- ``DA_MAX_PARALLEL``: tasks running at once (local: default ``os.cpu_count()``; SLURM: the
  array parallelism, default the cluster file's ``array_parallelism``, else submitit's 256).
- ``DA_DEVICE``: the torch device tasks use (read by the task functions; default ``cpu``).
- ``DA_SLURM_PARTITION``, ``DA_SLURM_TIME_MIN``, ``DA_SLURM_GPUS``: override the cluster
  file's ``partition``, ``time_min`` and ``gpus_per_task``.
- ``DA_CLUSTER``: path of a YAML cluster file (SLURM settings, read by
  :mod:`~diffusion_attribution.core.cluster`), for example::

      partition: gpu          # default: the cluster's default partition
      account: my-project
      qos: normal
      mem_gb: 16              # memory per task
      cpus_per_task: 4        # default 1
      gpus_per_task: 1        # default 0
      time_min: 240           # time limit per task, default 240
      array_parallelism: 64   # tasks running at once, default 256
      python: python          # how the nodes run Python; default this interpreter's path
      setup:                  # shell commands run before each task
        - module load cuda
        - source /shared/venv/bin/activate
      overrides:              # per ``name`` of run_tasks: the same keys (but overrides)
        retrain: {gpus_per_task: 1, time_min: 120}
        influence: {cpus_per_task: 8, mem_gb: 64}

  Precedence: defaults < file < ``overrides[name]`` < ``DA_SLURM_*`` variables <
  ``max_parallel`` argument / ``DA_MAX_PARALLEL``. The file is read and checked when
  :func:`run_tasks` starts, before anything runs: an unknown key or a value of the wrong type is
  one ``ValueError`` naming the key and what is allowed.

.. _submitit: https://github.com/facebookincubator/submitit
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffusion_attribution.core.cluster import slurm_settings
from diffusion_attribution.core.executors import TaskCall, run_inline, run_local
from diffusion_attribution.core.reporting import Failure, Progress
from diffusion_attribution.core.slurm import SlurmRun

EXECUTORS = ("local", "slurm", "inline")
ON_FAILURE = ("finish", "cancel")


class TasksFailed(RuntimeError):
    """Raised by :func:`run_tasks` after the run when tasks failed; ``.failures`` lists them."""

    def __init__(self, name: str, failures: Sequence[Failure], total: int, cancelled: int = 0):
        self.failures = list(failures)
        lines = [f"{name}: {len(failures)} of {total} tasks failed:"]
        lines += ["- " + f.describe() for f in failures]
        if cancelled:
            lines.append(f"{cancelled} other tasks were cancelled (on_failure='cancel')")
        lines.append("Finished tasks are kept; a rerun runs only the others.")
        super().__init__("\n".join(lines))


def run_tasks(
    fn: Callable[[Any], object],
    tasks: Sequence[Any],
    *,
    name: str,
    executor: str | None = None,
    max_parallel: int | None = None,
    folder: str | Path,
    progress: bool = True,
    on_failure: str = "finish",
    unit: str = "outputs",
    lost_after_s: float = 20.0,
) -> list[str]:
    """Run ``fn(task)`` for every task whose ``task.output`` does not exist; returns the
    outputs (``str``) in task order. Behaviour, executors and settings: module docstring.

    Args:
        fn: a module-level function writing ``task.output`` atomically, last.
        tasks: small picklable frozen dataclasses with ``.name`` and ``.output`` (distinct).
        name: what the tasks are (``"retrain"``, ``"influence"``): the label of progress
            lines, the key of ``overrides`` in the cluster file and the subfolder
            ``<folder>/<name>`` of submitit's files (pickles, logs, ``submitted.json``).
        executor: ``"inline"``, ``"local"`` or ``"slurm"``; default ``DA_EXECUTOR`` or
            ``"local"``.
        max_parallel: tasks running at once; default ``DA_MAX_PARALLEL``, else (local)
            ``os.cpu_count()`` or (SLURM) the cluster file's ``array_parallelism``.
        folder: where submitit's files go (``<folder>/<name>``).
        progress: print progress lines.
        on_failure: ``"finish"`` the other tasks, or ``"cancel"`` them, after a failure.
        unit: what the outputs are, for the line about existing ones ("2 of 8 models exist").
        lost_after_s: SLURM: how long a task may be out of the queue without a result before
            it counts as failed (a requeued task passes through states that look final).

    Raises:
        TasksFailed: (a ``RuntimeError``) after the run, listing every failed task.
        ValueError: bad arguments or settings (before anything runs).
    """
    tasks = list(tasks)
    for t in tasks:
        if not hasattr(t, "name") or not hasattr(t, "output"):
            raise TypeError(f"{name}: a task needs .name and .output, got {type(t).__name__}")
    outputs = [str(t.output) for t in tasks]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise ValueError(f"{name}: two tasks write the same output {dup}")
    executor = executor or os.environ.get("DA_EXECUTOR", "local")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    if max_parallel is None and os.environ.get("DA_MAX_PARALLEL"):
        try:
            max_parallel = int(os.environ["DA_MAX_PARALLEL"])
        except ValueError:
            raise ValueError(
                f"DA_MAX_PARALLEL must be int, got {os.environ['DA_MAX_PARALLEL']!r}"
            ) from None
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
    settings = slurm_settings(name)  # checks DA_CLUSTER whatever the executor
    if executor != "inline":
        try:
            pickle.dumps(fn)
        except Exception as err:
            raise TypeError(f"{name}: fn must be a module-level function ({err})") from None

    todo = [t for t in tasks if not Path(t.output).exists()]
    if len(todo) < len(tasks):
        print(f"{name}: {len(tasks) - len(todo)} of {len(tasks)} {unit} exist, skipping them")
    if not todo:
        return outputs
    prog = Progress(name, len(tasks), len(tasks) - len(todo), enabled=progress)
    prog.update(prog.done, 0)
    sub = Path(folder) / name
    if executor == "inline":
        failures, cancelled = run_inline(fn, todo, prog, on_failure)
    elif executor == "local":
        cap = max_parallel or os.cpu_count() or 1
        failures, cancelled = run_local(TaskCall(fn), todo, cap, sub, prog, on_failure)
    else:
        if max_parallel is not None:
            settings["array_parallelism"] = max_parallel
        failures, cancelled = SlurmRun(TaskCall(fn), name, sub, settings, lost_after_s).run(
            todo, prog, on_failure
        )
    if failures:
        err = TasksFailed(name, failures, len(tasks), cancelled)
        raise err from failures[0].exception
    return outputs
