"""The :class:`~diffusion_attribution.attributor.Attributor` facade: the same numbers as the
low-level path, every measurement and method reachable, the curvature saved and loaded, bad
input named, and defaults that work on models nobody tuned them to."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import diffusion_attribution as da
from diffusion_attribution.attribution.influence import attribute
from diffusion_attribution.attributor import (
    METHODS,
    Attribution,
    Attributor,
    DiffusersEps,
    FitSettings,
    ScoreSettings,
    schedule_from_betas,
)
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.diffusion.unet import UNet, UNetConfig, kfac_parameters
from tests.helpers import TINY_4X4

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = dict(train_draws=16, query_draws=16, projection_dim=64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = UNet(TINY_4X4).eval()
    g = torch.Generator().manual_seed(1)
    train = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    return model, da.NoiseSchedule.linear(20, 1e-3, 0.2), train


def test_kfac_scores_are_the_low_level_paths(tiny) -> None:
    """The facade adds nothing to the numbers: fit_kfac + attribute with the same settings,
    the damping made absolute by the curvature's mean eigenvalue, give the same bits."""
    model, schedule, train = tiny
    fit = FitSettings(draws=4, seed=5)
    settings = ScoreSettings(damping=1e-3, train_draws=16, query_draws=16, seed=7)
    got = Attributor(model, schedule, train, fit).scores(train[:3], "loss", settings)

    loss = DiffusionLoss(schedule)
    params = kfac_parameters(model)
    d = loss.draw(train, torch.arange(len(train)), 4, seed=5)
    K = fit_kfac(model, params, schedule, train, d["t"], d["eps"], batch_size=512, mc_seed=5)
    damping = 1e-3 * K.mean_eigenvalue()
    key = da.ScoreKey("kfac", "loss", curvature="mc_expand", damping=damping, compression="int8")
    want, _ = attribute(
        model, params, train, train[:3], {"loss": loss}, {"mc_expand": K}, [key],
        train_measurement=loss, train_draws=16, query_draws=16, seed=7,
    )  # fmt: skip
    assert got.key == key
    assert torch.equal(got.matrix, want[key])
    absolute = ScoreSettings(damping=damping, relative_damping=False, **FEW)
    again = Attributor(model, schedule, train, fit).scores(train[:3], settings=absolute)
    assert again.key.damping == damping


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_reachable(tiny, method: str) -> None:
    model, schedule, train = tiny
    result = Attributor(model, schedule, train).scores(
        train[:2], settings=ScoreSettings(method=method, **FEW)
    )
    assert isinstance(result, Attribution)
    assert result.matrix.shape == (2, len(train)) and torch.isfinite(result.matrix).all()
    assert result.settings.method == method
    want = {"d-trak": "square_norm", "das": "output_mean", "pixel": "none"}.get(method, "loss")
    assert result.measurement == want


@pytest.mark.parametrize("measurement", ["loss", "elbo", "square_norm", "l_t=5", "trajectory"])
def test_every_measurement_is_reachable(tiny, measurement: str) -> None:
    model, schedule, train = tiny
    queries = train[:2]
    trajectories = None
    if measurement == "trajectory":
        g = torch.Generator().manual_seed(3)
        trajectories = torch.randn(21, *queries.shape, generator=g)
        trajectories[0] = queries
    result = Attributor(model, schedule, train).scores(
        queries, measurement, ScoreSettings(**FEW), trajectories=trajectories
    )
    assert result.measurement == measurement == result.key.measurement
    assert torch.isfinite(result.matrix).all() and result.matrix.abs().sum() > 0


def test_curvature_is_fitted_once_and_saved(tiny, tmp_path: Path) -> None:
    model, schedule, train = tiny
    a = Attributor(model, schedule, train, FitSettings(draws=2))
    assert a.curvature() is a.curvature()
    first = a.scores(train[:2], settings=ScoreSettings(**FEW))
    a.save_curvature(tmp_path / "K.pt")
    b = Attributor(model, schedule, train, FitSettings(draws=3))  # would fit another K
    b.load_curvature(tmp_path / "K.pt")
    assert torch.equal(b.scores(train[:2], settings=ScoreSettings(**FEW)).matrix, first.matrix)


def test_top_and_bottom() -> None:
    m = torch.tensor([[0.1, -2.0, 3.0, 0.5], [-1.0, 4.0, 0.0, 2.0]])
    r = Attribution(m, "loss", ScoreSettings(), da.ScoreKey("pixel", "none"))
    values, idx = r.top(2)
    assert idx.tolist() == [[2, 3], [1, 3]] and values.tolist() == [[3.0, 0.5], [4.0, 2.0]]
    values, idx = r.bottom(1)
    assert idx.tolist() == [[1], [0]] and values.tolist() == [[-2.0], [-1.0]]
    assert r.top(10)[1].shape == (2, 4)


