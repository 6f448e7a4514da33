"""The pipeline's wiring: notebooks stripped and parameterised, dvc.yaml agrees with the runner,
and the smoke profile runs end to end with `dvc repro` in a temporary copy of the repository."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from diffusion_attribution import dvcgraph, stages
from diffusion_attribution.pipeline import notebook

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
        "dvc.yaml is stale: run `python -m diffusion_attribution.dvcgraph > dvc.yaml`"
    )
    for name in stages.NAMES:
        spec = DVC_YAML["stages"][name]
        assert spec["cmd"] == f"python -m diffusion_attribution.pipeline {name}"
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
        found = {p.name for p in dvcgraph.library_deps("diffusion_attribution.stages.s")}
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


def kill_retrain_half_way(repo: Path, env: dict, dvc: list[str]) -> dict[Path, tuple[int, bytes]]:
    """Start `dvc repro retrain` (one job at a time), SIGKILL its whole process group once the
    first retrained model is saved; returns the models finished by then (mtime, bytes)."""
    models = repo / "outputs" / "retrain" / "models"
    proc = subprocess.Popen(
        [*dvc, "repro", "retrain"],
        cwd=repo,
        env={**env, "DA_MAX_PARALLEL": "1"},
        start_new_session=True,  # its own process group: dvc, papermill's kernel, submitit jobs
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(models.glob("*.pt")):
            assert proc.poll() is None, "dvc repro retrain exited before any model was saved"
            assert time.monotonic() < deadline, "no retrained model within 300 s"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # The notebook's kernel runs in a session of its own; it exits within a second of losing
    # its parent, and the training job it started exits with it (retrain.exit_with_owner).
    time.sleep(3)
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in models.glob("*.pt")}
    time.sleep(2)
    assert sorted(models.glob("*.pt")) == sorted(finished), "a job outlived the killed stage"
    assert 1 <= len(finished) < 10, "the kill should land half-way through the retraining"
    return finished


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path):
    """`dvc repro` on the smoke profile, after a first attempt killed half-way through the
    retraining: no finished model is lost or retrained, every output exists, every notebook
    ran cleanly, and a second `dvc repro` finds everything up to date."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    shutil.copy(repo / "configs" / "smoke.yaml", repo / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "DA_THREADS": "2",
        "HOME": str(tmp_path),
        # the copy's own library, not the checkout's editable install: edits below must count
        "PYTHONPATH": str(repo / "lib"),
    }
    dvc = [sys.executable, "-m", "dvc"]
    start = time.perf_counter()
    finished = kill_retrain_half_way(repo, env, dvc)
    run = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    print(f"smoke dvc repro (with a killed first attempt): {seconds:.1f} s")
    # the rerun kept every model finished before the kill and retrained none of them
    for path, (mtime, data) in finished.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path.name
    retrain = json.loads((repo / "metrics" / "retrain.json").read_text())
    # and one reference per seed, and the independent-seed models
    total = (retrain["num_subsets"] + 1) * retrain["num_seeds"] + retrain["independent_subsets"]
    assert retrain["models_trained_this_run"] == total - len(finished)
    assert len(list((repo / "outputs" / "retrain" / "models").glob("*.pt"))) == total
    for out in declared_outputs():
        assert (repo / out).exists(), f"declared output missing: {out}"
    for name in stages.NAMES:
        nb = nbformat.read(repo / "reports" / "notebooks" / notebook(name), as_version=4)
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                assert o.get("output_type") != "error", (
                    f"{notebook(name)}: {o.get('ename')}: {o.get('evalue')}"
                )
    assert json.loads((repo / "metrics" / "train.json").read_text())["steps"] == 60
    again = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change" in again.stdout, again.stdout
    # The pipeline's stages (data.dvc, the CIFAR-10 archive for paper scale, is absent offline).
    status = subprocess.run(
        [*dvc, "status", "dvc.yaml"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert "up to date" in status.stdout, status.stdout

    # A comment in the training code reruns stages (DVC hashes bytes) but recomputes nothing
    # expensive: results are named by the code with comments and docstrings stripped.
    ddpm = repo / "lib" / "diffusion_attribution" / "ddpm.py"
    ddpm.write_text(ddpm.read_text() + "\n# a comment changes no result\n")
    models_before = sorted(p.name for p in (repo / "outputs" / "retrain" / "models").glob("*.pt"))
    run = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "Running stage 'retrain'" in run.stdout  # it did rerun ...
    metrics = {
        n: json.loads((repo / "metrics" / f"{n}.json").read_text())
        for n in ("retrain", "measure", "counterfactual")
    }
    assert metrics["retrain"]["models_trained_this_run"] == 0  # ... and trained nothing
    assert metrics["measure"]["models_measured_this_run"] == 0
    assert metrics["counterfactual"]["models_trained_this_run"] == 0
    assert metrics["counterfactual"]["models_measured_this_run"] == 0
    assert (
        sorted(p.name for p in (repo / "outputs" / "retrain" / "models").glob("*.pt"))
        == models_before
    )
    assert not (repo / ".cache" / "stale").exists()

    # An experiment with another recipe retrains, keeps the old models aside, and `dvc exp
    # show` lists the metrics of both runs (they are tracked, not git-ignored copies).
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "smoke"], cwd=repo, env=env, check=True)
    steps = yaml.safe_load((repo / "params.yaml").read_text())["retrain"]["steps"]
    exp = subprocess.run(
        [
            *dvc,
            "exp",
            "run",
            "-S",
            f"retrain.steps={steps + 10}",
            "-S",
            "retrain.epoch_matched=false",
            "-n",
            "longer",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert exp.returncode == 0, exp.stdout[-4000:] + exp.stderr[-4000:]
    stale = list((repo / ".cache" / "stale" / "retrain").rglob("*.pt"))
    assert sorted(p.name for p in stale) == models_before, "the old models were not kept aside"
    retrain = json.loads((repo / "metrics" / "retrain.json").read_text())
    assert retrain["models_trained_this_run"] == len(models_before)
    show = subprocess.run(
        [*dvc, "exp", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    steps_seen = set()
    for rev in shown:
        runs = [rev, *[e for x in rev.get("experiments") or [] for e in x.get("revs", [])]]
        for r in runs:
            data = r.get("data") or {}
            lds = data.get("metrics", {}).get("metrics/lds.json", {}).get("data", {})
            if lds:
                steps_seen.add(data["params"]["params.yaml"]["data"]["retrain"]["steps"])
    assert {steps, steps + 10} <= steps_seen, show.stdout[:2000]


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
    code = "from diffusion_attribution.pipeline import run_stage; run_stage('data', root='.')"
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
