"""Variance-reduced (t, eps) draws: same format and seeding as Measurement.draw, unbiased,
stratified and antithetic as stated, and lower variance where the module says so."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_attribution.attribution.influence import attribute
from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.diffusion.datasets import load_digits
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample
from diffusion_attribution.diffusion.draws import DrawScheme, WithDraws, draw, stratified_timesteps
from diffusion_attribution.diffusion.gradients import gradient_matrix
from diffusion_attribution.diffusion.measurements import (
    ELBO,
    DiffusionLoss,
    SquareNorm,
    TimestepLoss,
    TrajectoryLogProb,
)
from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
from tests.helpers import TINY_4X4

SCHEMES = [DrawScheme(s, a) for s in (False, True) for a in (False, True)]
T10 = NoiseSchedule.linear(10, 1e-2, 0.3)
T100 = NoiseSchedule.linear(100, 1e-3, 0.2)


def images(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=dtype) * 2 - 1


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize(
    "make", [DiffusionLoss, ELBO, SquareNorm, lambda s: TimestepLoss(s, 3)], ids=str
)
def test_same_format_as_measurement_draw(scheme, make):
    m = make(T10)
    x0 = images(3, dtype=torch.float64)
    ours, theirs = scheme(m, x0, torch.arange(3), 6, 1), m.draw(x0, torch.arange(3), 6, 1)
    assert ours.keys() == theirs.keys() == {"t", "eps"}
    for k in ours:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
        assert ours[k].device == theirs[k].device, k
    assert 1 <= int(ours["t"].min()) and int(ours["t"].max()) <= 10
    if m.timestep is not None:  # a fixed-t measurement keeps its t
        assert (ours["t"] == 3).all()
    with torch.no_grad():  # and the measurement takes them
        assert torch.isfinite(m(lambda x, t: 0.1 * x, x0, ours)).all()


@pytest.mark.parametrize("make", [DiffusionLoss, ELBO, lambda s: TimestepLoss(s, 3)], ids=str)
def test_plain_scheme_is_measurement_draw_bit_for_bit(make):
    m = make(T10)
    x0 = images(4)
    a, b = DrawScheme()(m, x0, torch.arange(4) + 7, 5, 3), m.draw(x0, torch.arange(4) + 7, 5, 3)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert DrawScheme().wrap(m) is m


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_seeded_per_example_independent_of_batching(scheme):
    m = DiffusionLoss(T10)
    x0 = images(6)
    ids = torch.tensor([4, 9, 0, 2, 11, 5])
    whole = scheme(m, x0, ids, 8, 2)
    again = scheme(m, x0, ids, 8, 2)
    parts = [scheme(m, x0[s], ids[s], 8, 2) for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
    for k in whole:
        assert torch.equal(whole[k], again[k])
        assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))
    other = scheme(m, x0, ids, 8, 3)
    assert not torch.equal(whole["eps"], other["eps"])


@pytest.mark.parametrize("num_draws,strata", [(10, 10), (5, 5), (4, 4), (3, 3), (8, 4), (20, 10)])
def test_stratified_draws_cover_every_stratum(num_draws, strata):
    """One timestep per stratum [k/K, (k+1)/K) of [0, 1), t = floor(T u) + 1: the k-th
    smallest t lies in [floor(kT/K) + 1, ceil((k+1)T/K)]; with K = T each t exactly once."""
    antithetic = num_draws != strata
    m = DiffusionLoss(T10)
    t = draw(
        m, images(200), torch.arange(200), num_draws, 0, stratified=True, antithetic=antithetic
    )["t"]
    if antithetic:
        t = t[:, ::2]
    s = t.sort(1).values
    k = torch.arange(strata)
    lo = torch.floor(k * 10 / strata).long() + 1
    hi = torch.tensor([math.ceil((i + 1) * 10 / strata) for i in range(strata)])
    assert ((s >= lo) & (s <= hi)).all()
    if strata == 10:
        assert (s == torch.arange(1, 11)).all()
    assert not (t == s).all()  # strata come in shuffled order


def test_stratified_timesteps_are_uniform_on_average():
    """Averaged over the strata (and each single draw, thanks to the shuffle) t ~ U{1..T},
    also when T / K is not an integer."""
    g = torch.Generator().manual_seed(0)
    for k in (3, 4, 7):
        t = torch.stack([stratified_timesteps(k, 10, g) for _ in range(3000)])
        for col in (t.flatten(), t[:, 0]):
            counts = torch.bincount(col, minlength=11)[1:].double()
            expected = col.numel() / 10
            assert (counts - expected).abs().max() < 5 * math.sqrt(expected), (k, counts)


@pytest.mark.parametrize("stratified", [False, True])
def test_antithetic_pairs_are_exact_negatives_with_a_shared_timestep(stratified):
    d = draw(
        DiffusionLoss(T10), images(5), torch.arange(5), 8, 4, stratified=stratified, antithetic=True
    )
    assert torch.equal(d["eps"][:, 1::2], -d["eps"][:, ::2])
    assert torch.equal(d["t"][:, 1::2], d["t"][:, ::2])
    assert not torch.equal(d["eps"][:, 2::2], -d["eps"][:, :-2:2])  # pairs differ from each other
    with pytest.raises(ValueError, match="even"):
        draw(DiffusionLoss(T10), images(1), torch.arange(1), 7, 0, antithetic=True)


def test_trajectory_measurement_keeps_its_own_draws():
    m = TrajectoryLogProb(T10)
    x0, traj = images(2), torch.randn(11, 2, 1, 4, 4)
    a = DrawScheme(True, True)(m, x0, torch.arange(2), 4, 0, trajectories=traj)
    b = m.draw(x0, torch.arange(2), 4, 0, trajectories=traj)
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_loss_estimate_is_unbiased(scheme):
    """eps_theta(x_t, t) = w_t x_t has E_eps ||eps - w_t x_t||^2 = (1 - w_t b_t)^2 D
    + w_t^2 a_t^2 ||x0||^2 (a_t^2 = abar_t, b_t^2 = 1 - abar_t); the loss is its mean over
    t = 1..T. The mean of 4000 independent estimates (S = 4: strata of width T/S = 2.5) must
    match within 4 standard errors."""
    T = T10.num_timesteps
    w = torch.linspace(0.2, 1.2, T + 1)  # w[t], strongly t-dependent loss

    def eps_model(xt, t):
        return w[t].reshape(-1, 1, 1, 1) * xt

    x0 = images(1, seed=3)
    ab = T10.alpha_bars[1:].float()
    wt = w[1:]
    D, sq = x0.numel(), float(x0.pow(2).sum())
    exact = float(((1 - wt * (1 - ab).sqrt()) ** 2 * D + wt**2 * ab * sq).mean())
    m = DiffusionLoss(T10)
    R = 4000
    xs = x0.expand(R, -1, -1, -1)
    with torch.no_grad():
        v = m(eps_model, xs, scheme(m, xs, torch.arange(R), 4, 0)).double()
    se = float(v.std() / math.sqrt(R))
    assert abs(float(v.mean()) - exact) < 4 * se, (float(v.mean()), exact, se)


class LinearEps(nn.Module):
    """eps_theta(x_t, t) = W vec(x_t) + b, fitted by least squares: a 'trained' model in 1 s."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, t):
        return self.lin(x.flatten(1)).reshape(x.shape)


