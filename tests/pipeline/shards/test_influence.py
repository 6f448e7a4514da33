"""Influence in shards (query blocks x training shards) equals one pass, a killed shard is
recomputed alone, other inputs move the shards aside, and SLURM gives the inline scores."""

import os
import shutil

import pytest
import torch

from diffusion_attribution.attribution.compression import quantize
from diffusion_attribution.attribution.influence import attribute
from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.core.config import parse_config
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.pipeline.shards.influence import (
    gather,
    load_preconditioned,
    query_bytes,
    save_preconditioned,
    sharded_attribute,
)
from diffusion_attribution.pipeline.workspace import Workspace
from tests.pipeline.shards.smoke import inputs, specs_of


def unsharded(config, ws, specs):
    got = inputs(config, ws)
    net, m, icfg = got.model, got.measurements, config.influence
    scores, _ = attribute(
        net,
        kfac_parameters(net),
        got.dataset.images,
        got.samples["images"],
        m,
        got.curvatures,
        specs,
        train_measurement=m["loss"],
        train_draws=icfg.train_draws,
        query_draws=icfg.query_draws,
        seed=icfg.seed,
        query_trajectories=got.samples["trajectory"],
        batch_size=icfg.batch_size,
    )
    return scores


def sharded(config, ws, specs, influence=None, diffusion=None):
    """:func:`sharded_attribute` on the workspace's model, queries and training set."""
    got = inputs(config, ws)
    return sharded_attribute(
        ws,
        specs,
        diffusion=diffusion or config.diffusion,
        influence=influence or config.influence,
        params=kfac_parameters(got.model),
        num_queries=len(got.samples["images"]),
        num_train=len(got.dataset),
        progress=False,
    )


def test_query_bytes():
    keys = [ScoreKey("kfac", "loss", "mc", 1e-8, c) for c in ("int8", "int4", "none")]
    # int8: P + 4 per block; int4: ceil(P / 2) + 4 per block; float32: 4 P
    assert query_bytes(keys, 101, 3) == (101 + 12) + (51 + 12) + 404


def test_preconditioned_round_trip(tmp_path):
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
    specs = specs_of(config)
    reference = unsharded(config, ws, specs)

    # 3 training shards x 2 query blocks (3 queries each), run inline
    got = inputs(config, ws)
    params = kfac_parameters(got.model)
    per_query = query_bytes(specs, sum(p.numel() for p in params), len(params))
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-len(got.dataset) // 3)))
    monkeypatch.setenv("DA_QUERY_BLOCK_BYTES", str(3 * per_query + 1))
    scores, timings = sharded(config, ws, specs)
    assert set(scores) == set(reference)
    # Equal up to float32 round-off of the batch arrangement, which the damped inverse
    # amplifies: at damping 1e-8 (condition number ~1e13) a query's preconditioned gradient
    # moves by ~1e-3 relative when it is computed in a batch of 1 instead of 6; at 1e-3 the
    # shards agree to ~1e-6.
    for key in specs:
        err = float((scores[key] - reference[key]).norm() / reference[key].norm())
        assert err < (1e-4 if key.damping >= 1e-3 else 2e-2), (key.label, err)
    assert timings.train_gradients > 0 and timings.query_gradients > 0

    folder = next(p for p in (root / ".cache" / "influence").iterdir() if p.is_dir())
    shard_files = sorted(folder.glob("scores_*.pt"))
    assert len(shard_files) == 6 and len(list(folder.glob("queries_*.pt"))) == 2
    before = {f: f.stat().st_mtime_ns for f in folder.glob("*.pt")}
    killed = shard_files[3]
    killed.unlink()  # as if its job had been killed before it wrote its file
    again, _ = sharded(config, ws, specs)
    for f, mtime in before.items():
        if f != killed:
            assert f.stat().st_mtime_ns == mtime, f"{f.name} was recomputed"
    assert killed.exists()
    for key in specs:
        assert torch.equal(again[key], scores[key])

    # shards that do not tile the matrix are refused with a clear error
    with pytest.raises(ValueError, match="not exactly once"):
        gather(shard_files[:-1], len(got.samples["images"]), len(got.dataset))


def test_other_inputs_move_the_shards_aside(smoke_ws, monkeypatch, tmp_path):
    config, root = smoke_ws
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".cache"))
    ws = Workspace(copy, device="cpu", threads=2)
    specs = specs_of(config)[:2]
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.delenv("DA_SHARD_EXAMPLES", raising=False)
    monkeypatch.delenv("DA_QUERY_BLOCK_BYTES", raising=False)
    sharded(config, ws, specs)
    first = [p.name for p in (copy / ".cache" / "influence").iterdir()]
    other = parse_config(
        {
            **config.model_dump(mode="json"),
            "influence": {**config.influence.model_dump(mode="json"), "train_draws": 3},
        }
    )
    sharded(config, ws, specs, influence=other.influence, diffusion=other.diffusion)
    now = [p.name for p in (copy / ".cache" / "influence").iterdir()]
    assert len(first) == len(now) == 1 and first != now
    stale = list((copy / ".cache" / "stale" / "influence").rglob("scores_*.pt"))
    assert len(stale) == 1, "the first run's shard should have been moved aside, not deleted"
    assert os.path.isdir(copy / ".cache" / "stale" / "influence")


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
        specs = specs_of(config)[:3]
        monkeypatch.setenv("DA_EXECUTOR", executor)
        num_train = len(inputs(config, ws).dataset)
        monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-num_train // 2)))
        results[executor], _ = sharded(config, ws, specs)
    submitted = list((tmp_path / "slurm" / ".cache" / "submitit").rglob("submitted.json"))
    assert len(submitted) == 2, "both phases should have gone through SLURM"
    for key, s in results["inline"].items():
        assert torch.equal(results["slurm"][key], s), key.label
