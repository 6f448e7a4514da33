"""Where a task runs when not on SLURM: in this process (``inline``) or in local
subprocesses through submitit's LocalExecutor (``local``), and :class:`TaskCall`, what every
submitit job runs. Behaviour and settings: :mod:`diffusion_attribution.core.jobs`."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusion_attribution.core.reporting import (
    TAIL_LINES,
    Failure,
    Progress,
    last_line,
    log_tail,
    missing_output,
    report,
)

#: Environment variable through which :func:`run_local` tells its tasks this process's id.
OWNER_ENV = "DA_RETRAIN_OWNER"
# submitit's LocalExecutor kills a job after ``timeout_min`` (default: 2 minutes!).
_LOCAL_TIMEOUT_MIN = 7 * 24 * 60


def exit_with_owner(poll_s: float = 0.5) -> None:
    """End this process as soon as the process named by ``DA_RETRAIN_OWNER`` is gone.

    A local task is started by a submitit controller that is meant to outlive the process that
    submitted it. If :func:`~diffusion_attribution.core.jobs.run_tasks` is killed (for the
    pipeline: the notebook's kernel, which runs in a session of its own), its tasks would
    otherwise run on as orphans beside a rerun. A daemon thread polls the owner's pid; tasks
    write their files atomically, so exiting at any point loses at most the work since their
    last checkpoint. No-op without the variable.
    """
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


class TaskCall:
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
        import submitit  # here, not at the top: importing the library stays cheap

        return submitit.helpers.DelayedSubmission(self, task)


def run_inline(fn: Callable, todo: list, prog: Progress, on_failure: str) -> tuple[list, int]:
    """The ``inline`` executor: ``fn(task)`` for each task in turn, in this process; returns
    the failures and how many tasks were cancelled."""
    failures: list[Failure] = []
    for i, task in enumerate(todo):
        try:
            fn(task)
        except Exception as err:
            tb = "\n".join(traceback.format_exc().rstrip().splitlines()[-TAIL_LINES:])
            error = f"{type(err).__name__}: {err}"
            report(failures, Failure(task.name, str(task.output), None, error, tb, err))
        else:
            if (missing := missing_output(task, None)) is not None:
                report(failures, missing)
        if failures and on_failure == "cancel":
            return failures, len(todo) - i - 1
        prog.update(prog.done + i + 1, 0, final=i + 1 == len(todo))
    return failures, 0


def result_failure(task: Any, paths: Any) -> tuple[bool, Failure | None]:
    """(whether submitit's result file of ``task`` is there, the failure it reports)."""
    from submitit.core.utils import pickle_load  # here: importing the library stays cheap

    if not paths.result_pickle.exists():
        return False, None
    try:
        outcome, value = pickle_load(paths.result_pickle)
    except (EOFError, pickle.UnpicklingError):
        return False, None  # being written
    log = Path(paths.stderr)
    if outcome == "success":
        return True, missing_output(task, log)
    return True, Failure(task.name, str(task.output), str(log), last_line(value), log_tail(log))


def _local_failure(task: Any, sjob: Any) -> Failure | None:
    """The failure of a finished local job (``None``: it succeeded)."""
    has_result, failure = result_failure(task, sjob.paths)
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
    return Failure(task.name, str(task.output), str(log), error, log_tail(log))


def run_local(
    call: TaskCall, todo: list, cap: int, folder: Path, prog: Progress, on_failure: str
) -> tuple[list, int]:
    """The ``local`` executor: ``call(task)`` in subprocesses, at most ``cap`` at once
    (submitit's LocalExecutor has no concurrency cap: submit a task only when one finished);
    returns the failures and how many tasks were cancelled."""
    import submitit  # here, not at the top: importing the library stays cheap

    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN)
    # Tasks inherit this environment: they exit when this process is gone (exit_with_owner).
    previous = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())
    # The local executor sets CUDA_VISIBLE_DEVICES to its own GPU list (empty by default).
    gpus = 0
    if os.environ.get("DA_DEVICE", "cpu").startswith("cuda"):
        import torch  # only to count the GPUs; the executors need it nowhere else

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
                    report(failures, failure)
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
