"""Influence in shards (query blocks x training shards), curvature factors and TRAK's training
features in shards each equal one pass, and a killed shard is recomputed alone.

The workspace is the smoke profile's first four stages (data, train, sample, curvature),
shrunk further, run in-process once for the module.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_attribution.attribution.influence import attribute, influence_specs
from diffusion_attribution.core.config import parse_config
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.pipeline.shards import (
    blocks,
    gather,
    load_preconditioned,
    query_bytes,
    save_preconditioned,
    sharded_attribute,
)
from diffusion_attribution.pipeline.stages import curvature, data, sample, train
from diffusion_attribution.pipeline.workspace import Workspace, schedule_of

ROOT = Path(__file__).resolve().parents[2]


def small_smoke_params() -> dict:
    params = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    params["sample"].update(num_samples=6, batch_size=6)
    params["measure"].update(num_queries=6)
    params["counterfactual"].update(num_queries=min(6, params["counterfactual"]["num_queries"]))
    params["curvature"].update(variants=["mc_expand", "ekfac_mc_expand"], num_draws=1)
    params["influence"].update(
        train_draws=2, query_draws=2, damping_sweep=[1e-3], svd_ranks=[1], batch_size=16
    )
    return params


@pytest.fixture(scope="module")
def smoke_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    config = parse_config(small_smoke_params())
    ws = Workspace(root, device="cpu", threads=2)
    for stage in (data, train, sample, curvature):
        stage.run(config, ws)
    return config, root


def specs_of(config, ws):
    """The stage's kinds of score matrix, on two measurements (the others cost more time and
    test nothing more here)."""
    return influence_specs(
        config.curvature.variants,
        ["loss", "elbo"],
        config.influence.damping,
        config.influence.compression,
        config.influence.damping_sweep,
        compression_ablation=["none", "int8", "int4"],
        ablation_measurements=config.influence.ablation_measurements,
    )


def unsharded(config, ws, specs):
    net = ws.model
    icfg = config.influence
    m = ws.measurements(config.diffusion, icfg.timesteps)
    scores, _ = attribute(
        net,
        kfac_parameters(net),
        ws.dataset.images,
        ws.samples["images"],
        m,
        {v: ws.curvature(v) for v in config.curvature.variants},
        specs,
        train_measurement=m["loss"],
        train_draws=icfg.train_draws,
        query_draws=icfg.query_draws,
        seed=icfg.seed,
        query_trajectories=ws.samples["trajectory"],
        batch_size=icfg.batch_size,
    )
    return scores


def test_blocks_and_query_bytes():
    assert blocks(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert blocks(10, 0) == [range(10)]
    with pytest.raises(ValueError, match="nothing to split"):
        blocks(0, 3)
    from diffusion_attribution.attribution.scores import ScoreKey

    keys = [ScoreKey("kfac", "loss", "mc", 1e-8, c) for c in ("int8", "int4", "none")]
    # int8: P + 4 per block; int4: ceil(P / 2) + 4 per block; float32: 4 P
    assert query_bytes(keys, 101, 3) == (101 + 12) + (51 + 12) + 404


def test_preconditioned_round_trip(tmp_path):
    from diffusion_attribution.attribution.compression import quantize
    from diffusion_attribution.attribution.scores import ScoreKey

    x = torch.randn(3, 10)
    pre = {
        ScoreKey("kfac", "loss", "mc", 1e-8, "int8"): quantize(x, 8, [4, 6]),
        ScoreKey("kfac", "loss", "mc", 1e-8, "none"): x,
    }
    save_preconditioned(pre, tmp_path / "q.pt", start=0)
    back = load_preconditioned(tmp_path / "q.pt")
    assert torch.torch.equal(back[next(iter(pre))].codes, next(iter(pre.values())).codes)
    assert torch.equal(back[ScoreKey("kfac", "loss", "mc", 1e-8, "none")], x)
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    with pytest.raises(Exception):  # noqa: B017 -- torch's own unpickling error
        load_preconditioned(tmp_path / "bad.pt")


def test_sharded_equals_unsharded_and_a_killed_shard_is_recomputed_alone(smoke_ws, monkeypatch):
    config, root = smoke_ws
    ws = Workspace(root, device="cpu", threads=2)
    specs = specs_of(config, ws)
    reference = unsharded(config, ws, specs)

    # 3 training shards x 2 query blocks (3 queries each), run inline
    params = kfac_parameters(ws.model)
    per_query = query_bytes(specs, sum(p.numel() for p in params), len(params))
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-len(ws.dataset) // 3)))
    monkeypatch.setenv("DA_QUERY_BLOCK_BYTES", str(3 * per_query + 1))
    sharded, timings = sharded_attribute(
        ws, specs, diffusion=config.diffusion, influence=config.influence, progress=False
    )
    assert set(sharded) == set(reference)
    # Equal up to float32 round-off of the batch arrangement, which the damped inverse
    # amplifies: at damping 1e-8 (condition number ~1e13) a query's preconditioned gradient
    # moves by ~1e-3 relative when it is computed in a batch of 1 instead of 6; at 1e-3 the
    # shards agree to ~1e-6.
    for key in specs:
        err = float((sharded[key] - reference[key]).norm() / reference[key].norm())
        assert err < (1e-4 if key.damping >= 1e-3 else 2e-2), (key.label, err)
    assert timings.train_gradients > 0 and timings.query_gradients > 0

    folder = next(p for p in (root / ".cache" / "influence").iterdir() if p.is_dir())
    shard_files = sorted(folder.glob("scores_*.pt"))
    assert len(shard_files) == 6 and len(list(folder.glob("queries_*.pt"))) == 2
    before = {f: f.stat().st_mtime_ns for f in folder.glob("*.pt")}
    killed = shard_files[3]
    killed.unlink()  # as if its job had been killed before it wrote its file
    again, _ = sharded_attribute(
        ws, specs, diffusion=config.diffusion, influence=config.influence, progress=False
    )
    for f, mtime in before.items():
        if f != killed:
            assert f.stat().st_mtime_ns == mtime, f"{f.name} was recomputed"
    assert killed.exists()
    for key in specs:
        assert torch.equal(again[key], sharded[key])

    # shards that do not tile the matrix are refused with a clear error
    with pytest.raises(ValueError, match="not exactly once"):
        gather(shard_files[:-1], len(ws.samples["images"]), len(ws.dataset))


def test_other_inputs_move_the_shards_aside(smoke_ws, monkeypatch, tmp_path):
    config, root = smoke_ws
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".cache"))
    ws = Workspace(copy, device="cpu", threads=2)
    specs = specs_of(config, ws)[:2]
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.delenv("DA_SHARD_EXAMPLES", raising=False)
    monkeypatch.delenv("DA_QUERY_BLOCK_BYTES", raising=False)
    sharded_attribute(
        ws, specs, diffusion=config.diffusion, influence=config.influence, progress=False
    )
    first = [p.name for p in (copy / ".cache" / "influence").iterdir()]
    other = parse_config(
        {
            **config.model_dump(mode="json"),
            "influence": {**config.influence.model_dump(mode="json"), "train_draws": 3},
        }
    )
    sharded_attribute(
        ws, specs, diffusion=other.diffusion, influence=other.influence, progress=False
    )
    now = [p.name for p in (copy / ".cache" / "influence").iterdir()]
    assert len(first) == len(now) == 1 and first != now
    stale = list((copy / ".cache" / "stale" / "influence").rglob("scores_*.pt"))
    assert len(stale) == 1, "the first run's shard should have been moved aside, not deleted"
    assert os.path.isdir(copy / ".cache" / "stale" / "influence")


def test_sharded_train_features_equal_one_pass_and_resume(smoke_ws, monkeypatch):
    """TRAK's and D-TRAK's training features from 3 shards equal train_features on the whole
    set; a deleted shard file is recomputed alone, bit for bit, the others are not touched."""
    from diffusion_attribution.attribution.projection import Projector
    from diffusion_attribution.attribution.trak import TRAIN_MEASUREMENTS, train_features
    from diffusion_attribution.pipeline.shards import FeatureSettings, sharded_train_features

    config, root = smoke_ws
    ws = Workspace(root, device="cpu", threads=2)
    icfg, tcfg = config.influence, config.trak
    settings = FeatureSettings(
        train_draws=icfg.train_draws, seed=icfg.seed, batch_size=icfg.batch_size,
        projection_dim=tcfg.projection_dim, projection=tcfg.projection, projection_seed=tcfg.seed,
    )  # fmt: skip
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-len(ws.dataset) // 3)))
    sharded = sharded_train_features(ws, diffusion=config.diffusion, settings=settings)
    net = ws.model
    params = kfac_parameters(net)
    projector = Projector(
        sum(p.numel() for p in params), tcfg.projection_dim, seed=tcfg.seed, kind=tcfg.projection
    )
    measurements = ws.measurements(config.diffusion, icfg.timesteps)
    for method, name in TRAIN_MEASUREMENTS.items():
        whole = train_features(
            net, params, measurements[name], ws.dataset.images, projector,
            train_draws=icfg.train_draws, seed=icfg.seed, batch_size=icfg.batch_size,
        )  # fmt: skip
        assert sharded[method].shape == whole.shape == (len(ws.dataset), tcfg.projection_dim)
        torch.testing.assert_close(sharded[method], whole, rtol=1e-4, atol=1e-6)
    folder = next(p for p in (root / ".cache" / "baselines").iterdir() if p.is_dir())
    files = sorted(folder.glob("features_*.pt"))
    assert len(files) == 2 * 3
    before = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()  # a shard killed before its write
    again = sharded_train_features(ws, diffusion=config.diffusion, settings=settings)
    for method in TRAIN_MEASUREMENTS:
        assert torch.equal(again[method], sharded[method]), method
    for f, mtime in before.items():
        assert f.exists() and (f == files[1] or f.stat().st_mtime_ns == mtime), f.name


def test_sharded_curvature_equals_one_shard(smoke_ws, monkeypatch):
    """The curvature stage's factors from 3 shards equal those from one (the stage's run in
    the fixture), for K-FAC and EK-FAC, and equal a direct fit_kfac."""
    from diffusion_attribution.curvature.kfac import KFAC, fit_kfac
    from diffusion_attribution.diffusion.measurements import DiffusionLoss
    from diffusion_attribution.pipeline.shards import sharded_curvatures

    config, root = smoke_ws
    ws = Workspace(root, device="cpu", threads=2)
    ccfg = config.curvature
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-len(ws.dataset) // 3)))
    sharded = dict(
        sharded_curvatures(
            ws, ccfg.variants, diffusion=config.diffusion, curvature=ccfg, progress=False
        )
    )
    folder = next(p for p in (root / ".cache" / "curvature").iterdir() if p.is_dir())
    assert len(list(folder.glob("factors_mc_expand_*.pt"))) == 1 + 3  # the stage's + 3 shards
    assert len(list(folder.glob("corrections_mc_expand_*.pt"))) == 1 + 3
    net = ws.model
    params = kfac_parameters(net)
    ds = ws.dataset
    draws = DiffusionLoss(schedule_of(config.diffusion)).draw(
        ds.images, torch.arange(len(ds)), ccfg.num_draws, ccfg.seed
    )
    direct = fit_kfac(
        net, params, schedule_of(config.diffusion), ds.images, draws["t"], draws["eps"],
        fisher="mc", kfac="expand", ekfac=True, batch_size=ccfg.batch_size, mc_seed=ccfg.seed,
    )  # fmt: skip
    v = torch.randn(3, sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    for variant in ccfg.variants:
        whole = KFAC.load(root / "outputs" / "curvature" / f"{variant}.pt")
        a, b = sharded[variant].matvec(v.double()), whole.matvec(v.double())
        assert float((a - b).norm() / b.norm()) < 1e-5, variant
    c = direct.matvec(v.double())
    b = KFAC.load(root / "outputs" / "curvature" / "ekfac_mc_expand.pt").matvec(v.double())
    assert float((c - b).norm() / b.norm()) < 1e-5


def test_sharded_influence_through_slurm_equals_inline(
    smoke_ws, slurm_cluster, no_execution_settings, monkeypatch, tmp_path
):
    """The query-block and score-shard tasks as SLURM job arrays (the local controller of the
    ``slurm_cluster`` fixture) give bitwise the scores of the same tasks run inline."""
    config, root = smoke_ws
    results = {}
    for executor in ("inline", "slurm"):
        copy = tmp_path / executor
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".cache"))
        ws = Workspace(copy, device="cpu", threads=1)
        specs = specs_of(config, ws)[:3]
        monkeypatch.setenv("DA_EXECUTOR", executor)
        monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-len(ws.dataset) // 2)))
        results[executor], _ = sharded_attribute(
            ws, specs, diffusion=config.diffusion, influence=config.influence, progress=False
        )
    submitted = list((tmp_path / "slurm" / ".cache" / "submitit").rglob("submitted.json"))
    assert len(submitted) == 2, "both phases should have gone through SLURM"
    for key, s in results["inline"].items():
        assert torch.equal(results["slurm"][key], s), key.label


def test_spectrum_quantiles_keep_the_ends():
    from diffusion_attribution.pipeline.stages.curvature import spectrum_quantiles

    ev = torch.arange(100_000, dtype=torch.float64)
    q = spectrum_quantiles(ev, points=11)
    assert q[0] == 99_999 and q[-1] == 0 and len(q) == 11 and bool((q[:-1] >= q[1:]).all())
    assert torch.equal(spectrum_quantiles(ev[:5]), ev[:5].flip(0))
