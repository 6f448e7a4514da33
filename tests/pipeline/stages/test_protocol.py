"""Stage ``protocol``: its pure part on hand-made scores and ground truth (metrics, claim,
figure, skipped parts), and its two computations on a tiny U-Net (all fits scored in one pass
equal each fit scored alone; TRAK at each k is the baselines driver's at that k)."""

import matplotlib
import pytest
import torch

from diffusion_attribution.attribution.baselines import baseline_scores
from diffusion_attribution.attribution.influence import attribute
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import DiffusionLoss, SquareNorm
from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
from diffusion_attribution.evaluation.lds import subset_masks
from diffusion_attribution.evaluation.protocol import protocol_effects
from diffusion_attribution.pipeline.stages.protocol import (
    fig_effects,
    kfac_by_fit_draws,
    protocol,
    trak_by_projection_dim,
    trak_sweeps,
)
from tests.helpers import TINY_4X4

matplotlib.use("Agg")

Q, N, M, K = 12, 30, 8, 2


def hand_made():
    g = torch.Generator().manual_seed(3)
    true = torch.randn(Q, N, generator=g)
    masks = subset_masks(N, M, 0.5, seed=2)
    measured = (true.double() @ (~masks).double().T)[:, :, None] + 0.5 * torch.randn(
        Q, M, K, generator=g, dtype=torch.float64
    )

    def noisy(level):
        return true + level * torch.randn(Q, N, generator=g)

    kfac = {2: noisy(1.0), 8: noisy(0.8), 32: noisy(0.3)}
    trak = {
        m: {k: {1e-3: noisy(20.0), 1.0: noisy(level), 10.0: noisy(2 * level)} for k, level in ks}
        for m, ks in (("trak", ((64, 2.0), (256, 0.2))), ("d-trak", ((64, 1.5), (256, 0.3))))
    }
    return kfac, trak, measured, masks


def test_protocol_metrics_claim_and_figure():
    kfac, trak, measured, masks = hand_made()
    r = protocol(kfac, trak, measured, masks, fit_draws=8, projection_dim=64, damping=1e-8)
    m = r.metrics
    assert (m["num_queries"], m["num_subsets"], m["num_seeds"]) == (Q, M, K)
    fit = m["fit_draws"]
    assert (
        fit["skipped"] is False and fit["configured"] == 8 and set(fit["kfac"]) == {"2", "8", "32"}
    )
    assert fit["kfac"]["8"]["difference_vs_configured"]["mean"] == 0.0
    assert fit["kfac"]["32"]["lds"] > fit["kfac"]["2"]["lds"]
    assert fit["kfac"]["2"]["damping"] == 1e-8 and "heldout" not in fit["kfac"]["2"]
    proj = m["projection_dims"]
    assert set(proj["trak"]) == set(proj["d-trak"]) == {"64", "256"}
    assert proj["trak"]["256"]["damping"] == 1.0 and "heldout" in proj["trak"]["256"]
    (c,) = m["claims"]
    assert c["id"] == "projection_dimension" and c["verdict"] == "holds", c
    assert proj["values"] == [64, 256] and fit["values"] == [2, 8, 32]
    d = proj["largest_minus_smallest"]["TRAK*"]
    assert d["mean"] == pytest.approx(
        proj["trak"]["256"]["lds"] - proj["trak"]["64"]["lds"], abs=1e-4
    )
    assert set(r.tables) == {"kfac", "trak", "d-trak"}
    assert "K-FAC fit draws" in r.summary and "**holds**" in r.summary
    # the protocol table reads these metrics
    effects = protocol_effects(m)
    assert "at 32 (+" in effects["(t, eps) draws per example, K-FAC fit"]
    fig = fig_effects(r)
    assert [a.get_xscale() for a in fig.axes] == ["log", "log"]
    assert "LDS" in fig.axes[0].get_ylabel() and fig.axes[1].get_title()


