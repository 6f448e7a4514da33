"""``dvc.yaml`` is derived from the stage modules: the library files each stage imports
(followed through imports), the parameter keys it reads, its notebook and outputs."""

from pathlib import Path

import pytest
import yaml

from diffusion_attribution.pipeline import dvcgraph, stages
from diffusion_attribution.pipeline.runner import notebook

ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())


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
        assert f"lib/diffusion_attribution/pipeline/stages/{name}.py" in spec["deps"]
        assert not any(d.startswith("reports/") for d in spec["deps"]), (
            "executed notebooks are never deps"
        )
    deps = DVC_YAML["stages"]["curvature"]["deps"]
    for lib in (
        "curvature/kfac.py",
        "curvature/hooks.py",
        "curvature/kronecker.py",
        "diffusion/ddpm.py",
        "diffusion/unet.py",
        "diffusion/training.py",
    ):
        assert f"lib/diffusion_attribution/{lib}" in deps, lib
    assert (
        "lib/diffusion_attribution/attribution/influence.py"
        in DVC_YAML["stages"]["baselines"]["deps"]
    )
    # per key: editing influence.svd_ranks does not refit the curvature
    assert "influence.damping" in DVC_YAML["stages"]["curvature"]["params"]
    assert "influence.svd_ranks" not in DVC_YAML["stages"]["curvature"]["params"]


def test_library_deps_follow_imports(tmp_path, monkeypatch):
    """A module's dependencies are found through its imports, including imports inside
    functions and ``from . import x``; a package module nobody imports is not one."""
    pkg = tmp_path / "diffusion_attribution"
    (pkg / "pipeline" / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline" / "__init__.py").write_text("")
    (pkg / "pipeline" / "stages" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    (pkg / "pipeline" / "stages" / "s.py").write_text("from ...a import x\n")
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


#: Stages that run no curvature or attribution code, and the library folders they must not
#: depend on: editing the K-FAC fit or a score must not rerun them.
UPSTREAM = ("data", "train", "sample", "retrain", "measure")
NOT_RUN_UPSTREAM = (
    "lib/diffusion_attribution/curvature/",
    "lib/diffusion_attribution/attribution/",
)


@pytest.mark.parametrize("name", UPSTREAM)
def test_a_stage_depends_only_on_the_code_it_runs(name):
    deps = dvcgraph.stage_spec(name)["deps"]
    assert not [d for d in deps if d.startswith(NOT_RUN_UPSTREAM)], name
    assert "lib/diffusion_attribution/pipeline/workspace.py" in deps
    assert "lib/diffusion_attribution/diffusion/datasets.py" in deps
