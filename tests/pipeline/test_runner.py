"""The stage runner: what a stage's cells print reaches the terminal. The smoke profile end to
end is tests/test_smoke_run.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from diffusion_attribution.pipeline.runner import notebook

ROOT = Path(__file__).resolve().parents[2]


def test_stage_output_reaches_the_terminal(tmp_path):
    """What a stage's cells print reaches the terminal while it runs, tqdm bars (std and
    auto, which would otherwise be a widget) as plain lines (no carriage returns), and
    ipykernel's unencrypted-TCP warning does not."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    cells = [
        nbformat.v4.new_code_cell("params = None", metadata={"tags": ["parameters"]}),
        # the kernel's set-up binds no name in the notebook
        nbformat.v4.new_code_cell("print('namespace clean:', 'tqdm' not in dir())"),
        nbformat.v4.new_code_cell(
            "import sys\n"
            "from tqdm.std import tqdm\n"
            "print('hello from a cell')\n"
            "print('a warning line', file=sys.stderr)\n"
            "for _ in tqdm(range(3), desc='bar', mininterval=0):\n"
            "    pass"
        ),
        nbformat.v4.new_code_cell(
            "from tqdm.auto import tqdm\n"
            "for _ in tqdm(range(3), desc='auto', mininterval=0):\n"
            "    pass"
        ),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["kernelspec"] = kernelspec
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / notebook("data"))
    code = (
        "from diffusion_attribution.pipeline.runner import run_stage; run_stage('data', root='.')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "hello from a cell\n" in run.stdout, run.stdout
    assert "a warning line\n" in run.stderr, run.stderr
    bar = [line for line in run.stderr.splitlines() if line.startswith("bar:")]
    assert bar and bar[-1].startswith("bar: 100%") and "\r" not in run.stderr, run.stderr
    auto = [line for line in run.stderr.splitlines() if line.startswith("auto:")]
    assert auto and auto[-1].startswith("auto: 100%"), run.stderr
    assert "namespace clean: True\n" in run.stdout, run.stdout
    assert "without encryption" not in run.stdout + run.stderr, run.stderr
    assert (tmp_path / "reports" / "notebooks" / notebook("data")).exists()
    # the stage's wall time and peak memory are recorded for the shipped bundle's manifest
    record = json.loads((tmp_path / "reports" / "stages" / "data.json").read_text())
    (first,) = record["runs"]
    assert record["stage"] == "data" and first["seconds"] > 0
    assert 0.01 < first["peak_rss_gib"] < 64  # the kernel's: a Python process with torch
    again = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0
    runs = json.loads((tmp_path / "reports" / "stages" / "data.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0] == first  # the history is kept
