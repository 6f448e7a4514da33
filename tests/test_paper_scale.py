"""Paper scale on a CPU: every stage of the ``cifar2`` profile with the Ho et al. U-Net.

``test_cifar2_dry_run`` runs the whole pipeline in-process on a tiny archive in the official
CIFAR-10 binary format, with only the counts that make it CPU-sized overridden. It proves that
no stage assumes 8x8 images, one channel or a small model; it says nothing about accuracy.

- ``[ho-35.7M]``: the profile's model section untouched (Ho et al.'s U-Net, 35.7 M parameters,
  32x32x3). On two CPU cores this takes ~5.5 min and 6.5 GiB peak in one process (measured:
  5 min 17 s, 6,852,016 kB maximum RSS), a third of it the profile's float32
  eigendecompositions of the 226 Kronecker factors (sizes up to 4608), decomposed one layer at
  a time into the shard folder; it is marked ``paper_scale`` and left out of the default run:
  ``pytest -m paper_scale``.
- ``[ho-width32]``: the same architecture (channel multipliers, two residual blocks, attention
  at 16x16, dropout, 32 groups) at a quarter of the width (base 32 channels, 2.2 M parameters), in
  the default run: every stage at 32x32x3 with four resolutions, in about two minutes.

``test_gpu_script_tiny`` runs ``benchmarks/gpu_paper_scale.py --tiny`` on the CPU.
"""

from __future__ import annotations

import io
import json
import math
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml

from diffusion_attribution.attribution.scores import ScoreSet
from diffusion_attribution.core.config import parse_config
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.pipeline import stages
from diffusion_attribution.pipeline.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]

#: Records per class in each of the six archive members (5 train batches + test batch).
PER_CLASS_PER_BATCH = 4


def write_cifar_archive(path: Path, per_class: int = PER_CLASS_PER_BATCH, seed: int = 0) -> None:
    """A small ``cifar-10-binary.tar.gz`` in the official layout: ``cifar-10-batches-bin/``
    with ``data_batch_1..5.bin`` and ``test_batch.bin``, each record 1 label byte + 3072 pixel
    bytes (1024 red, 1024 green, 1024 blue, row-major 32x32). Pixels are a class-dependent
    colour gradient plus noise, so the classes differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    members = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name in members:
            if name.endswith(".txt"):
                data = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"
            else:
                records = []
                for label in np.repeat(np.arange(10), per_class):
                    base = np.stack(
                        [(xx * 8 + label * 25) % 256, (yy * 8) % 256, np.full_like(xx, label * 25)]
                    )
                    noise = rng.integers(-20, 21, size=base.shape)
                    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                    records.append(np.concatenate([[label], pixels.reshape(-1)]).astype(np.uint8))
                data = np.stack(records).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cpu_sized_cifar2(base_channels: int = 128) -> dict:
    """``configs/cifar2.yaml`` with only its counts cut to CPU size; ``model`` untouched but
    for ``base_channels`` when another width is asked for."""
    raw = yaml.safe_load((ROOT / "configs" / "cifar2.yaml").read_text())
    raw["model"]["base_channels"] = base_channels
    model = dict(raw["model"])
    raw["data"].update(cifar2_size=8)
    raw["diffusion"].update(num_timesteps=8)
    raw["train"].update(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2)
    raw["sample"].update(num_samples=2, batch_size=2)
    # One variant: a fitted K-FAC of this model holds ~3.1 GB (float32 factors and eigenbases,
    # curvature.KFAC), and the influence stage loads every variant at once.
    raw["curvature"].update(variants=["mc_expand"], num_draws=1, batch_size=8)
    raw["influence"].update(
        train_draws=1,
        query_draws=1,
        timesteps=[2, 5],
        damping_sweep=[1e-8, 1e-3],
        svd_ranks=[1],
        batch_size=4,
    )
    raw["trak"].update(projection_dim=64, relative_dampings=[1e-2, 1.0])
    # 4 subsets: the held-out damping of evaluate splits them into two folds of >= 2
    raw["retrain"].update(num_subsets=4, num_seeds=2, steps=2)
    raw["measure"].update(num_queries=2, draws=2, timestep_draws=1)
    # 1 and 2 of the 8 images (the profile's 2% and 10% would remove none of them)
    raw["counterfactual"].update(num_queries=1, fractions=[0.125, 0.25])
    if raw["model"] != model:
        raise AssertionError("the dry run must keep the profile's model section")
    return raw


def declared(name: str) -> list[str]:
    module = stages.module(name)
    figures = [f"reports/figures/{f}" for f in module.FIGURES]
    return [*module.OUTS, *module.METRICS, *figures]


#: What the notebooks' figure cells use besides the stage, its result and the workspace.
NOTEBOOK_NAMES = {"display": lambda *objects, **kwargs: None, "Markdown": str}


def figure_cells(name: str) -> list[str]:
    """The code cells of stage ``name``'s notebook that draw and save its figures."""
    nb = nbformat.read(ROOT / "notebooks" / stages.module(name).NOTEBOOK, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and "save_figure" in c.source]


def finite_scores(ws: Workspace) -> int:
    checked = 0
    scores = ScoreSet.load(ws.path(ws.BASELINE_SCORES))
    for key, s in scores.scores.items():
        assert s.shape == (2, 8), (key, tuple(s.shape))
        if key.precision == "float16":
            continue  # traker's float16 pipeline may overflow by design (trak.py, Fig. 18)
        assert torch.isfinite(s).all(), f"non-finite scores: {key}"
        checked += 1
    return checked


