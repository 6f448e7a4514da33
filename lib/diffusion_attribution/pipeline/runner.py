"""Runs one pipeline stage: validate ``params.yaml``, then execute the stage's notebook.

``python -m diffusion_attribution.pipeline.runner STAGE`` is the command of every stage in
``dvc.yaml``. It validates the whole parameters file first (a bad value stops here with one
message naming the key, nothing computed), then runs the stage's notebook
(:mod:`diffusion_attribution.pipeline.stages`) with papermill, passing the validated parameters as the
notebook's one parameter ``params`` (visible in the executed notebook) and writing the executed
copy to ``reports/notebooks/``. The notebook calls ``stages.<STAGE>.run``.

Execution settings are environment variables, not parameters, so changing them does not
invalidate results (:mod:`diffusion_attribution.pipeline.workspace`): ``DA_DEVICE`` (torch device,
default ``cpu``), ``DA_THREADS`` (torch threads, default all cores); retraining jobs also read
``DA_EXECUTOR`` and friends (:mod:`diffusion_attribution.evaluation.retraining`).

Progress: what a notebook's cells print reaches this process's stdout and stderr as it is
printed (papermill's ``stdout_file`` / ``stderr_file``), one plain line per line or per
carriage return, so a tqdm bar reads as one line per redraw in a terminal or a CI log. In the
kernel ``tqdm.auto.tqdm`` is ``tqdm.std.tqdm`` (set at kernel start, see :data:`KERNEL_ARGS`),
so a bar is text, not a notebook widget that never reaches the terminal; ``TQDM_MININTERVAL=5``
spaces the redraws of bars that do not set their own interval (the library's set 2-5 s). The kernel's transport is encrypted with CurveZMQ keys the kernel manager
provisions where pyzmq supports it, which is also what keeps ipykernel's "running over TCP
without encryption" warning out of every stage's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from diffusion_attribution.core.config import ConfigError, load_config
from diffusion_attribution.core.io import atomic_write_text, remove_partial_writes
from diffusion_attribution.pipeline import stages


def notebook(name: str) -> str:
    """The notebook file of stage ``name``."""
    return stages.module(name).NOTEBOOK


class LineWriter:
    """A file-like object that writes the text it is given to ``out`` as whole lines.

    A carriage return ends a line as a newline does (tqdm redraws a bar with ``\\r``), so each
    redraw becomes one plain line instead of an ever-growing one; empty redraws are dropped.
    Text after the last line end is held until the next line end or :meth:`close`.
    """

    _LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n)")

    def __init__(self, out: TextIO):
        self.out = out
        self.pending = ""
        self.last_end = "\n"

    def write(self, text: str) -> int:
        written = len(text)
        text = self.pending + text
        consumed = 0
        for match in self._LINE.finditer(text):
            line, end = match.groups()
            consumed = match.end()
            # "\r" alone with nothing before it, or "\n" right after a "\r": no line of its own
            if line or (end != "\r" and self.last_end != "\r"):
                self.out.write(line + "\n")
            self.last_end = end
        self.pending = text[consumed:]
        self.out.flush()
        return written

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self.pending:
            self.out.write(self.pending + "\n")
            self.pending = ""
        self.out.flush()


#: Extra arguments of the stage notebook's kernel: at start it makes ``tqdm.auto`` text (binding
#: no name in the notebook's namespace), as in a terminal.
KERNEL_ARGS = [
    '--IPKernelApp.exec_lines=__import__("tqdm.auto").auto.tqdm = __import__("tqdm.std").std.tqdm'
]


def kernel_config():
    """Traitlets config for the notebook's kernel manager: CurveZMQ transport encryption where
    pyzmq has it (the kernelspec of ipykernel declares support; "auto" falls back to plain TCP
    for one that does not)."""
    # imported here: the runner starts without the notebook machinery until a stage runs
    import zmq
    from traitlets.config import Config

    if not zmq.has("curve"):
        return Config()
    return Config({"KernelManager": {"transport_encryption": "auto"}})


def execute(source: str | Path, out: str | Path, parameters: dict, cwd: str | Path) -> None:
    """Execute the notebook ``source`` into ``out`` with papermill, streaming what its cells
    print to this process's stdout / stderr as plain lines (:class:`LineWriter`)."""
    # imported here: papermill (and the kernel machinery) is heavy, and only a stage needs it
    import papermill

    # The "python3" kernel must be this interpreter, not a user-level kernelspec elsewhere.
    kernels = Path(sys.prefix) / "share" / "jupyter"
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(kernels), os.environ.get("JUPYTER_PATH", "")) if p
    )
    # tqdm bars the library does not create (its own pass mininterval=5) redraw as rarely.
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    stdout, stderr = LineWriter(sys.stdout), LineWriter(sys.stderr)
    try:
        papermill.execute_notebook(
            str(source),
            str(out),
            parameters=parameters,
            cwd=str(cwd),
            kernel_name="python3",
            progress_bar=False,
            stdout_file=stdout,
            stderr_file=stderr,
            config=kernel_config(),
            extra_arguments=KERNEL_ARGS,
        )
    finally:
        stdout.close()
        stderr.close()


