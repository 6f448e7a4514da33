"""What the fan-outs share: shards of a range, a cache folder per fingerprint, and a phase of
tasks run through :func:`~diffusion_attribution.core.jobs.run_tasks`.

Every task writes its file atomically and last; a task whose file exists is never run again,
so a killed stage resumes with the tasks that had not finished, and a killed task is
recomputed alone. The files live in ``.cache/<stage>/<fingerprint>/`` outside the stage's DVC
outputs (DVC deletes those before rerunning a stage), named by a fingerprint of everything
that determines them; folders of other fingerprints are moved aside into
``.cache/stale/<stage>/``, never deleted. Shard sizes and executors are execution settings
(``DA_SHARD_EXAMPLES``, ``DA_EXECUTOR``, ``DA_MAX_PARALLEL``), not parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from diffusion_attribution.core.identity import move_aside
from diffusion_attribution.core.jobs import run_tasks
from diffusion_attribution.pipeline.workspace import Workspace, write_json


def blocks(n: int, size: int) -> list[range]:
    """``range(n)`` cut into consecutive blocks of ``size`` (the last may be shorter);
    ``size <= 0`` means one block."""
    if n < 1:
        raise ValueError(f"nothing to split: n = {n}")
    size = n if size <= 0 else int(size)
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def training_shards(num_train: int) -> list[range]:
    """The training set cut into shards of ``DA_SHARD_EXAMPLES`` examples (default: one
    shard)."""
    return blocks(num_train, int(os.environ.get("DA_SHARD_EXAMPLES", "0")))


def timings_path(output: str | Path) -> Path:
    """The small JSON file of timings beside a task's output ``output`` (read without loading
    the output itself)."""
    return Path(f"{output}.timings.json")


def write_seconds(output: str | Path, seconds: float) -> None:
    """A task's wall-clock time, beside its output (:func:`timings_path`)."""
    write_json(timings_path(output), {"seconds": seconds})


def task_seconds(tasks: Sequence) -> float:
    """The summed wall-clock time of finished ``tasks`` (:func:`write_seconds`)."""
    return sum(json.loads(timings_path(t.output).read_text())["seconds"] for t in tasks)


def cache_folder(ws: Workspace, stage: str, fp: str) -> Path:
    """``.cache/<stage>/<fp>/``, created; folders of other fingerprints (other inputs or
    code) are moved aside into ``.cache/stale/<stage>/``, never deleted."""
    root = ws.path(f".cache/{stage}")
    stale = [p for p in root.glob("*") if p.is_dir() and p.name != fp] if root.exists() else []
    moved = move_aside(stale, ws.stale_dir(stage))
    if moved:
        print(f"{stage}: moved {len(moved)} shard folders of other inputs to {moved[0][1].parent}")
    folder = root / fp
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_phase(ws: Workspace, fn: Callable, phase: str, tasks: Sequence, progress: bool) -> None:
    """``tasks`` through :func:`~diffusion_attribution.core.jobs.run_tasks` on ``DA_EXECUTOR``: in
    this process when it is ``inline`` or a local run has at most one task left, else local
    subprocesses sharing the workspace's threads, or SLURM."""
    todo = [t for t in tasks if not Path(t.output).exists()]
    if not todo:
        return
    executor = os.environ.get("DA_EXECUTOR", "local")
    inline = executor == "inline" or (executor == "local" and len(todo) <= 1)
    if not inline and executor == "local":
        # several local subprocesses share the cores
        parallel = int(os.environ.get("DA_MAX_PARALLEL", "0")) or os.cpu_count() or 1
        per = max(1, ws.threads // min(parallel, len(todo)))
        tasks = [type(t)(**{**asdict(t), "threads": per}) for t in tasks]
    run_tasks(
        fn,
        tasks,
        name=phase,
        executor="inline" if inline else executor,
        folder=str(ws.folder(f".cache/submitit/{phase}")),
        progress=progress,
    )
