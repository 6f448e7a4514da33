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

Executors:

- ``inline``: a loop in this process.
- ``local`` (default): submitit's LocalExecutor, one subprocess per task, at most
  ``max_parallel`` at once (submitit has no cap of its own). The subprocesses exit as soon as
  this process is gone (:func:`exit_with_owner`), so a killed driver leaves no orphan beside a
  rerun. With ``DA_DEVICE=cuda...`` tasks are spread round-robin over the visible GPUs.
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
  (``--signal=USR2@90``) a task asks submitit to requeue it (``_Call.checkpoint`` resubmits
  the same call; at most 3 time-outs). Two drivers on the same ``<folder>/<name>`` at once are not
  supported; a driver killed between ``sbatch`` and the record may leave a task that a rerun
  submits again (both runs write the same output atomically).

Execution settings are never in ``params.yaml`` (moving to a cluster must not invalidate DVC
results). Environment variables:

- ``DA_EXECUTOR``: ``local`` (default), ``slurm`` or ``inline``.
- ``DA_MAX_PARALLEL``: tasks running at once (local: default ``os.cpu_count()``; SLURM: the
  array parallelism, default the cluster file's ``array_parallelism``, else submitit's 256).
- ``DA_DEVICE``: the torch device tasks use (read by the task functions; default ``cpu``).
- ``DA_SLURM_PARTITION``, ``DA_SLURM_TIME_MIN``, ``DA_SLURM_GPUS``: override the cluster
  file's ``partition``, ``time_min`` and ``gpus_per_task``.
- ``DA_CLUSTER``: path of a YAML cluster file (SLURM settings), for example::

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

import getpass
import json
import os
import pickle
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "slurm", "inline")
ON_FAILURE = ("finish", "cancel")
#: Environment variable through which :func:`run_tasks` tells local tasks its process id.
OWNER_ENV = "DA_RETRAIN_OWNER"
# submitit's LocalExecutor kills a job after ``timeout_min`` (default: 2 minutes!).
_LOCAL_TIMEOUT_MIN = 7 * 24 * 60
_ARRAY_MAX = 1000  # SLURM's default MaxArraySize is 1001
_TAIL_LINES = 12

#: Keys of a cluster file (``DA_CLUSTER``) and the types of their values.
CLUSTER_KEYS: dict[str, type | tuple[type, ...]] = {
    "partition": str,
    "account": str,
    "qos": str,
    "mem_gb": (int, float),
    "cpus_per_task": int,
    "gpus_per_task": int,
    "time_min": int,
    "array_parallelism": int,
    "python": str,
    "setup": list,
    "overrides": dict,
}
_NOT_NEGATIVE = ("gpus_per_task",)
_POSITIVE = ("mem_gb", "cpus_per_task", "time_min", "array_parallelism")


# -- settings -------------------------------------------------------------------------------


def _check_settings(values: object, where: str, allowed: Mapping[str, Any]) -> dict:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    for key, value in values.items():
        kind = allowed[key]
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{where}: {key} must be {names}, got {value!r}")
        if key in _POSITIVE and value <= 0 or key in _NOT_NEGATIVE and value < 0:
            raise ValueError(f"{where}: {key} must be {'> 0' if key in _POSITIVE else '>= 0'}")
        if key == "setup" and not all(isinstance(c, str) for c in value):
            raise ValueError(f"{where}: setup must be a list of shell commands (strings)")
    return dict(values)


