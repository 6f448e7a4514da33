"""The ``slurm`` executor: job arrays through submitit's SlurmExecutor, the record of
submitted job ids (``<folder>/<name>/submitted.json``), re-attaching to them after the driver
died, and watching them through ``squeue``. Behaviour and settings:
:mod:`diffusion_attribution.core.jobs`."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from diffusion_attribution.core.executors import OWNER_ENV, TaskCall, result_failure
from diffusion_attribution.core.reporting import Failure, Progress, log_tail, report

_ARRAY_MAX = 1000  # SLURM's default MaxArraySize is 1001

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


class SlurmRun:
    """Job arrays, the record of submitted job ids, re-attaching and watching."""

    def __init__(
        self, call: TaskCall, name: str, folder: Path, settings: dict, lost_after_s: float
    ):
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
        import submitit  # here, not at the top: importing the library stays cheap

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

    def run(self, todo: list, prog: Progress, on_failure: str) -> tuple[list, int]:
        from submitit.core.utils import JobPaths  # here: importing the library stays cheap

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
                        report(failures, failure)
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
        has_result, failure = result_failure(task, paths)
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
        return Failure(task.name, out, str(log), error, log_tail(log)), True
