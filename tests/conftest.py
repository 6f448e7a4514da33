"""Shared fixtures: test modules importable by job subprocesses, and a throw-away single-node
SLURM cluster on localhost (``tests/slurm_localhost.sh``), started once per test run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.unet import UNet
from tests.helpers import TINY_4X4, TINY_DIGITS

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def one_thread():
    """One torch thread for the test (timing- and summation-order-sensitive checks), restored
    afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def linear_schedule() -> NoiseSchedule:
    """A short linear noise schedule (20 steps, beta 1e-3 .. 0.2) for the tiny models."""
    return NoiseSchedule.linear(20, 1e-3, 0.2)


@pytest.fixture
def tiny_unet() -> UNet:
    """The 4x4 U-Net of :data:`tests.helpers.TINY_4X4` (every layer type), seeded, float64."""
    torch.manual_seed(0)
    return UNet(TINY_4X4).double()


@pytest.fixture
def digits_unet() -> UNet:
    """The default profile's 8x8 U-Net (:data:`tests.helpers.TINY_DIGITS`), seeded, float32."""
    torch.manual_seed(0)
    return UNet(TINY_DIGITS)


SLURM_SCRIPT = TESTS / "slurm_localhost.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def _python_path() -> str:
    """PYTHONPATH with the repository first, so that a job process unpickles task functions
    defined in test modules (pickled by reference: ``tests.core.test_jobs.write_output``)."""
    rest = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(TESTS.parent), *([rest] if rest else [])])


@pytest.fixture
def tests_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Job subprocesses (submitit's local executor) can import the test modules."""
    monkeypatch.setenv("PYTHONPATH", _python_path())


EXECUTION_SETTINGS = (
    "DA_EXECUTOR", "DA_MAX_PARALLEL", "DA_CLUSTER", "DA_SLURM_PARTITION", "DA_SLURM_TIME_MIN",
    "DA_SLURM_GPUS",
)  # fmt: skip


@pytest.fixture
def no_execution_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the DA_* execution settings (diffusion_attribution.core.jobs) of the caller's shell."""
    for var in EXECUTION_SETTINGS:
        monkeypatch.delenv(var, raising=False)


def _stop_cluster(folder: str) -> None:
    subprocess.run([str(SLURM_SCRIPT), "stop", folder], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A SLURM controller and node on localhost for this test run (config, state and logs in a
    temp dir; clients find it through ``SLURM_CONF``). Skipped when not root, when the binaries
    are missing (``apt-get install slurm-wlm munge``) or when the node is not idle within 20 s.
    While it runs, ``SLURM_CONF`` and ``PYTHONPATH`` (with ``tests/``) are set in this process,
    and so in every job it submits."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (slurmd runs jobs as their users)")
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"SLURM binaries missing: {', '.join(missing)} (apt-get install slurm-wlm munge)"
        )
    folder = tempfile.mkdtemp(prefix="da-slurm-")
    try:
        started = subprocess.run(
            [str(SLURM_SCRIPT), "start", folder], capture_output=True, text=True, timeout=40
        )
    except subprocess.TimeoutExpired:
        _stop_cluster(folder)
        pytest.skip("the local SLURM controller did not come up within 40 s")
    if started.returncode != 0:
        _stop_cluster(folder)
        pytest.skip(f"the local SLURM controller did not come up: {started.stderr[-3000:]}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = str(Path(folder) / "slurm.conf")
    os.environ["PYTHONPATH"] = _python_path()
    try:
        yield SimpleNamespace(folder=Path(folder), conf=os.environ["SLURM_CONF"])
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=60)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.5)
        _stop_cluster(folder)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)
