"""The pipeline's wiring: notebooks stripped and parameterised, dvc.yaml agrees with the runner,
and the smoke profile runs end to end with `dvc repro` in a temporary copy of the repository."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from diffusion_attribution.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
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


def test_dvc_stages_match_the_runner():
    stages = DVC_YAML["stages"]
    assert set(STAGES) <= set(stages)
    for name, stage in STAGES.items():
        spec = stages[name]
        assert spec["cmd"] == f"python -m diffusion_attribution.pipeline {name}"
        assert f"notebooks/{stage.notebook}" in spec["deps"]
        assert sorted(spec["params"]) == sorted(stage.sections), name
        outs = [o if isinstance(o, str) else next(iter(o)) for o in spec["outs"]]
        assert f"reports/notebooks/{stage.notebook}" in outs
        assert not any(d.startswith("reports/") for d in spec["deps"]), (
            "executed notebooks are never deps"
        )


def declared_outputs():
    for spec in DVC_YAML["stages"].values():
        for section in ("outs", "metrics", "plots"):
            for o in spec.get(section, []):
                yield o if isinstance(o, str) else next(iter(o))


def copy_repo(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path):
    """`dvc repro` on the smoke profile: every output exists, every notebook ran cleanly,
    and a second `dvc repro` finds everything up to date."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    shutil.copy(repo / "configs" / "smoke.yaml", repo / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "DA_THREADS": "2",
        "HOME": str(tmp_path),
    }
    dvc = [sys.executable, "-m", "dvc"]
    start = time.perf_counter()
    run = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    print(f"smoke dvc repro: {seconds:.1f} s")
    for out in declared_outputs():
        assert (repo / out).exists(), f"declared output missing: {out}"
    for stage in STAGES.values():
        nb = nbformat.read(repo / "reports" / "notebooks" / stage.notebook, as_version=4)
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                assert o.get("output_type") != "error", (
                    f"{stage.notebook}: {o.get('ename')}: {o.get('evalue')}"
                )
    assert json.loads((repo / "metrics" / "train.json").read_text())["steps"] == 60
    again = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change" in again.stdout, again.stdout
    # The pipeline's stages (data.dvc, the CIFAR-10 archive for paper scale, is absent offline).
    status = subprocess.run(
        [*dvc, "status", "dvc.yaml"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert "up to date" in status.stdout, status.stdout
