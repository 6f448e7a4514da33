"""The executors (diffusion_attribution.core.executors): the call submitit runs is
requeueable; a local task killed for memory is reported and retried."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_attribution.core.executors import TaskCall
from diffusion_attribution.core.jobs import TasksFailed, run_tasks
from tests.core.test_jobs import Task, runs, write_output

pytestmark = pytest.mark.usefixtures("no_execution_settings")


def test_call_is_requeueable(tmp_path: Path) -> None:
    """submitit's checkpoint protocol (before a SLURM time limit): the call resubmits itself
    with the same task, and runs ``fn`` again when requeued."""
    import cloudpickle

    task = Task("a", str(tmp_path / "a.out"))
    call = TaskCall(write_output)
    again = call.checkpoint(task)
    assert again.function is call and again.args == (task,)
    again = cloudpickle.loads(cloudpickle.dumps(again))  # as submitit stores it
    assert again.result() == task.output and runs(task) == 1


def test_worker_killed_for_memory_is_reported_and_retried(tmp_path: Path, tests_importable):
    """A local task killed by SIGKILL (what the out-of-memory killer sends) is reported as
    killed, naming the task and the likely cause, while the others finish; a rerun retries it
    alone."""
    tasks = [
        Task("good", str(tmp_path / "g.out")),
        Task("big", str(tmp_path / "big.out"), oom_once=True),
    ]
    kw = dict(name="t", executor="local", folder=tmp_path / "s", max_parallel=1, progress=False)
    with pytest.raises(TasksFailed) as info:
        run_tasks(write_output, tasks, **kw)
    (failure,) = info.value.failures
    assert failure.name == "big" and "killed (SIGKILL" in failure.error, failure.error
    assert "out-of-memory" in failure.error and "rerun to retry" in failure.error
    assert Path(tasks[0].output).exists() and not Path(tasks[1].output).exists()
    run_tasks(write_output, tasks, **kw)  # the retry
    assert Path(tasks[1].output).read_text() == "big"
    assert [runs(t) for t in tasks] == [1, 2]
