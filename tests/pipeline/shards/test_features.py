"""TRAK's training features in shards equal one pass and resume."""

import torch

from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.attribution.trak import TRAIN_MEASUREMENTS, train_features
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.pipeline.shards.features import FeatureSettings, sharded_train_features
from diffusion_attribution.pipeline.workspace import Workspace
from tests.pipeline.shards.smoke import inputs


def test_sharded_train_features_equal_one_pass_and_resume(smoke_ws, monkeypatch):
    """TRAK's and D-TRAK's training features from 3 shards equal train_features on the whole
    set; a deleted shard file is recomputed alone, bit for bit, the others are not touched."""
    config, root = smoke_ws
    ws = Workspace(root, device="cpu", threads=2)
    got = inputs(config, ws)
    icfg, tcfg = config.influence, config.trak
    settings = FeatureSettings(
        train_draws=icfg.train_draws, seed=icfg.seed, batch_size=icfg.batch_size,
        projection_dim=tcfg.projection_dim, projection=tcfg.projection, projection_seed=tcfg.seed,
    )  # fmt: skip
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-len(got.dataset) // 3)))
    n = len(got.dataset)
    sharded = sharded_train_features(ws, diffusion=config.diffusion, settings=settings, num_train=n)
    net = got.model
    params = kfac_parameters(net)
    projector = Projector(
        sum(p.numel() for p in params), tcfg.projection_dim, seed=tcfg.seed, kind=tcfg.projection
    )
    for method, name in TRAIN_MEASUREMENTS.items():
        whole = train_features(
            net, params, got.measurements[name], got.dataset.images, projector,
            train_draws=icfg.train_draws, seed=icfg.seed, batch_size=icfg.batch_size,
        )  # fmt: skip
        assert sharded[method].shape == whole.shape == (len(got.dataset), tcfg.projection_dim)
        torch.testing.assert_close(sharded[method], whole, rtol=1e-4, atol=1e-6)
    folder = next(p for p in (root / ".cache" / "baselines").iterdir() if p.is_dir())
    files = sorted(folder.glob("features_*.pt"))
    assert len(files) == 2 * 3
    before = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()  # a shard killed before its write
    again = sharded_train_features(ws, diffusion=config.diffusion, settings=settings, num_train=n)
    for method in TRAIN_MEASUREMENTS:
        assert torch.equal(again[method], sharded[method]), method
    for f, mtime in before.items():
        assert f.exists() and (f == files[1] or f.stat().st_mtime_ns == mtime), f.name
