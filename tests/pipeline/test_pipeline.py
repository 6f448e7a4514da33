"""The pipeline's wiring: notebooks stripped and parameterised, dvc.yaml agrees with the runner,
a stage's output reaches the terminal. The smoke profile end to end is tests/test_smoke_run.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from diffusion_attribution.pipeline import dvcgraph, stages
from diffusion_attribution.pipeline.runner import notebook

ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: strip outputs"
            )
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    # no experiment value of its own: papermill passes params.yaml, or it is read by hand
    code = [
        line for line in tagged[0].source.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert code == ["params = None"], f"{path.name}: the parameters cell holds values"
    # thin: one stage call, figures and prose; no logic of its own
    lines = [
        ln for c in nb.cells if c.cell_type == "code" for ln in c.source.splitlines() if ln.strip()
    ]
    assert len(lines) <= 40, f"{path.name}: {len(lines)} code lines"
    assert not any(ln.lstrip().startswith(("def ", "class ", "for ", "while ")) for ln in lines), (
        path.name
    )


def test_dvc_yaml_is_derived_from_the_stages():
    """dvc.yaml is what the stage modules imply: every library file a stage imports (followed
    through imports), the params keys it reads, its notebook and outputs."""
    assert (ROOT / "dvc.yaml").read_text() == dvcgraph.dvc_yaml(), (
        "dvc.yaml is stale: run `python -m diffusion_attribution.pipeline.dvcgraph > dvc.yaml`"
    )
    for name in stages.NAMES:
        spec = DVC_YAML["stages"][name]
        assert spec["cmd"] == f"python -m diffusion_attribution.pipeline.runner {name}"
        assert f"notebooks/{notebook(name)}" in spec["deps"]
        assert f"lib/diffusion_attribution/stages/{name}.py" in spec["deps"]
        assert not any(d.startswith("reports/") for d in spec["deps"]), (
            "executed notebooks are never deps"
        )
    deps = DVC_YAML["stages"]["curvature"]["deps"]
    for lib in (
        "curvature.py",
        "curvlinops_adapter.py",
        "kronecker.py",
        "ddpm.py",
        "unet.py",
        "train.py",
    ):
        assert f"lib/diffusion_attribution/{lib}" in deps, lib
    assert "lib/diffusion_attribution/influence.py" in DVC_YAML["stages"]["baselines"]["deps"]
    # per key: editing influence.svd_ranks does not refit the curvature
    assert "influence.damping" in DVC_YAML["stages"]["curvature"]["params"]
    assert "influence.svd_ranks" not in DVC_YAML["stages"]["curvature"]["params"]


def test_library_deps_follow_imports(tmp_path, monkeypatch):
    """A module's dependencies are found through its imports, including imports inside
    functions and ``from . import x``; a package module nobody imports is not one."""
    pkg = tmp_path / "diffusion_attribution"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    (pkg / "stages" / "s.py").write_text("from ..a import x\n")
    monkeypatch.setattr(dvcgraph, "LIB", pkg)
    dvcgraph.library_deps.cache_clear()
    try:
        found = {p.name for p in dvcgraph.library_deps("diffusion_attribution.pipeline.stages.s")}
    finally:
        dvcgraph.library_deps.cache_clear()
    assert found == {"s.py", "__init__.py", "a.py", "b.py", "c.py"}


def test_params_read_per_key(tmp_path):
    code = tmp_path / "stage.py"
    code.write_text(
        "def run(config, ws):\n"
        "    icfg, m = config.influence, config.measure\n"
        "    x = config.train.steps + icfg.damping\n"
        "    f(config.model)\n"
        "    g(m.model_dump())\n"
    )
    assert dvcgraph.params_read(code) == {"train.steps", "influence.damping", "model", "measure"}
    code.write_text("def run(config, ws):\n    helper(config)\n")
    with pytest.raises(ValueError, match="pass sections"):
        dvcgraph.params_read(code)
    code.write_text("def run(config, ws):\n    return config.trian\n")
    with pytest.raises(ValueError, match="no section"):
        dvcgraph.params_read(code)


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


def test_sandbox_names_the_profiles_before_copying(tmp_path, capsys):
    from diffusion_attribution.pipeline import sandbox

    with pytest.raises(ValueError, match=r"unknown profile 'smok'; profiles are: .*smoke"):
        sandbox.prepare("smok", tmp_path / "copy", repo=ROOT)
    assert not (tmp_path / "copy").exists()
    assert sandbox.main(["smok", "--dir", str(tmp_path / "copy")]) == 2
    assert "unknown profile 'smok'" in capsys.readouterr().err
    copy = sandbox.prepare("smoke", tmp_path / "copy", repo=ROOT)
    assert (copy / "params.yaml").read_bytes() == (ROOT / "configs" / "smoke.yaml").read_bytes()
    assert (copy / "dvc.yaml").is_file() and (copy / ".git").is_dir()
    assert not (copy / "outputs").exists() and not (copy / ".venv").exists()
    assert sandbox.environment(copy)["PYTHONPATH"].split(os.pathsep)[0] == str(copy / "lib")
