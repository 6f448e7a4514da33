"""Runs one pipeline stage: validate ``params.yaml``, then execute the stage's notebook.

``python -m diffusion_attribution.pipeline STAGE`` is the command of every stage in
``dvc.yaml``. It validates the whole parameters file first (a bad value stops here with one
message naming the key, nothing computed), then runs ``notebooks/<notebook>`` with papermill,
passing the stage's parameter sections as notebook parameters (visible in the executed
notebook) and writing the executed copy to ``reports/notebooks/``.

Execution settings are environment variables, not parameters, so changing them does not
invalidate results:

- ``DA_DEVICE``: torch device for the stage (default ``cpu``);
- ``DA_THREADS``: torch threads for the stage (default: all cores).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, load_config


@dataclass(frozen=True)
class Stage:
    notebook: str
    sections: tuple[str, ...]


#: Stage name -> notebook and the ``params.yaml`` sections it reads. ``dvc.yaml`` lists the
#: same sections under each stage's ``params`` (a test checks that the two agree).
STAGES: dict[str, Stage] = {
    "data": Stage("01_data.ipynb", ("data",)),
    "train": Stage("02_train.ipynb", ("model", "diffusion", "train")),
    "sample": Stage("03_sample.ipynb", ("diffusion", "sample")),
    "curvature": Stage("04_curvature.ipynb", ("diffusion", "curvature", "influence")),
    "influence": Stage("05_influence.ipynb", ("diffusion", "curvature", "influence")),
    "baselines": Stage("06_baselines.ipynb", ("diffusion", "influence", "trak")),
    "retrain": Stage("07_retrain.ipynb", ("model", "diffusion", "train", "retrain")),
    "measure": Stage("08_measure.ipynb", ("diffusion", "influence", "measure")),
    "evaluate": Stage("09_evaluate.ipynb", ("curvature", "influence")),
    "observations": Stage("11_observations.ipynb", ("curvature", "influence")),
    "counterfactual": Stage(
        "10_counterfactual.ipynb",
        ("model", "diffusion", "train", "influence", "measure", "counterfactual"),
    ),
    "claims": Stage("12_claims.ipynb", ()),
}


def execution_settings() -> dict[str, object]:
    """Device and thread count from the environment (see the module docstring)."""
    return {
        "device": os.environ.get("DA_DEVICE", "cpu"),
        "threads": int(os.environ.get("DA_THREADS", "0")) or os.cpu_count() or 1,
    }


def run_stage(name: str, params_file: str = "params.yaml", root: str | Path = ".") -> Path:
    """Validate ``params_file`` and execute the notebook of stage ``name``; returns its path."""
    import papermill

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    root = Path(root)
    config = load_config(root / params_file)
    stage = STAGES[name]
    parameters = {s: getattr(config, s).model_dump(mode="json") for s in stage.sections}
    parameters.update(execution_settings())
    out = root / "reports" / "notebooks" / stage.notebook
    out.parent.mkdir(parents=True, exist_ok=True)
    # The "python3" kernel must be this interpreter, not a user-level kernelspec elsewhere.
    kernels = Path(sys.prefix) / "share" / "jupyter"
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(kernels), os.environ.get("JUPYTER_PATH", "")) if p
    )
    start = time.perf_counter()
    papermill.execute_notebook(
        str(root / "notebooks" / stage.notebook),
        str(out),
        parameters=parameters,
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
            f"usage: python -m diffusion_attribution.pipeline STAGE  (one of {', '.join(STAGES)})",
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