def load_cluster(path: str | Path) -> dict:
    """The settings of cluster file ``path`` (module docstring), checked: raises one
    ``ValueError`` naming an unknown key (and the allowed ones) or a value of the wrong type."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cluster file {path} (DA_CLUSTER) does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    values = _check_settings(values, str(path), CLUSTER_KEYS)
    per_name = {k: v for k, v in CLUSTER_KEYS.items() if k != "overrides"}
    for name, over in values.get("overrides", {}).items():
        values["overrides"][name] = _check_settings(over, f"{path}: overrides.{name}", per_name)
    return values


def slurm_settings(name: str, cluster: str | Path | None = None) -> dict:
    """The SLURM settings of tasks called ``name``: the cluster file (``cluster``, default
    ``DA_CLUSTER``) with ``overrides[name]`` applied, then the ``DA_SLURM_*`` variables."""
    cluster = cluster if cluster is not None else os.environ.get("DA_CLUSTER")
    values = load_cluster(cluster) if cluster else {}
    out = {"cpus_per_task": 1, "gpus_per_task": 0, "time_min": 240, "setup": []}
    out.update({k: v for k, v in values.items() if k != "overrides"})
    out.update(values.get("overrides", {}).get(name, {}))
    env = {
        "DA_SLURM_PARTITION": ("partition", str),
        "DA_SLURM_TIME_MIN": ("time_min", int),
        "DA_SLURM_GPUS": ("gpus_per_task", int),
    }
    for var, (key, kind) in env.items():
        if os.environ.get(var):
            try:
                out[key] = kind(os.environ[var])
            except ValueError:
                raise ValueError(
                    f"{var} must be {kind.__name__}, got {os.environ[var]!r}"
                ) from None
    return out


# -- running one task -----------------------------------------------------------------------


def exit_with_owner(poll_s: float = 0.5) -> None:
    """End this process as soon as the process named by ``DA_RETRAIN_OWNER`` is gone.

    A local task is started by a submitit controller that is meant to outlive the process that
    submitted it. If :func:`run_tasks` is killed (for the pipeline: the notebook's kernel, which
    runs in a session of its own), its tasks would otherwise run on as orphans beside a rerun.
    A daemon thread polls the owner's pid; tasks write their files atomically, so exiting at
    any point loses at most the work since their last checkpoint. No-op without the variable.
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


class _Call:
    """What submitit runs: ``fn(task)``, requeueable through submitit's checkpoint protocol."""

    def __init__(self, fn: Callable[[Any], object]) -> None:
        self.fn = fn

    def __call__(self, task: Any) -> str:
        exit_with_owner()
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # Preemption / requeue: SLURM sends SIGTERM, kills the task KillWait seconds later
            # and runs the batch script again. Exit now and write no result (submitit would
            # write an error), so the driver keeps waiting for the requeued run.
            signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
        self.fn(task)
        return str(task.output)

    def checkpoint(self, task: Any) -> object:
        """Called by submitit before the time limit: requeue the same call (``fn`` resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


# -- reporting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A failed task: its name, output, submitit log (``None`` inline), what went wrong (the
    last line of the traceback, or the SLURM state) and the last lines of its log."""

    name: str
    output: str
    log: str | None
    error: str
    tail: str = ""
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        where = f"; see its submitit log {self.log}" if self.log else ""
        text = f"task {self.name!r} (output {self.output}) failed{where}: {self.error}"
        if self.tail:
            text += "\n" + "\n".join(f"    | {line}" for line in self.tail.splitlines())
        return text


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


