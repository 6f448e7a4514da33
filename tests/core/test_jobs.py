"""The generic fan-out (diffusion_attribution.core.jobs) with the inline and local executors:
a bad cluster file or bad arguments stop it before anything runs, finished tasks are skipped,
failures reported. ``Task`` and ``write_output`` are the tasks of the executor tests too."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffusion_attribution.core.jobs import TasksFailed, run_tasks


@dataclass(frozen=True)
class Task:
    name: str
    output: str
    fail: bool = False
    skip_output: bool = False
    #: killed by SIGKILL on its first run, as the kernel's out-of-memory killer does
    oom_once: bool = False


def write_output(task: Task) -> None:
    """Append to ``<output>.runs`` (one line per run), then write the output atomically."""
    out = Path(task.output)
    with open(out.with_name(out.name + ".runs"), "a") as f:
        f.write("run\n")
    marker = out.with_name(out.name + ".oom")
    if task.oom_once and not marker.exists():
        marker.write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    if task.fail:
        print(f"stderr line of {task.name}", file=sys.stderr, flush=True)
        raise ValueError(f"boom in {task.name}")
    if task.skip_output:
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(task.name)
    os.replace(tmp, out)


def runs(task: Task) -> int:
    path = Path(task.output + ".runs")
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(autouse=True)
def _no_settings(no_execution_settings) -> None:
    """No DA_* execution setting of the caller's shell applies."""


def test_bad_cluster_file_stops_before_anything_runs(tmp_path: Path, monkeypatch) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("partition: gpu\nmemory: 16\n")
    monkeypatch.setenv("DA_CLUSTER", str(cluster))
    task = Task("a", str(tmp_path / "a.out"))
    for executor in ("inline", "local"):
        with pytest.raises(ValueError, match=r"unknown key 'memory'; allowed: partition"):
            run_tasks(write_output, [task], name="t", executor=executor, folder=tmp_path / "s")
    assert runs(task) == 0


def test_arguments_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = Task("a", str(tmp_path / "x")), Task("b", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="same output"):
        run_tasks(write_output, [a, b], name="t", executor="inline", folder=tmp_path)
    with pytest.raises(ValueError, match="executor"):
        run_tasks(write_output, [a], name="t", executor="nope", folder=tmp_path)
    with pytest.raises(ValueError, match="on_failure"):
        run_tasks(write_output, [a], name="t", executor="inline", folder=tmp_path, on_failure="x")
    with pytest.raises(TypeError, match=r"\.name and \.output"):
        run_tasks(write_output, [str(tmp_path)], name="t", executor="inline", folder=tmp_path)
    with pytest.raises(TypeError, match="module-level function"):
        run_tasks(lambda t: None, [a], name="t", executor="local", folder=tmp_path)
    monkeypatch.setenv("DA_MAX_PARALLEL", "two")
    with pytest.raises(ValueError, match="DA_MAX_PARALLEL must be int, got 'two'"):
        run_tasks(write_output, [a], name="t", executor="inline", folder=tmp_path)
    assert runs(a) == 0


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_finished_tasks_are_skipped(tmp_path: Path, executor: str, capsys, tests_importable):
    tasks = [Task(f"t{i}", str(tmp_path / f"t{i}.out")) for i in range(4)]
    Path(tasks[1].output).write_text("done before")
    kw = dict(name="t", executor=executor, folder=tmp_path / "s", max_parallel=2)
    assert run_tasks(write_output, tasks, **kw) == [t.output for t in tasks]
    assert [runs(t) for t in tasks] == [1, 0, 1, 1]
    assert Path(tasks[1].output).read_text() == "done before"
    out = capsys.readouterr().out
    assert "t: 1 of 4 outputs exist, skipping them" in out
    assert "t: 4/4 done, 0 running" in out
    # a rerun runs nothing
    assert run_tasks(write_output, tasks, **kw) == [t.output for t in tasks]
    assert [runs(t) for t in tasks] == [1, 0, 1, 1]
    assert "4 of 4 outputs exist" in capsys.readouterr().out


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_failures_reported_and_others_finish(
    tmp_path: Path, executor: str, capsys, tests_importable
):
    tasks = [
        Task("good0", str(tmp_path / "g0.out")),
        Task("bad", str(tmp_path / "bad.out"), fail=True),
        Task("lazy", str(tmp_path / "lazy.out"), skip_output=True),
        Task("good1", str(tmp_path / "g1.out")),
    ]
    kw = dict(name="t", executor=executor, folder=tmp_path / "s", max_parallel=1, progress=False)
    with pytest.raises(TasksFailed) as info:
        run_tasks(write_output, tasks, **kw)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert [f.name for f in err.failures] == ["bad", "lazy"]
    bad, lazy = err.failures
    assert bad.output == tasks[1].output and "ValueError: boom in bad" in bad.error
    assert "without writing its output" in lazy.error
    message = str(err)
    assert "t: 2 of 4 tasks failed" in message
    assert f"'bad' (output {tasks[1].output}) failed" in message
    if executor == "local":
        assert bad.log is not None and Path(bad.log).is_file()
        assert f"see its submitit log {bad.log}" in message
        text = Path(bad.log).read_text()
        assert "stderr line of bad" in text  # the task's stderr
        assert text.rstrip().endswith(bad.tail) and "ValueError: boom in bad" in bad.tail
    else:
        assert bad.log is None and "boom in bad" in bad.tail  # the traceback
        assert isinstance(err.__cause__, ValueError)
    # reported when it happened, too
    assert "FAILED task 'bad'" in capsys.readouterr().out
    # the others finished
    assert Path(tasks[0].output).exists() and Path(tasks[3].output).exists()
    # a rerun runs only the unfinished ones
    with pytest.raises(TasksFailed):
        run_tasks(write_output, tasks, **kw)
    assert [runs(t) for t in tasks] == [1, 2, 2, 1]


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_on_failure_cancel(tmp_path: Path, executor: str, tests_importable) -> None:
    tasks = [Task("bad", str(tmp_path / "bad.out"), fail=True)]
    tasks += [Task(f"t{i}", str(tmp_path / f"t{i}.out")) for i in range(3)]
    with pytest.raises(TasksFailed, match=r"3 other tasks were cancelled") as info:
        run_tasks(
            write_output, tasks, name="t", executor=executor, folder=tmp_path / "s",
            max_parallel=1, progress=False, on_failure="cancel",
        )  # fmt: skip
    assert [f.name for f in info.value.failures] == ["bad"]
    assert [runs(t) for t in tasks[1:]] == [0, 0, 0]
