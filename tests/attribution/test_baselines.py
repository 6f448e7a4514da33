"""The baselines driver: TRAK, D-TRAK and similarity matrices of one model, from their parts
and in the score format."""

import pytest
import torch

from diffusion_attribution.attribution.baselines import baseline_scores
from diffusion_attribution.attribution.influence import train_gradient_scale
from diffusion_attribution.attribution.projection import Projector, featurize
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.attribution.similarity import (
    bottleneck_features,
    gradient_cosine,
    gradient_dot,
)
from diffusion_attribution.attribution.trak import mean_eigenvalue, trak_scores
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import (
    ELBO,
    DiffusionLoss,
    SquareNorm,
    make_measurement,
)
from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
from tests.attribution.test_trak import rel_err
from tests.helpers import TINY_4X4

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: more OpenMP threads only contend


def test_baseline_scores_match_their_parts(tiny):
    """TRAK and D-TRAK matrices of the orchestrator are trak_scores of independently computed
    features (other batching and grouping), at dampings relative to their mean eigenvalue."""
    model, params, schedule, x = tiny
    queries = x[:3] * 0.9
    measurements = {n: make_measurement(n, schedule) for n in ("loss", "square_norm")}
    p = sum(t.numel() for t in params)
    proj = Projector(p, 32, seed=0)
    relative = [1e-3, 1.0]
    scores = baseline_scores(
        model,
        params,
        x,
        queries,
        measurements,
        proj,
        relative,
        query_measurements=["loss"],
        train_draws=2,
        query_draws=3,
        seed=7,
        batch_size=3,
        project_rows=4,
    )
    assert isinstance(scores, ScoreSet)
    for method, name in (("trak", "loss"), ("d-trak", "square_norm")):
        m = measurements[name]
        qf = featurize(model, params, m, queries, m.draw(queries, torch.arange(3), 3, 8), proj)
        tf = featurize(
            model,
            params,
            m,
            x,
            m.draw(x, torch.arange(7), 2, 7),
            proj,
            scale=train_gradient_scale(16),
        )
        eig = scores.meta["mean_eigenvalue"][method]
        assert eig == pytest.approx(mean_eigenvalue(tf), rel=1e-4)
        found = scores.find(method=method, measurement=name)
        for precision in ("float32", "float16"):
            rel = sorted(scores.relative_damping(k) for k in found if k.precision == precision)
            assert rel == pytest.approx(relative)
        assert len(found) == 2 * len(relative)
        for key, s in found.items():
            assert s.shape == (3, 7)
            assert key.curvature == "projected_empirical" and key.compression == "none"
            exact = trak_scores(qf, tf, key.damping, precision=key.precision)
            if key.precision == "float16" and scores.relative_damping(key) < 1:
                # traker's float16 pipeline with N = 7 < k = 32 turns the 1e-6 difference of
                # separately computed features into a large one at small damping (Fig. 18's
                # point); test_trak_float16 checks that pipeline against traker itself
                continue
            assert (
                rel_err(s, exact) < {"float32": 1e-4, "float16": 1e-3}[key.precision]
            )  # measured 8e-7, 2e-5
        if method == "trak":
            dot = scores[ScoreKey("grad_dot", "loss")]
            assert rel_err(dot, gradient_dot(qf, tf)) < 1e-4
    assert set(scores.meta["seconds"]) >= {"gradients", "projection", "scoring"}
    # every measurement a method needs must be given, and the error names it
    with pytest.raises(ValueError, match="square_norm"):
        baseline_scores(
            model,
            params,
            x,
            queries,
            {"loss": measurements["loss"]},
            proj,
            [1.0],
            query_measurements=["loss"],
            train_draws=1,
            query_draws=1,
            seed=0,
        )
    with pytest.raises(ValueError, match="elbo"):
        baseline_scores(
            model,
            params,
            x,
            queries,
            measurements,
            proj,
            [1.0],
            query_measurements=["elbo"],
            train_draws=1,
            query_draws=1,
            seed=0,
        )