def _tail(path: Path | None, lines: int = _TAIL_LINES) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _last_line(text: str) -> str:
    rows = [r for r in str(text).strip().splitlines() if r.strip()]
    return rows[-1].strip() if rows else "(no message)"


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class _Progress:
    """Plain progress lines: when something changed and ``every_s`` passed since the last
    line, at least every ``at_least_s``, and once at the end."""

    name: str
    total: int
    done: int
    enabled: bool = True
    every_s: float = 5.0
    at_least_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _start: float = field(init=False)
    _first: int = field(init=False)
    _last: float = field(init=False, default=float("-inf"))
    _shown: tuple = field(init=False, default=())

    def __post_init__(self) -> None:
        self._start, self._first = self.clock(), self.done

    def line(self, done: int, running: int) -> str:
        new, left = done - self._first, self.total - done
        if left == 0:
            eta = f"took {_duration(self.clock() - self._start)}"
        elif new > 0:
            eta = "ETA " + _duration((self.clock() - self._start) / new * left)
        else:
            eta = "ETA ?"
        return f"{self.name}: {done}/{self.total} done, {running} running, {eta}"

    def update(self, done: int, running: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now, state = self.clock(), (done, running)
        since = now - self._last
        if final or since >= self.at_least_s or (state != self._shown and since >= self.every_s):
            print(self.line(done, running), flush=True)
            self._last, self._shown = now, state


# -- the fan-out ----------------------------------------------------------------------------


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
    prog = _Progress(name, len(tasks), len(tasks) - len(todo), enabled=progress)
    prog.update(prog.done, 0)
    sub = Path(folder) / name
    if executor == "inline":
        failures, cancelled = _run_inline(fn, todo, prog, on_failure)
    elif executor == "local":
        cap = max_parallel or os.cpu_count() or 1
        failures, cancelled = _run_local(_Call(fn), todo, cap, sub, prog, on_failure)
    else:
        if max_parallel is not None:
            settings["array_parallelism"] = max_parallel
        failures, cancelled = _Slurm(_Call(fn), name, sub, settings, lost_after_s).run(
            todo, prog, on_failure
        )
    if failures:
        err = TasksFailed(name, failures, len(tasks), cancelled)
        raise err from failures[0].exception
    return outputs


def _report(failures: list[Failure], failure: Failure) -> None:
    failures.append(failure)
    print("FAILED " + failure.describe(), flush=True)


def _run_inline(fn: Callable, todo: list, prog: _Progress, on_failure: str) -> tuple[list, int]:
    import traceback

    failures: list[Failure] = []
    for i, task in enumerate(todo):
        try:
            fn(task)
        except Exception as err:
            tb = "\n".join(traceback.format_exc().rstrip().splitlines()[-_TAIL_LINES:])
            error = f"{type(err).__name__}: {err}"
            _report(failures, Failure(task.name, str(task.output), None, error, tb, err))
        else:
            if (missing := _no_output(task, None)) is not None:
                _report(failures, missing)
        if failures and on_failure == "cancel":
            return failures, len(todo) - i - 1
        prog.update(prog.done + i + 1, 0, final=i + 1 == len(todo))
    return failures, 0


def _no_output(task: Any, log: Path | None) -> Failure | None:
    """A failure when ``task`` returned without writing its output."""
    if Path(task.output).exists():
        return None
    error = "it returned without writing its output"
    return Failure(task.name, str(task.output), log and str(log), error, _tail(log))


def _from_result(task: Any, paths: Any) -> tuple[bool, Failure | None]:
    """(whether submitit's result file of ``task`` is there, the failure it reports)."""
    from submitit.core.utils import pickle_load

    if not paths.result_pickle.exists():
        return False, None
    try:
        outcome, value = pickle_load(paths.result_pickle)
    except (EOFError, pickle.UnpicklingError):
        return False, None  # being written
    log = Path(paths.stderr)
    if outcome == "success":
        return True, _no_output(task, log)
    return True, Failure(task.name, str(task.output), str(log), _last_line(value), _tail(log))


def _local_failure(task: Any, sjob: Any) -> Failure | None:
    """The failure of a finished local job (``None``: it succeeded)."""
    has_result, failure = _from_result(task, sjob.paths)
    if has_result:
        return failure
    log = Path(sjob.paths.stderr)
    # submitit's local controller does not keep its worker's exit status: a worker that ended
    # without a result was killed (SIGKILL, e.g. by the out-of-memory killer) or crashed hard
    error = (
        f"local job {sjob.job_id} ended without a result: its process was killed (SIGKILL, e.g. "
        "by the kernel's out-of-memory killer: give it more memory or fewer parallel tasks, "
        "DA_MAX_PARALLEL) or crashed; rerun to retry it"
    )
    return Failure(task.name, str(task.output), str(log), error, _tail(log))


def _run_local(
    call: _Call, todo: list, cap: int, folder: Path, prog: _Progress, on_failure: str
) -> tuple[list, int]:
    """submitit's LocalExecutor has no concurrency cap: submit a task only when one finished."""
    import submitit

    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN)
    # Tasks inherit this environment: they exit when this process is gone (exit_with_owner).
    previous = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())
    # The local executor sets CUDA_VISIBLE_DEVICES to its own GPU list (empty by default).
    gpus = 0
    if os.environ.get("DA_DEVICE", "cpu").startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
    pending, running, failures, n, finished = deque(todo), [], [], 0, prog.done
    try:
        while pending or running:
            while pending and len(running) < cap:
                if gpus:
                    ex.update_parameters(gpus_per_node=1, visible_gpus=(n % gpus,))
                task = pending.popleft()
                running.append((task, ex.submit(call, task)))
                n += 1
            done = [p for p in running if p[1].done()]
            for pair in done:
                running.remove(pair)
                finished += 1
                failure = _local_failure(*pair)
                if failure is not None:
                    _report(failures, failure)
                    if on_failure == "cancel":
                        cancelled = len(pending) + len(running)
                        pending.clear()
                        for _, sjob in running:
                            sjob.cancel(check=False)
                        return failures, cancelled
            prog.update(finished, len(running), final=not pending and not running)
            if not done:
                time.sleep(0.2)
    except BaseException:
        # Ctrl-C: stop the others (their checkpoints let a rerun resume).
        for _, sjob in running:
            sjob.cancel(check=False)
        raise
    finally:
        if previous is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = previous
    return failures, 0