def test_protocol_skipped_parts_and_a_single_dimension():
    kfac, trak, measured, masks = hand_made()
    r = protocol(None, None, measured, masks, fit_draws=8, projection_dim=64, damping=1e-8)
    assert r.metrics["fit_draws"] == {
        "skipped": True,
        "configured": 8,
        "why": "protocol.fit_draws is empty",
    }
    assert r.metrics["projection_dims"]["skipped"] and r.metrics["claims"] == []
    assert "not measured" in r.summary
    texts = [t.get_text() for a in fig_effects(r).axes for t in a.texts]
    assert any("protocol.projection_dims is empty" in t for t in texts)
    one = {m: {64: sweeps[64]} for m, sweeps in trak.items()}  # one k: no claim
    r1 = protocol(kfac, one, measured, masks, fit_draws=8, projection_dim=64, damping=1e-8)
    assert r1.metrics["claims"] == [] and set(r1.metrics["projection_dims"]["trak"]) == {"64"}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = UNet(TINY_4X4).eval()
    schedule = NoiseSchedule.linear(20, 1e-4, 0.3)
    x = torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return model, schedule, x


SCORE = dict(train_draws=2, query_draws=3, seed=4, batch_size=4)


def test_all_fits_in_one_pass_equal_each_fit_alone(tiny, one_thread):
    model, schedule, x = tiny
    queries = x[:3] * 0.9
    fit = dict(fit_seed=2, fit_batch_size=8, precision="float64")
    scores, seconds = kfac_by_fit_draws(
        model, schedule, x, queries, [1, 3], damping=1e-3, compression="none", **fit, **SCORE
    )
    assert set(scores) == {1, 3} and all(s.shape == (3, 7) for s in scores.values())
    assert not torch.equal(scores[1], scores[3])
    assert set(seconds) == {
        "K-FAC fit, 1 draws",
        "K-FAC fit, 3 draws",
        "K-FAC influence scores (all fits)",
    }
    params = kfac_parameters(model)
    loss = DiffusionLoss(schedule)
    d = loss.draw(x, torch.arange(7), 3, 2)  # the curvature stage's draws
    alone = fit_kfac(
        model, params, schedule, x, d["t"], d["eps"], batch_size=8, mc_seed=2, precision="float64"
    )
    key = ScoreKey("kfac", "loss", "mc_expand", 1e-3, "none")
    ref, _ = attribute(
        model, params, x, queries, {"loss": loss}, {"mc_expand": alone}, [key],
        train_measurement=loss, **SCORE,
    )  # fmt: skip
    torch.testing.assert_close(scores[3], ref[key], rtol=1e-5, atol=1e-7)


def test_trak_at_each_dimension_is_the_baselines_drivers(tiny, one_thread):
    model, schedule, x = tiny
    queries = x[:3] * 0.9
    relative = (1e-2, 1.0)
    sets, seconds = trak_by_projection_dim(
        model, schedule, x, queries, [8, 16], projection_seed=4, projection="rademacher",
        relative_dampings=relative, **SCORE,
    )  # fmt: skip
    assert set(sets) == {8, 16} and set(seconds) == {
        "TRAK and D-TRAK, k = 8",
        "TRAK and D-TRAK, k = 16",
    }
    assert {k.method for k in sets[8]} == {"trak", "d-trak"}
    assert {k.precision for k in sets[8]} == {"float32"} and sets[16].meta["projection_dim"] == 16
    params = kfac_parameters(model)
    ref = baseline_scores(
        model, params, x, queries,
        {"loss": DiffusionLoss(schedule), "square_norm": SquareNorm(schedule)},
        Projector(sum(p.numel() for p in params), 16, seed=4), relative,
        query_measurements=["loss"], precisions=("float32",), das=False, feature_module=None,
        **SCORE,
    )  # fmt: skip
    for key, s in sets[16].items():
        torch.testing.assert_close(s, ref[key])
    sweeps = trak_sweeps(sets, relative)
    assert set(sweeps) == {"trak", "d-trak"}
    assert all(set(sweeps[m][k]) == set(relative) for m in sweeps for k in (8, 16))
