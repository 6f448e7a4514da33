"""The SLURM executor (diffusion_attribution.core.slurm) against a real controller on localhost
(the ``slurm_cluster`` fixture; skipped without root or the SLURM binaries): the same models
as the local executor, failures reported, re-attaching after the driver died, requeueing."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffusion_attribution.core.jobs import TasksFailed, run_tasks
from diffusion_attribution.core.slurm import SlurmRun, squeue_states
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.evaluation.retraining import checkpoint_path, run_job, run_jobs
from tests.core.test_jobs import Task, write_output
from tests.evaluation.test_retraining import make_job, same, weights

pytestmark = pytest.mark.usefixtures("slurm_cluster", "no_execution_settings")


@pytest.fixture
def data_path(tmp_path: Path) -> str:
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(
        images=torch.rand(30, 1, 8, 8, generator=g) * 2 - 1,
        labels=torch.zeros(30, dtype=torch.int64),
        name="random",
        class_names=("x",),
    )
    ds.save(tmp_path / "data.pt")
    return str(tmp_path / "data.pt")


def wait_for(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f} s")
        time.sleep(poll)


def record(folder: Path, name: str) -> dict[str, str]:
    """``{output: job id}`` from ``<folder>/<name>/submitted.json``."""
    path = folder / name / "submitted.json"
    if not path.exists():
        return {}
    return {o: e["job_id"] for o, e in json.loads(path.read_text())["tasks"].items()}


def test_slurm_models_equal_local_models(data_path: str, tmp_path: Path) -> None:
    keeps = [tuple(range(k, 30, 2)) for k in range(2)]
    local = [
        make_job(data_path, tmp_path / "local" / f"m{k}.pt", keep) for k, keep in enumerate(keeps)
    ]
    slurm = [
        make_job(data_path, tmp_path / "slurm" / f"m{k}.pt", keep) for k, keep in enumerate(keeps)
    ]
    run_jobs(local, executor="local", max_parallel=2, folder=str(tmp_path / "s"), progress=False)
    outs = run_jobs(slurm, executor="slurm", max_parallel=2, folder=str(tmp_path / "s"))
    assert outs == [j.output for j in slurm]
    assert len(record(tmp_path / "s", "retrain")) == 2  # they went through SLURM
    for a, b in zip(local, slurm, strict=True):
        assert Path(a.output).read_bytes() == Path(b.output).read_bytes(), b.name
        assert same(weights(a.output), weights(b.output))
    assert not list((tmp_path / "slurm").glob("*.ckpt"))


def test_slurm_failure_reported_others_finish(tmp_path: Path, capsys, monkeypatch) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "time_min: 30\nsetup: [export DA_SETUP_RAN=1]\noverrides:\n  fail: {time_min: 7}\n"
    )
    monkeypatch.setenv("DA_CLUSTER", str(cluster))
    tasks = [Task(f"t{i}", str(tmp_path / f"t{i}.out"), fail=i == 1) for i in range(3)]
    with pytest.raises(TasksFailed) as info:
        run_tasks(write_output, tasks, name="fail", executor="slurm", folder=tmp_path / "s")
    (failure,) = info.value.failures
    assert failure.name == "t1" and failure.output == tasks[1].output
    assert "ValueError: boom in t1" in failure.error
    assert Path(failure.log).is_file() and "stderr line of t1" in Path(failure.log).read_text()
    assert "boom in t1" in failure.tail
    assert f"see its submitit log {failure.log}" in str(info.value)
    assert "FAILED task 't1'" in capsys.readouterr().out
    assert Path(tasks[0].output).exists() and Path(tasks[2].output).exists()
    # the cluster file reached sbatch: requeueable, its setup, the override for this name
    (script,) = (tmp_path / "s" / "fail").glob("*_submission.sh")
    lines = script.read_text().splitlines()
    for line in ("#SBATCH --requeue", "#SBATCH --time=7", "#SBATCH --job-name=da_fail"):
        assert line in lines
    assert lines.index("export DA_SETUP_RAN=1") < next(
        i for i, line in enumerate(lines) if line.startswith("srun ")
    )


@dataclass(frozen=True)
class GatedTask:
    name: str
    output: str
    gate: str  # tasks other than "quick" wait until this file exists
    starts: str  # one line per start: "<name> <SLURM job id>"


def gated(task: GatedTask) -> None:
    with open(task.starts, "a") as f:
        f.write(f"{task.name} {os.environ.get('SLURM_JOB_ID')}\n")
    while task.name != "quick" and not Path(task.gate).exists():
        time.sleep(0.1)
    tmp = Path(task.output + ".tmp")
    tmp.write_text(task.name)
    os.replace(tmp, task.output)


def test_rerun_reattaches_after_the_driver_died(tmp_path: Path, monkeypatch, capsys) -> None:
    gate, starts, folder = tmp_path / "gate", tmp_path / "starts", tmp_path / "s"
    names = ["quick", "slow1", "slow2", "slow3"]
    tasks = [GatedTask(n, str(tmp_path / f"{n}.out"), str(gate), str(starts)) for n in names]
    script = textwrap.dedent(
        f"""
        import pickle
        from diffusion_attribution.core.jobs import run_tasks
        from tests.core.test_slurm import gated
        tasks = pickle.loads({pickle.dumps(tasks)!r})
        run_tasks(gated, tasks, name="reattach", executor="slurm", max_parallel=2,
                  folder={str(folder)!r}, progress=False)
        """
    )
    driver = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)

    def started() -> set[str]:
        return (
            {line.split()[0] for line in starts.read_text().splitlines()}
            if starts.exists()
            else set()
        )

    try:  # quick has finished, slow1 and slow2 run, slow3 waits for a free slot
        wait_for(lambda: {"quick", "slow1", "slow2"} <= started(), 60, "no 3 tasks started")
        wait_for(lambda: Path(tasks[0].output).exists(), 30, "quick did not finish")
        assert driver.poll() is None, "the driver exited early"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    first = record(folder, "reattach")
    assert sorted(first) == sorted(t.output for t in tasks)
    states = squeue_states()
    assert (
        states[first[tasks[1].output]] == "RUNNING" and states[first[tasks[2].output]] == "RUNNING"
    )
    assert states[first[tasks[3].output]] == "PENDING"
    # slow3 is cancelled while nobody watches: the rerun submits it again, and nothing else
    subprocess.run(["scancel", first[tasks[3].output]], check=True)
    wait_for(lambda: squeue_states().get(first[tasks[3].output]) == "CANCELLED", 30, "no cancel")

    submitted: list[str] = []
    submit = SlurmRun.submit

    def counting(self, todo, rec):
        submitted.extend(t.name for t in todo)
        return submit(self, todo, rec)

    monkeypatch.setattr(SlurmRun, "submit", counting)
    threading.Timer(3.0, gate.touch).start()  # the running tasks finish while re-attached
    outs = run_tasks(gated, tasks, name="reattach", executor="slurm", max_parallel=2, folder=folder)
    assert outs == [t.output for t in tasks]
    assert submitted == ["slow3"]
    out = capsys.readouterr().out
    assert "reattach: 1 of 4 outputs exist" in out
    assert "reattach: re-attached to 2 tasks still queued or running on SLURM" in out
    second = record(folder, "reattach")
    assert {o: j for o, j in second.items() if o != tasks[3].output} == {
        o: j for o, j in first.items() if o != tasks[3].output
    }
    assert second[tasks[3].output] != first[tasks[3].output]
    lines = starts.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == names  # every task ran exactly once
    assert all(Path(t.output).read_text() == t.name for t in tasks)


def started_from(job) -> int:
    """The training step ``job`` starts from (its checkpoint's)."""
    ckpt = checkpoint_path(job)
    return torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0


def logged_run_job(job) -> str:
    """:func:`run_job`, logging the step it starts from to ``<output>.starts``."""
    with open(job.output + ".starts", "a") as f:
        f.write(f"{started_from(job)} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
    return run_job(job)


def test_requeued_training_resumes_from_its_checkpoint(data_path: str, tmp_path: Path) -> None:
    job = make_job(data_path, tmp_path / "out" / "long.pt", tuple(range(0, 30, 2)), steps=150)
    assert job.train["checkpoint_every"] == 5
    folder, errors = tmp_path / "s", []
    Path(job.output).parent.mkdir()

    def drive() -> None:
        try:
            run_tasks(logged_run_job, [job], name="requeue", executor="slurm", folder=folder)
        except BaseException as err:  # noqa: B036 -- reported by the test thread
            errors.append(err)

    driver = threading.Thread(target=drive)
    driver.start()
    ckpt = checkpoint_path(job)
    wait_for(lambda: ckpt.exists(), 60, "no checkpoint")
    wait_for(lambda: started_from(job) >= 10, 30, "no checkpoint at step 10")
    (job_id,) = record(folder, "requeue").values()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    at_requeue = started_from(job)
    driver.join(timeout=120)
    assert not driver.is_alive(), "the requeued job did not finish within 120 s"
    assert not errors, errors
    starts = Path(job.output + ".starts").read_text().splitlines()
    assert len(starts) == 2, f"the job ran {len(starts)} times, not twice (requeue too late?)"
    (step0, restarts0), (step1, restarts1) = (map(int, s.split()) for s in starts)
    assert (step0, restarts0) == (0, 0) and restarts1 == 1
    assert at_requeue <= step1 < 150  # resumed from its last checkpoint, not from scratch
    assert not ckpt.exists()
    # ... and ends with the weights of an uninterrupted run
    ref = make_job(data_path, tmp_path / "ref" / "long.pt", job.keep, steps=150)
    run_job(ref)
    assert same(weights(job.output), weights(ref.output))
