"""TRAK / D-TRAK (projected empirical Fisher) and similarity baselines (the projector itself:
test_projection.py)."""

import math

import pytest
import torch

from diffusion_attribution.attribution import projection, similarity, trak
from diffusion_attribution.attribution.influence import train_gradient_scale
from diffusion_attribution.attribution.projection import Projector, featurize
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.attribution.similarity import (
    gradient_cosine,
    gradient_dot,
    pixel_similarity,
)
from diffusion_attribution.attribution.trak import (
    baseline_scores,
    mean_eigenvalue,
    trak_lambda,
    trak_scores,
    trak_scores_sweep,
)
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import (
    ELBO,
    DiffusionLoss,
    SquareNorm,
    make_measurement,
)
from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
from tests.helpers import TINY_4X4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: several OpenMP threads only contend (60x slower beside a busy process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def explicit_scores(q, phi, damping):
    """(1/N) q (phi^T phi / N + damping I)^{-1} phi^T with an explicit float64 inverse."""
    q, phi = q.double(), phi.double()
    n, k = phi.shape
    inv = torch.linalg.inv(phi.T @ phi / n + damping * torch.eye(k, dtype=torch.float64))
    return q @ inv @ phi.T / n


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ------------------------------------------------------------------ scores


@pytest.mark.parametrize("n", [12, 50])  # N < k (Gram-matrix solve) and N > k (F solve)
def test_identity_projection_gives_explicit_scores(n):
    p, q_count, damping = 30, 4, 1e-2
    g = torch.Generator().manual_seed(2)
    train = torch.randn(n, p, generator=g, dtype=torch.float64)
    query = torch.randn(q_count, p, generator=g, dtype=torch.float64)
    ident = Projector.identity(p)
    phi, q = ident.project(train), ident.project(query)
    expected = explicit_scores(query, train, damping)
    got = trak_scores(q, phi, damping, n, precision="float64")
    assert got.shape == (q_count, n) and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-6
    assert rel_err(trak_scores(q, phi, damping, n), expected) < 1e-5  # float32 storage
    # TRAK's unnormalised lambda: q (phi^T phi + N lambda I)^{-1} phi^T is the same matrix
    lam = trak_lambda(damping, n)
    trak_style = query @ torch.linalg.inv(train.T @ train + lam * torch.eye(p, dtype=torch.float64))
    assert rel_err(got, trak_style @ train.T) < 1e-6


def test_float16_degrades_float32_does_not():
    """A wide dynamic range of the features and a small damping: float16 storage changes the
    scores measurably (App. G.3.1, Fig. 18), float32 storage does not."""
    n, k, q_count = 300, 48, 6  # N > k: every direction of F counts, however small
    g = torch.Generator().manual_seed(3)
    col_scale = torch.logspace(-7, 1, k, dtype=torch.float64)  # per-direction magnitudes
    phi = torch.randn(n, k, generator=g, dtype=torch.float64) * col_scale
    q = torch.randn(q_count, k, generator=g, dtype=torch.float64) * col_scale
    damping = 1e-14
    exact = explicit_scores(q, phi, damping)
    s64 = trak_scores(q, phi, damping, precision="float64")
    s32 = trak_scores(q, phi, damping, precision="float32")
    s16 = trak_scores(q, phi, damping, precision="float16")
    assert rel_err(s64, exact) < 1e-5
    assert rel_err(s32, s64) < 1e-4
    assert rel_err(s16, s64) > 1e-2  # measured: 3e-2
    with pytest.raises(FloatingPointError):
        trak_scores(q, phi * 1e6, 1.0, precision="float16")


@pytest.mark.parametrize("n", [10, 40])
def test_damping_sweep_equals_separate_calls(n):
    k = 24
    g = torch.Generator().manual_seed(4)
    phi = torch.randn(n, k, generator=g)
    q = torch.randn(5, k, generator=g)
    dampings = [1e-4, 1e-2, 1.0, 100.0]
    sweep = trak_scores_sweep(q, phi, dampings, n)
    assert list(sweep) == dampings
    for d in dampings:
        assert rel_err(sweep[d], trak_scores(q, phi, d, n)) < 1e-5
        assert rel_err(sweep[d], explicit_scores(q, phi, d)) < 1e-5


def test_scores_stay_on_the_features_device():
    """Kernels and solves run where the features are (here torch.device("cpu") explicitly; on
    a GPU the same code keeps them there)."""
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(6)
    phi, q = torch.randn(9, 6, generator=g).to(cpu), torch.randn(2, 6, generator=g).to(cpu)
    for precision in ("float64", "float32", "float16"):
        assert trak_scores(q, phi, 0.5, precision=precision).device == cpu
        sweep = trak_scores_sweep(q, phi, [0.1, 1.0], precision=precision)
        assert all(s.device == cpu for s in sweep.values())
    assert trak_scores(q, phi[:4], 0.5).device == cpu  # N < k: the Gram-matrix solve


def test_bad_arguments():
    phi, q = torch.randn(5, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="damping"):
        trak_scores(q, phi, 0.0)
    with pytest.raises(ValueError, match="num_train"):
        trak_scores(q, phi, 1.0, num_train=6)
    with pytest.raises(ValueError, match="precision"):
        trak_scores(q, phi, 1.0, precision="bfloat16")


# ------------------------------------------------------------------ featurize

CFG = TINY_4X4


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = UNet(CFG).eval()
    schedule = NoiseSchedule.linear(20, 1e-4, 0.3)
    x = torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return model, kfac_parameters(model), schedule, x


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


# ------------------------------------------------------------------ similarity baselines


def test_pixel_similarity_by_hand():
    # 1x1x2 "images": distances from q0 = (0, 0) are 0, 5, 1; from q1 = (3, 0) they are 3, 4, sqrt(10)
    train = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]).reshape(3, 1, 1, 2)
    queries = torch.tensor([[0.0, 0.0], [3.0, 0.0]]).reshape(2, 1, 1, 2)
    got = pixel_similarity(queries, train, bandwidth=1.0)
    d2 = torch.tensor([[0.0, 25.0, 1.0], [9.0, 16.0, 10.0]])
    torch.testing.assert_close(got, torch.exp(-d2 / 2))
    # default bandwidth: median of the six distances 0, 1, 3, sqrt(10), 4, 5 -> torch's lower
    # median is 3
    torch.testing.assert_close(pixel_similarity(queries, train), torch.exp(-d2 / 18))
    assert pixel_similarity(queries, train).dtype == torch.float32


def test_gradient_dot_and_cosine():
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    torch.testing.assert_close(
        gradient_dot(q, t), torch.tensor([[2.0, 0.0, 1.0], [2.0, -3.0, 2.0]]) / 3
    )
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(gradient_cosine(q, t), torch.tensor([[1.0, 0.0, r], [r, -r, 1.0]]))


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
    expected.add(ScoreKey("pixel", "none"))
    assert set(scores) == expected
    for key in [k for k in scores if k.method in ("grad_dot", "grad_cos", "pixel")]:
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


def test_old_import_paths_still_work():
    """The projector and the similarity baselines moved out of ``trak``; it re-exports them."""
    for name in ("BLOCK_ROWS", "Projector", "featurize"):
        assert getattr(trak, name) is getattr(projection, name) and name in trak.__all__
    for name in ("pixel_similarity", "gradient_dot", "gradient_cosine"):
        assert getattr(trak, name) is getattr(similarity, name) and name in trak.__all__
    assert not hasattr(trak, "trak_attribute")