#: Peak resident memory of the dry run (measured: 6.5 GiB while the K-FAC of 35.7 M parameters
#: is eigendecomposed in float32 and then loaded by the influence stage), plus a margin.
NEEDS_GIB = 8


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB (infinite where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


@pytest.mark.parametrize(
    "width",
    [
        pytest.param(32, id="ho-width32"),
        pytest.param(128, id="ho-35.7M", marks=pytest.mark.paper_scale),
    ],
)
def test_cifar2_dry_run(width, tmp_path, monkeypatch):
    if width == 128 and available_gib() < NEEDS_GIB:
        pytest.skip(
            f"the paper-scale dry run needs ~{NEEDS_GIB} GiB free, {available_gib():.1f} GiB available"
        )
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.setenv("DA_THREADS", "2")
    monkeypatch.setenv("DA_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)  # a relative archive path must not depend on the cwd
    root = tmp_path / "run"
    write_cifar_archive(root / "data" / "cifar-10-binary.tar.gz")
    config = parse_config(cpu_sized_cifar2(width), "cifar2 (CPU-sized counts)")
    assert config.model.base_channels == width and config.model.channel_mults == (1, 2, 2, 2)
    ws = Workspace(root, device="cpu", threads=2)
    ws.set_threads()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = {}
    for name in stages.NAMES:
        module = stages.module(name)
        start = time.perf_counter()
        result = module.run(config, ws)
        for cell in figure_cells(name):  # the notebook's own figure code
            exec(cell, {"stage": module, "result": result, "ws": ws, **NOTEBOOK_NAMES})
            plt.close("all")
        seconds[name] = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"stage {name}: {seconds[name]:.1f} s (peak RSS so far {rss:.1f} GiB)", flush=True)
        for out in declared(name):
            assert ws.path(out).exists(), f"stage {name}: declared output {out} missing"
        if name == "data":
            dataset = ImageDataset.load(ws.path(ws.TRAIN_SET))
            assert tuple(dataset.images.shape[1:]) == (3, 32, 32)
            assert dataset.name == "cifar2" and len(dataset) == 8
            assert set(dataset.labels.tolist()) == {1, 7}
        elif name == "train":
            expected = 35.7e6 * (width / 128) ** 2  # parameters scale as width^2
            assert math.isclose(result.metrics["num_parameters"], expected, rel_tol=0.05)
            assert math.isfinite(result.metrics["train_diffusion_loss_ema"])
        elif name == "sample":
            samples = torch.load(ws.path(ws.SAMPLES), weights_only=True)
            assert samples["images"].shape == (2, 3, 32, 32)
            assert samples["trajectory"].shape == (9, 2, 3, 32, 32)
        elif name == "baselines":
            assert finite_scores(ws) > 0
        elif name == "measure":
            ground_truth = torch.load(ws.path(ws.GROUND_TRUTH), weights_only=True)
            for measured in ground_truth["subsets"].values():
                assert measured.shape == (2, 4, 2) and torch.isfinite(measured).all()
    print("dry run seconds per stage:", {k: round(v, 1) for k, v in seconds.items()})
    print(f"dry run total: {sum(seconds.values()):.1f} s")
    claims = json.loads(ws.path("metrics/claims.json").read_text())
    assert claims["claims"], "the claims stage found no claim"
    assert "digits" not in ws.path("reports/claims.md").read_text().lower()


def test_gpu_script_tiny(tmp_path):
    script = ROOT / "benchmarks" / "gpu_paper_scale.py"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny", "--device", "cpu", "--threads", "1"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"gpu_paper_scale.py --tiny: {time.perf_counter() - start:.1f} s")
    result = json.loads((tmp_path / "gpu_paper_scale.json").read_text())
    assert result["model"]["num_parameters"] > 1e5
    for section in ("train", "sample", "gradients", "kfac_fit", "projection", "scoring"):
        assert section in result["sections"], section
        assert result["sections"][section]["status"] == "ok", result["sections"][section]
    assert result["sections"]["train"]["steps_per_second"] > 0
    assert "kronfluence" in result["sections"]


def test_claims_caveat_follows_the_run_scale():
    from diffusion_attribution.pipeline.stages.claims import caveat

    small = caveat({"num_train": 357, "num_parameters": 177_000})
    assert "smaller than the paper's" in small and "357" in small
    paper = caveat({"num_train": 5000, "num_parameters": 35_717_891})
    assert "at the scale of the paper's" in paper
    assert "unknown" in caveat({})


def test_nearest_neighbours_in_chunks_match_the_full_matrix(monkeypatch):
    from diffusion_attribution.pipeline.stages import sample

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 12, generator=g), torch.randn(23, 12, generator=g)
    monkeypatch.setattr(sample, "DISTANCE_ROWS", 5)
    dist, idx = sample.nearest(a, b)
    full = torch.cdist(a, b)
    assert torch.equal(idx, full.argmin(1))
    assert torch.allclose(dist, full.min(1).values)
    self_dist, self_idx = sample.nearest(b, b, exclude_self=True)
    full_self = torch.cdist(b, b).fill_diagonal_(float("inf"))
    assert torch.equal(self_idx, full_self.argmin(1))
    assert torch.allclose(self_dist, full_self.min(1).values)
    assert not torch.equal(self_idx, torch.arange(len(b)))
