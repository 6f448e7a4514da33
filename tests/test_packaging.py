"""The library installs and imports without the pipeline's packages: ``pip install
diffusion-attribution`` pulls in no DVC, papermill, submitit, Jupyter or matplotlib (the
``pipeline`` extra has them), and no module below the pipeline layer imports them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

import diffusion_attribution

ROOT = Path(diffusion_attribution.__file__).resolve().parents[2]
LIB = ROOT / "lib" / "diffusion_attribution"
PIPELINE_ONLY = ("dvc", "papermill", "submitit", "jupyter", "nbformat", "ipykernel", "matplotlib")


def requirement_name(spec: str) -> str:
    for sep in "<>=!~[; ":
        spec = spec.split(sep)[0]
    return spec.lower()


def test_pipeline_packages_are_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(d) for d in project["dependencies"]}
    assert core.isdisjoint(PIPELINE_ONLY), sorted(core & set(PIPELINE_ONLY))
    extra = {requirement_name(d) for d in project["optional-dependencies"]["pipeline"]}
    assert set(PIPELINE_ONLY) - {"jupyter"} <= extra | {"jupyter"} and "jupyter" in extra
    assert any("[pipeline]" in d for d in project["optional-dependencies"]["dev"])


def test_the_library_imports_none_of_them() -> None:
    """Every module outside ``pipeline/`` imported in a fresh interpreter."""
    modules = sorted(
        "diffusion_attribution." + ".".join(p.relative_to(LIB).with_suffix("").parts)
        for p in LIB.rglob("*.py")
        if p.relative_to(LIB).parts[0] != "pipeline" and p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {PIPELINE_ONLY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
    assert len(modules) > 20