def test_baseline_scores_cover_every_method_in_the_score_format(tmp_path):
    torch.manual_seed(0)
    cfg = TINY_4X4
    net = UNet(cfg).eval()
    params = kfac_parameters(net)
    sched = NoiseSchedule.linear(20, 1e-3, 0.3)
    ms = {
        "loss": DiffusionLoss(sched),
        "elbo": ELBO(sched, levels=17),
        "square_norm": SquareNorm(sched),
    }
    g = torch.Generator().manual_seed(0)
    train, queries = (
        torch.rand(10, 1, 4, 4, generator=g) * 2 - 1,
        torch.rand(3, 1, 4, 4, generator=g) * 2 - 1,
    )
    proj = Projector(sum(p.numel() for p in params), 32, seed=1)
    scores = baseline_scores(
        net,
        params,
        train,
        queries,
        ms,
        proj,
        [1e-2, 1.0],
        query_measurements=["loss", "elbo"],
        train_draws=2,
        query_draws=2,
        seed=0,
    )
    assert isinstance(scores, ScoreSet)
    assert all(isinstance(k, ScoreKey) for k in scores)
    methods = {(k.method, k.measurement, k.precision) for k in scores}
    for prec in ("float32", "float16"):
        assert {
            ("trak", "loss", prec),
            ("trak", "elbo", prec),
            ("d-trak", "square_norm", prec),
        } <= methods
    assert {
        ("grad_dot", "loss", "float32"),
        ("grad_cos", "elbo", "float32"),
        ("pixel", "none", "float32"),
    } <= methods
    assert all(s.shape == (3, 10) and torch.isfinite(s).all() for s in scores.values())
    assert all(s.device == params[0].device for s in scores.values())  # the model's device
    # dampings are relative to the mean eigenvalue of the projected empirical Fisher
    eig = scores.meta["mean_eigenvalue"]["trak"]
    damp = sorted(
        k.damping for k in scores.find(method="trak", measurement="loss", precision="float32")
    )
    assert damp == pytest.approx([1e-2 * eig, eig])
    # exactly these keys: the ScoreKey fields of every method
    ev = scores.meta["mean_eigenvalue"]
    assert set(ev) == {"trak", "d-trak"}
    expected = {
        ScoreKey(
            method,
            m,
            curvature="projected_empirical",
            damping=r * ev[method],
            compression="none",
            precision=prec,
        )
        for method, m in (("trak", "loss"), ("trak", "elbo"), ("d-trak", "square_norm"))
        for r in (1e-2, 1.0)
        for prec in ("float32", "float16")
    }
    expected |= {
        ScoreKey(method, m) for method in ("grad_dot", "grad_cos") for m in ("loss", "elbo")
    }
    expected |= {ScoreKey("pixel", "none"), ScoreKey("feature_cos", "none")}
    assert set(scores) == expected
    for key in [k for k in scores if k.method in ("grad_dot", "grad_cos", "pixel", "feature_cos")]:
        assert (key.curvature, key.damping, key.compression, key.precision) == (
            "none",
            0.0,
            "none",
            "float32",
        )
    assert set(scores.meta["seconds"]) == {"gradients", "projection", "scoring"}
    # the set round-trips through its file (meta is plain values)
    scores.save(tmp_path / "scores.pt")
    back = ScoreSet.load(tmp_path / "scores.pt")
    assert list(back) == list(scores) and back.meta == scores.meta
    assert all(torch.equal(back[k], scores[k]) for k in scores)


def test_journey_trak_and_feature_cosine_in_the_baselines(tiny):
    """Journey-TRAK is TRAK of the journey measurement (its own query trajectories), scored
    against TRAK's training features; the feature cosine is that of the U-Net's bottleneck."""
    model, params, schedule, x = tiny
    queries = x[:3] * 0.9
    T = schedule.num_timesteps
    x0_hat = torch.rand(T + 1, *queries.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    measurements = {n: make_measurement(n, schedule) for n in ("loss", "square_norm", "journey")}
    proj = Projector(sum(t.numel() for t in params), 32, seed=0)
    kw = dict(train_draws=2, query_draws=3, seed=7, precisions=("float32",))
    scores = baseline_scores(
        model, params, x, queries, measurements, proj, [1.0],
        query_measurements=["loss", "journey"], query_trajectories={"journey": x0_hat}, **kw,
    )  # fmt: skip
    (key,) = scores.find(method="trak", measurement="journey")
    m = measurements["journey"]
    qf = featurize(model, params, m, queries, m.draw(queries, torch.arange(3), 3, 8, x0_hat), proj)
    tf = featurize(
        model, params, measurements["loss"], x, measurements["loss"].draw(x, torch.arange(7), 2, 7),
        proj, scale=train_gradient_scale(16),
    )  # fmt: skip
    assert rel_err(scores[key], trak_scores(qf, tf, key.damping)) < 1e-4
    # the journey scores are not the loss scores: another query function
    (loss_key,) = scores.find(method="trak", measurement="loss")
    assert rel_err(scores[key], scores[loss_key]) > 1e-2
    feats = bottleneck_features(model, torch.cat([queries, x]))
    assert feats.shape[0] == 10
    assert (
        rel_err(scores[ScoreKey("feature_cos", "none")], gradient_cosine(feats[:3], feats[3:]))
        < 1e-6
    )
    without = baseline_scores(
        model, params, x, queries, measurements, proj, [1.0], query_measurements=["loss"],
        feature_module=None, **kw,
    )  # fmt: skip
    assert not without.find(method="feature_cos")
