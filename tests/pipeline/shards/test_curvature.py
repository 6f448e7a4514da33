"""Curvature factors in shards equal one shard and a direct fit."""

import torch

from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.shards.curvature import sharded_curvatures
from diffusion_attribution.pipeline.workspace import Workspace
from tests.pipeline.shards.smoke import inputs


def test_sharded_curvature_equals_one_shard(smoke_ws, monkeypatch):
    """The curvature stage's factors from 3 shards equal those from one (the stage's run in
    the fixture), for K-FAC and EK-FAC, and equal a direct fit_kfac."""
    config, root = smoke_ws
    ws = Workspace(root, device="cpu", threads=2)
    got = inputs(config, ws)
    ccfg = config.curvature
    ds = got.dataset
    monkeypatch.setenv("DA_EXECUTOR", "inline")
    monkeypatch.setenv("DA_SHARD_EXAMPLES", str(-(-len(ds) // 3)))
    sharded = dict(
        sharded_curvatures(
            ws,
            ccfg.variants,
            diffusion=config.diffusion,
            curvature=ccfg,
            num_train=len(ds),
            progress=False,
        )
    )
    folder = next(p for p in (root / ".cache" / "curvature").iterdir() if p.is_dir())
    assert len(list(folder.glob("factors_mc_expand_*.pt"))) == 1 + 3  # the stage's + 3 shards
    assert len(list(folder.glob("corrections_mc_expand_*.pt"))) == 1 + 3
    net = got.model
    params = kfac_parameters(net)
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
