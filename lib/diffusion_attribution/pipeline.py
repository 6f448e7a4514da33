"""Runs one pipeline stage: validate ``params.yaml``, then execute the stage's notebook.

``python -m diffusion_attribution.pipeline STAGE`` is the command of every stage in
``dvc.yaml``. It validates the whole parameters file first (a bad value stops here with one
message naming the key, nothing computed), then runs the stage's notebook
(:mod:`diffusion_attribution.stages`) with papermill, passing the validated parameters as the
notebook's one parameter ``params`` (visible in the executed notebook) and writing the executed
copy to ``reports/notebooks/``. The notebook calls ``stages.<STAGE>.run``.

Execution settings are environment variables, not parameters, so changing them does not
invalidate results (:mod:`diffusion_attribution.workspace`): ``DA_DEVICE`` (torch device,
default ``cpu``), ``DA_THREADS`` (torch threads, default all cores); retraining jobs also read
``DA_EXECUTOR`` and friends (:mod:`diffusion_attribution.retrain`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import stages
from .config import ConfigError, load_config


def notebook(name: str) -> str:
    """The notebook file of stage ``name``."""
    return stages.module(name).NOTEBOOK


def run_stage(name: str, params_file: str = "params.yaml", root: str | Path = ".") -> Path:
    """Validate ``params_file`` and execute the notebook of stage ``name``; returns its path."""
    import papermill

    if name not in stages.NAMES:
        raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(stages.NAMES)}")
    root = Path(root)
    config = load_config(root / params_file)
    nb = notebook(name)
    out = root / "reports" / "notebooks" / nb
    out.parent.mkdir(parents=True, exist_ok=True)
    # The "python3" kernel must be this interpreter, not a user-level kernelspec elsewhere.
    kernels = Path(sys.prefix) / "share" / "jupyter"
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(kernels), os.environ.get("JUPYTER_PATH", "")) if p
    )
    start = time.perf_counter()
    papermill.execute_notebook(
        str(root / "notebooks" / nb),
        str(out),
        parameters={"params": config.model_dump(mode="json")},
        cwd=str(root),
        kernel_name="python3",
        progress_bar=False,
        log_output=True,
    )
    print(f"stage {name}: {time.perf_counter() - start:.1f} s, executed notebook {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            f"usage: python -m diffusion_attribution.pipeline STAGE  (one of {', '.join(stages.NAMES)})",
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
