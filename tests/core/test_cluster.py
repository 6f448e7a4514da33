"""The cluster file (diffusion_attribution.core.cluster): keys and values checked, overrides
per task name, the DA_SLURM_* variables on top."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_attribution.core.cluster import load_cluster, slurm_settings

pytestmark = pytest.mark.usefixtures("no_execution_settings")


def test_cluster_file_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "partition: gpu\naccount: proj\nmem_gb: 16\ncpus_per_task: 4\ntime_min: 60\n"
        "setup: [module load cuda, source venv/bin/activate]\n"
        "overrides:\n  influence: {cpus_per_task: 8, gpus_per_task: 1}\n"
    )
    assert load_cluster(path)["overrides"] == {
        "influence": {"cpus_per_task": 8, "gpus_per_task": 1}
    }
    retrain = slurm_settings("retrain", path)
    assert (retrain["cpus_per_task"], retrain["gpus_per_task"], retrain["time_min"]) == (4, 0, 60)
    assert retrain["setup"] == ["module load cuda", "source venv/bin/activate"]
    influence = slurm_settings("influence", path)
    assert (influence["cpus_per_task"], influence["gpus_per_task"]) == (8, 1)
    # the DA_SLURM_* variables win over the file and its overrides
    monkeypatch.setenv("DA_SLURM_GPUS", "2")
    monkeypatch.setenv("DA_SLURM_PARTITION", "big")
    assert slurm_settings("influence", path)["gpus_per_task"] == 2
    assert slurm_settings("retrain", path)["partition"] == "big"
    # without a file: the defaults
    assert slurm_settings("retrain")["time_min"] == 240

    bad = {
        "partion: gpu\n": r"unknown key 'partion'; allowed: partition, account, qos",
        "overrides:\n  retrain: {gpu: 1}\n": r"overrides\.retrain: unknown key 'gpu'; allowed:",
        "overrides:\n  retrain: {overrides: {}}\n": r"overrides\.retrain: unknown key 'overrides'",
        "time_min: 1h\n": r"time_min must be int, got '1h'",
        "cpus_per_task: 0\n": r"cpus_per_task must be > 0",
        "setup: module load cuda\n": r"setup must be list",
        "setup: [1]\n": r"setup must be a list of shell commands",
        "- partition\n": r"expected a mapping",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_cluster(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_cluster(tmp_path / "missing.yaml")
    monkeypatch.setenv("DA_SLURM_TIME_MIN", "soon")
    with pytest.raises(ValueError, match="DA_SLURM_TIME_MIN must be int"):
        slurm_settings("retrain")
