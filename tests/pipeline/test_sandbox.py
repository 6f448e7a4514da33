"""The sandbox copies the repository for a profile, and names the profiles before copying."""

import os
from pathlib import Path

import pytest

from diffusion_attribution.pipeline import sandbox

ROOT = Path(__file__).resolve().parents[2]


def test_sandbox_names_the_profiles_before_copying(tmp_path, capsys):
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
