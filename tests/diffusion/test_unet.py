"""Tests of the DDPM U-Net: shapes, parameter counts, K-FAC coverage, batch independence."""

import dataclasses

import pytest
import torch
from torch import nn

from diffusion_attribution.diffusion.unet import (
    HO_CIFAR10,
    AttentionBlock,
    Downsample,
    ResBlock,
    UNet,
    UNetConfig,
    Upsample,
    kfac_parameters,
    num_parameters,
    timestep_embedding,
)
from tests.helpers import TINY_DIGITS

SMALL_RGB = UNetConfig(
    in_channels=3,
    image_size=32,
    base_channels=16,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    dropout=0.1,
    norm_groups=8,
)


def _model(cfg: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(cfg)


@pytest.mark.parametrize("cfg", [TINY_DIGITS, SMALL_RGB], ids=["tiny_digits", "small_rgb"])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(cfg, batch):
    model = _model(cfg)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t_int = torch.randint(1, 1001, (batch,))
    assert model(x, t_int).shape == x.shape
    assert model(x, t_int.float()).shape == x.shape


def test_int_and_float_timesteps_agree():
    model = _model(TINY_DIGITS).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 700])
    torch.testing.assert_close(model(x, t), model(x, t.to(torch.float32)))
    torch.testing.assert_close(model(x, torch.tensor(5)), model(x, torch.tensor([5, 5])))


def test_timestep_embedding_formula():
    emb = timestep_embedding(torch.tensor([0, 1, 10]), 6)
    assert emb.shape == (3, 6)
    freqs = torch.tensor([1.0, 1e-2, 1e-4])  # 10000 ** (-k / (h - 1)), h = 3
    torch.testing.assert_close(emb[2, :3], torch.sin(10 * freqs))
    torch.testing.assert_close(emb[2, 3:], torch.cos(10 * freqs))
    assert timestep_embedding(torch.tensor([2.0]), 7).shape == (1, 7)


def test_parameter_counts():
    # Ho et al. (2020), Appendix B: "Our CIFAR10 model has 35.7 million parameters".
    with torch.device("meta"):
        ho = UNet(HO_CIFAR10)
    n_ho = num_parameters(ho)
    n_tiny = num_parameters(_model(TINY_DIGITS))
    print(f"HO_CIFAR10: {n_ho:,} parameters; TINY_DIGITS: {n_tiny:,}")
    assert abs(n_ho - 35.7e6) / 35.7e6 < 0.01
    assert 100_000 <= n_tiny <= 200_000


def test_parameter_count_matches_diffusers_ddpm_cifar10():
    diffusers_import_utils = pytest.importorskip("diffusers.utils.import_utils")
    # The installed torchvision crashes at import (RuntimeError, not ImportError); diffusers
    # would import it from an unrelated model module, so tell diffusers it is absent.
    diffusers_import_utils._torchvision_available = False
    unet_2d = pytest.importorskip("diffusers.models.unets.unet_2d")
    with torch.device("meta"):
        theirs = unet_2d.UNet2DModel(  # the config of google/ddpm-cifar10-32
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
        ours = UNet(HO_CIFAR10)
    n_theirs, n_ours = num_parameters(theirs), num_parameters(ours)
    print(f"diffusers UNet2DModel (ddpm-cifar10): {n_theirs:,}; ours: {n_ours:,}")
    # Same layers (multi-head vs single-head attention does not change the count).
    assert abs(n_theirs - n_ours) / n_theirs < 0.02


def test_kfac_parameters_cover_everything_but_groupnorm():
    model = _model(TINY_DIGITS)
    containers = (UNet, ResBlock, AttentionBlock, Downsample, Upsample, nn.ModuleList)
    parameter_free = (nn.Dropout,)
    kfac_modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for module in model.modules():
        allowed = containers + parameter_free + (nn.Linear, nn.Conv2d, nn.GroupNorm)
        assert isinstance(module, allowed), type(module)
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm)):
            assert not list(module.parameters(recurse=False)), type(module)
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()
    }
    kfac_ids = [id(p) for p in kfac_parameters(model)]
    assert len(kfac_ids) == len(set(kfac_ids)) == 2 * len(kfac_modules)
    assert set(kfac_ids).isdisjoint(norm_params)
    assert set(kfac_ids) | norm_params == {id(p) for p in model.parameters()}
    expected_order = [id(p) for m in kfac_modules for p in (m.weight, m.bias)]
    assert kfac_ids == expected_order


def test_time_dependence_and_determinism():
    model = _model(SMALL_RGB).eval()
    x = torch.randn(2, 3, 32, 32)
    out_a = model(x, torch.tensor([10, 10]))
    out_b = model(x, torch.tensor([500, 500]))
    assert (out_a - out_b).abs().max() > 1e-4
    torch.testing.assert_close(model(x, torch.tensor([10, 10])), out_a, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [TINY_DIGITS, SMALL_RGB], ids=["tiny_digits", "small_rgb"])
def test_batch_elements_do_not_interact(cfg):
    model = _model(cfg).double().eval()
    x = torch.randn(4, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=torch.float64)
    t = torch.tensor([1, 50, 400, 999])
    batched = model(x, t)
    for i in range(4):
        alone = model(x[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(alone, batched[i : i + 1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("cfg", [TINY_DIGITS, SMALL_RGB], ids=["tiny_digits", "small_rgb"])
def test_gradient_reaches_every_parameter(cfg):
    model = _model(cfg).train()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    model(x, torch.tensor([3, 600])).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for p in kfac_parameters(model):
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"image_size": 6, "channel_mults": (1, 2, 2)}, "image_size"),
        ({"norm_groups": 5}, "norm_groups"),
        ({"base_channels": 12}, "norm_groups"),
        ({"attn_resolutions": (2,)}, "attn_resolutions"),
        ({"channel_mults": ()}, "channel_mults"),
        ({"channel_mults": (1, 0)}, "channel_mults"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"dropout": 1.0}, "dropout"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_invalid_config_raises(change, field):
    with pytest.raises(ValueError, match=field):
        UNet(dataclasses.replace(TINY_DIGITS, **change))


class _FixedT(nn.Module):
    """Single-input wrapper for curvlinops: x -> model(x, t).flatten(1) with t held fixed."""

    def __init__(self, model: UNet, t: torch.Tensor):
        super().__init__()
        self.model, self.t = model, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.t).flatten(1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_curvlinops_kfac_smoke():
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    model = UNet(TINY_DIGITS).eval()
    x, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    wrapper = _FixedT(model, torch.tensor([1, 10, 100, 1000]))
    params = kfac_parameters(model)
    kfac = curvlinops.KFACLinearOperator(
        wrapper, nn.MSELoss(), params, [(x, eps.flatten(1))], num_data=4
    )
    dim = sum(p.numel() for p in params)
    assert kfac.shape == (dim, dim)
    v = torch.randn(dim)
    out = kfac @ v
    assert out.shape == (dim,)
    assert torch.isfinite(out).all()
    # Every Linear/Conv2d (attention projections on (B, HW, C) tokens included) gets a
    # non-zero curvature block, i.e. K-FAC's hooks saw every module.
    blocks = kfac @ [torch.randn_like(p) for p in params]
    assert all(b.abs().sum() > 0 for b in blocks)