# -- SLURM ----------------------------------------------------------------------------------

#: squeue states after which a job does not run again by itself.
_FINAL = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
}  # fmt: skip


def squeue_states() -> dict[str, str]:
    """``{job id: state}`` of this user's SLURM jobs still known to the controller (array tasks
    one by one, ``"123_4"``), from ``squeue``, which needs no accounting."""
    cmd = ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-u", getpass.getuser()]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        raise RuntimeError(f"squeue failed (is this a SLURM cluster?): {detail}") from None
    return dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)


def _sacct_state(job_id: str) -> str | None:
    cmd = ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # no accounting
    return out.split()[0] if out.split() else None


class _Slurm:
    """Job arrays, the record of submitted job ids, re-attaching and watching."""

    def __init__(self, call: _Call, name: str, folder: Path, settings: dict, lost_after_s: float):
        self.call, self.name, self.folder = call, name, folder
        self.settings, self.lost_after_s = settings, lost_after_s
        self.record_path = folder / "submitted.json"

    def load_record(self) -> dict[str, dict]:
        try:
            return json.loads(self.record_path.read_text())["tasks"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError):
            print(f"{self.name}: ignoring unreadable {self.record_path}")
            return {}

    def save_record(self, record: dict[str, dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_name(f".{self.record_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "tasks": record}, indent=1))
        os.replace(tmp, self.record_path)

    def executor(self) -> Any:
        import submitit

        s = self.settings
        ex = submitit.SlurmExecutor(folder=self.folder, python=s.get("python"))
        params: dict[str, Any] = {
            "job_name": f"da_{self.name}",
            "time": s["time_min"],
            "cpus_per_task": s["cpus_per_task"],
            "setup": list(s["setup"]),
            "additional_parameters": {"requeue": True},
        }
        for key in ("partition", "account", "qos"):
            if s.get(key):
                params[key] = s[key]
        if s.get("mem_gb"):
            params["mem"] = f"{int(s['mem_gb'] * 1024)}MB"
        if s["gpus_per_task"]:
            params["gpus_per_node"] = s["gpus_per_task"]
        if s.get("array_parallelism"):
            params["array_parallelism"] = s["array_parallelism"]
        ex.update_parameters(**params)
        return ex

    def submit(self, todo: list, record: dict[str, dict]) -> dict[str, str]:
        ex, ids = self.executor(), {}
        previous = os.environ.pop(OWNER_ENV, None)  # SLURM tasks outlive this process
        try:
            for start in range(0, len(todo), _ARRAY_MAX):
                chunk = todo[start : start + _ARRAY_MAX]
                jobs = ex.map_array(self.call, chunk)
                for task, job in zip(chunk, jobs, strict=True):
                    ids[str(task.output)] = job.job_id
                    record[str(task.output)] = {"name": task.name, "job_id": job.job_id}
                self.save_record(record)
        finally:
            if previous is not None:
                os.environ[OWNER_ENV] = previous
        return ids

    def run(self, todo: list, prog: _Progress, on_failure: str) -> tuple[list, int]:
        from submitit.core.utils import JobPaths

        record, states = self.load_record(), squeue_states()
        ids = {}
        for t in todo:
            entry = record.get(str(t.output))
            if entry and states.get(entry["job_id"], "COMPLETED") not in _FINAL:
                ids[str(t.output)] = entry["job_id"]
        if ids:
            print(f"{self.name}: re-attached to {len(ids)} tasks still queued or running on SLURM")
        fresh = [t for t in todo if str(t.output) not in ids]
        if fresh:
            ids.update(self.submit(fresh, record))
        watching = {str(t.output): t for t in todo}
        paths = {o: JobPaths(self.folder, job_id=j, task_id=0) for o, j in ids.items()}
        failures: list[Failure] = []
        gone_since: dict[str, float] = {}
        finished, last_squeue, squeue_ok = prog.done, float("-inf"), True
        try:
            while watching:
                now = time.monotonic()
                if now - last_squeue >= 2.0:
                    last_squeue = now
                    try:
                        states, squeue_ok = squeue_states(), True
                    except RuntimeError as err:  # e.g. a controller restart: keep the states
                        if squeue_ok:
                            print(f"{self.name}: {err}; retrying", flush=True)
                        squeue_ok = False
                        gone_since.clear()
                for out, task in list(watching.items()):
                    failure, done = self.check(task, ids[out], paths[out], states, gone_since)
                    if not done:
                        continue
                    del watching[out]
                    finished += 1
                    if failure is not None:
                        _report(failures, failure)
                        if on_failure == "cancel" and watching:
                            rest = [ids[o] for o in watching]
                            subprocess.run(["scancel", *rest], capture_output=True, timeout=60)
                            return failures, len(rest)
                running = sum(states.get(ids[o]) == "RUNNING" for o in watching)
                prog.update(finished, running, final=not watching)
                if watching:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            print(
                f"{self.name}: interrupted; {len(watching)} tasks stay on SLURM (a rerun "
                f"re-attaches to them; scancel --name=da_{self.name} stops them)",
                flush=True,
            )
            raise
        return failures, 0

    def check(
        self, task: Any, job_id: str, paths: Any, states: dict, gone_since: dict
    ) -> tuple[Failure | None, bool]:
        """(failure or None, whether the task is over)."""
        out = str(task.output)
        has_result, failure = _from_result(task, paths)
        if has_result:
            return failure, True
        state = states.get(job_id)
        if state is not None and state not in _FINAL:
            gone_since.pop(out, None)
            return None, False
        first = gone_since.setdefault(out, time.monotonic())
        if time.monotonic() - first < self.lost_after_s:
            return None, False
        if Path(out).exists():
            return None, True  # finished, its result pickle lost
        state = state or _sacct_state(job_id) or "gone from the queue"
        log = Path(paths.stderr)
        error = f"SLURM job {job_id} ended without a result (state {state})"
        return Failure(task.name, out, str(log), error, _tail(log)), True