@pytest.fixture(scope="module")
def fitted():
    x0 = F.avg_pool2d(load_digits((3, 8)).images[:64], 2)  # 64 digits, 4x4
    m = DiffusionLoss(T100)
    d = m.draw(x0, torch.arange(64), 64, 5)
    rows = x0[:, None].expand(-1, 64, -1, -1, -1).reshape(-1, 1, 4, 4)
    xt = q_sample(T100, rows, d["t"].reshape(-1), d["eps"].reshape(-1, 1, 4, 4))
    X = torch.cat([xt.flatten(1), torch.ones(len(xt), 1)], 1)
    sol = torch.linalg.lstsq(X, d["eps"].reshape(len(xt), -1)).solution
    net = LinearEps(16)
    with torch.no_grad():
        net.lin.weight.copy_(sol[:-1].T)
        net.lin.bias.copy_(sol[-1])
    return net.eval(), x0


def spread(net, x0, scheme, num_draws=8, replicates=400):
    """Variance over independent replicates of the loss estimate and the total variance of
    its gradient, for one example."""
    m = DiffusionLoss(T100)
    xs = x0.expand(replicates, -1, -1, -1)
    d = scheme(m, xs, torch.arange(replicates), num_draws, 0)
    with torch.no_grad():
        value = m(net, xs, d)
    grads = gradient_matrix(net, kfac_parameters(net), m, xs, d)
    return float(value.var()), float(grads.var(0).sum())