def test_bad_input_is_named(tiny) -> None:
    model, schedule, train = tiny
    a = Attributor(model, schedule, train)
    with pytest.raises(ValueError, match="ScoreSettings.method"):
        ScoreSettings(method="influence")
    with pytest.raises(ValueError, match="ScoreSettings.train_draws"):
        ScoreSettings(train_draws=0)
    with pytest.raises(ValueError, match="queries must be"):
        a.scores(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="trajectories"):
        a.scores(train[:1], "trajectory")
    with pytest.raises(ValueError, match="unknown measurement"):
        a.scores(train[:1], "fid")
    with pytest.raises(ValueError, match="relative_damping"):
        a.scores(train[:1], settings=ScoreSettings(method="trak", relative_damping=False))
    with pytest.raises(ValueError, match="train_images"):
        Attributor(model, schedule, train[0])


def test_schedule_from_betas_is_ho_et_als() -> None:
    betas = torch.tensor([0.1, 0.2, 0.3])
    s = schedule_from_betas(betas)
    assert s.alpha_bars.tolist() == pytest.approx([1.0, 0.9, 0.72, 0.504])
    assert s.betas[0] == 0


# -- defaults that were tuned on none of these models -----------------------------------------


def digits(n: int, size: int) -> torch.Tensor:
    """The first ``n`` of scikit-learn's bundled digits in [-1, 1], resized to size x size."""
    x = torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 8 - 1
    if size == 8:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def trained(model: torch.nn.Module, schedule, x: torch.Tensor, steps: int) -> torch.nn.Module:
    """A plain eps-prediction loop (Adam, uniform t in 1..T), not the pipeline's trainer."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    T = len(schedule.alpha_bars) - 1
    model.train()
    for _ in range(steps):
        x0 = x[torch.randint(0, len(x), (min(32, len(x)),), generator=g)]
        t = torch.randint(1, T + 1, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ab = schedule.alpha_bars[t].float().view(-1, 1, 1, 1)
        loss = F.mse_loss(model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def ours(size: int, attention: tuple[int, ...]) -> torch.nn.Module:
    cfg = UNetConfig(
        in_channels=1,
        image_size=size,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attn_resolutions=attention,
        dropout=0.0,
        norm_groups=4,
    )
    return UNet(cfg)


def diffusers_16() -> tuple[torch.nn.Module, object]:
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
    )
    return unet, diffusers.DDPMScheduler(num_train_timesteps=100)


#: (name, image size, N): three architectures and sizes, none of which the defaults were
#: chosen on (the pipeline's model is 8x8 with attention at 4x4 and 16 base channels).
ARCHITECTURES = [
    ("ours-8x8-no-attention", 8, 12),
    ("ours-16x16-attention", 16, 96),
    ("diffusers-16x16-attention", 16, 24),
]


@pytest.fixture(scope="module")
def self_influence() -> dict[str, list[bool]]:
    """For each architecture: is each of four queried training images its own top influence,
    with :class:`Attributor`'s defaults?"""
    found = {}
    for name, size, n in ARCHITECTURES:
        torch.manual_seed(0)
        if name.startswith("diffusers"):
            unet, scheduler = diffusers_16()
            model, schedule = DiffusersEps(unet), schedule_from_betas(scheduler.betas)
        else:
            model = ours(size, (8,) if "attention" in name and "no" not in name else ())
            schedule = da.NoiseSchedule.linear(100, 1e-4, 0.02)
        x = digits(n, size)
        model = trained(model, schedule, x, steps=150)
        q = torch.tensor([0, n // 3, 2 * n // 3, n - 1])
        start = time.perf_counter()
        top = Attributor(model, schedule, x).scores(x[q]).top(1)[1].flatten()
        found[name] = (top == q).tolist()
        print(f"{name}: N={n}, {time.perf_counter() - start:.1f} s", flush=True)
    return found


@pytest.mark.slow
def test_defaults_find_training_images_as_their_own_top_influence(self_influence) -> None:
    """No per-model tuning: at least 11 of the 12 queried training images (4 per model) are
    their own most positive influence, and at least 3 of 4 on every model."""
    print({name: f"{sum(v)}/4" for name, v in self_influence.items()})
    assert all(sum(v) >= 3 for v in self_influence.values()), self_influence
    assert sum(sum(v) for v in self_influence.values()) >= 11, self_influence