#: Seconds a temporary file must be idle before it counts as left by a killed SLURM job (one
#: that outlived its driver may still be writing).
SLURM_PARTIAL_AGE_S = 900.0


def remove_partial_writes_of(name: str, root: str | Path = ".") -> list[Path]:
    """:func:`~diffusion_attribution.core.io.remove_partial_writes` in what stage ``name`` resumes
    from: its persistent outputs and its caches (``.cache/<name>/``, ``.cache/jobs/<name>-*``)."""
    root = Path(root)
    age = SLURM_PARTIAL_AGE_S if os.environ.get("DA_EXECUTOR") == "slurm" else 0.0
    folders = [root / p for p in stages.module(name).PERSIST]
    folders += [root / ".cache" / name, *sorted((root / ".cache" / "jobs").glob(f"{name}-*"))]
    return [p for folder in folders for p in remove_partial_writes(folder, age)]


def run_stage(name: str, params_file: str = "params.yaml", root: str | Path = ".") -> Path:
    """Validate ``params_file`` and execute the notebook of stage ``name``; returns its path."""
    if name not in stages.NAMES:
        raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(stages.NAMES)}")
    root = Path(root)
    config = load_config(root / params_file)
    nb = notebook(name)
    out = root / "reports" / "notebooks" / nb
    out.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_partial_writes_of(name, root)
    if removed:
        print(f"stage {name}: removed {len(removed)} partial files an interrupted run left")
    start = time.perf_counter()
    execute(root / "notebooks" / nb, out, {"params": config.model_dump(mode="json")}, cwd=root)
    seconds = time.perf_counter() - start
    print(f"stage {name}: {seconds:.1f} s, executed notebook {out}")
    write_stage_record(root, name, seconds)
    return out


#: Where each stage's last wall time and peak memory are recorded (:func:`write_stage_record`).
STAGE_RECORDS = Path("reports") / "stages"


def write_stage_record(root: Path, name: str, seconds: float) -> Path:
    """Append this run of stage ``name`` to ``reports/stages/<name>.json``: its wall time, the
    peak resident memory of its largest finished child process (the notebook's kernel or a
    worker), when it finished and its thread count (the last 20 runs are kept, so a rerun that
    found its work cached does not hide what computing it cost). Not a DVC output: timings are
    facts of runs, not results; the shipped bundle's manifest reads them
    (:mod:`diffusion_attribution.pipeline.bundle`)."""
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    run = {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": os.environ.get("DA_THREADS", str(os.cpu_count())),
        # which parameters the run had: a record of another profile's run is told apart
        "params_sha256": hashlib.sha256((root / "params.yaml").read_bytes()).hexdigest(),
    }
    path = root / STAGE_RECORDS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = stage_runs(path)[-19:] + [run]
    atomic_write_text(json.dumps({"stage": name, "runs": runs}, indent=1) + "\n", path)
    return path


def stage_runs(path: Path) -> list[dict]:
    """The runs a stage record holds, oldest first (a record of one run written before
    records kept a history counts as that run)."""
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    if "runs" in record:
        return list(record["runs"])
    return [
        {k: record[k] for k in ("seconds", "peak_rss_gib", "finished", "threads") if k in record}
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            f"usage: python -m diffusion_attribution.pipeline.runner STAGE  (one of {', '.join(stages.NAMES)})",
            file=sys.stderr,
        )
        return 2
    try:
        run_stage(args[0])
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