def test_variance_reduction_on_a_fitted_model(fitted):
    """On a fitted model with S = 8 draws: stratified t cuts the variance of the loss
    estimate (l_t changes a lot over t); stratified + antithetic cuts that of its gradient,
    the quantity influence uses; antithetic pairs do *not* help the loss value, whose
    ||eps||^2 part is even in eps (module docstring)."""
    net, x0 = fitted
    for i in (0, 1):
        plain = spread(net, x0[i : i + 1], DrawScheme())
        strat = spread(net, x0[i : i + 1], DrawScheme(stratified=True))
        anti = spread(net, x0[i : i + 1], DrawScheme(antithetic=True))
        both = spread(net, x0[i : i + 1], DrawScheme(True, True))
        assert strat[0] < 0.6 * plain[0], (strat, plain)
        assert both[1] < 0.8 * plain[1], (both, plain)
        assert both[1] < strat[1] and both[1] < anti[1], (both, strat, anti)
        assert anti[0] > plain[0], (anti, plain)


def test_wrapped_measurement_feeds_attribute():
    """attribute() takes the draws through the measurement it is given: a wrapped measurement
    gives the scores of its draws; the plain scheme changes nothing."""
    torch.manual_seed(0)
    model = UNet(TINY_4X4).eval()
    params = kfac_parameters(model)
    x0, queries = images(16, seed=1), images(3, seed=2)
    loss = DiffusionLoss(T100)
    d = loss.draw(x0, torch.arange(16), 2, seed=5)
    K = fit_kfac(model, params, T100, x0, d["t"], d["eps"])
    spec = ScoreKey("kfac", "loss", "mc", 1e-3, "none")

    def run(m):
        s, _ = attribute(
            model,
            params,
            x0,
            queries,
            {"loss": m},
            {"mc": K},
            [spec],
            train_measurement=m,
            train_draws=8,
            query_draws=8,
            seed=3,
            batch_size=8,
        )
        return s[spec]

    base = run(loss)
    assert torch.equal(run(DrawScheme().wrap(loss)), base)
    scheme = DrawScheme(True, True)
    wrapped = scheme.wrap(loss)
    assert isinstance(wrapped, WithDraws) and wrapped.name == "loss"
    vr = run(wrapped)
    assert not torch.equal(vr, base)
    # the same as computing with the scheme's draws by hand
    qd = scheme(loss, queries, torch.arange(3), 8, 4)
    td = scheme(loss, x0, torch.arange(16), 8, 3)
    gq = gradient_matrix(model, params, loss, queries, qd)
    gt = gradient_matrix(model, params, loss, x0, td, scale=1 / 16)
    expected = K.inverse_apply(gq, 1e-3) @ gt.T / 16
    torch.testing.assert_close(vr, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
