"""StackedUNet: M U-Nets as one network, checked against each UNet in float64."""

import pytest
import torch

from diffusion_attribution.diffusion.stacked import StackedUNet, stack_inputs, unstack_outputs
from diffusion_attribution.diffusion.unet import UNet, UNetConfig

CONFIG = UNetConfig(
    in_channels=2, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
    attn_resolutions=(4,), dropout=0.0, norm_groups=4,
)  # fmt: skip


@pytest.fixture
def models() -> list[UNet]:
    torch.manual_seed(0)
    nets = [UNet(CONFIG).double() for _ in range(3)]
    with torch.no_grad():  # distinct weights everywhere, GroupNorm affine parameters included
        for net in nets:
            for p in net.parameters():
                p.normal_(0.0, 0.3)
    return nets


@pytest.mark.parametrize("shared_t", [True, False], ids=["shared-t", "per-model-t"])
def test_outputs_and_gradients_are_each_models_own(models, shared_t):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64) for _ in models]
    t = torch.randint(1, 100, (4,) if shared_t else (3, 4), generator=g)
    stacked = StackedUNet.from_models(models)
    out = unstack_outputs(stacked(stack_inputs(xs), t), 3)
    targets = [torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64) for _ in models]
    sum((o - y).pow(2).mean() for o, y in zip(out, targets, strict=False)).backward()
    grads = dict(stacked.named_parameters())
    for i, (net, x, y) in enumerate(zip(models, xs, targets, strict=False)):
        ti = t if shared_t else t[i]
        pred = net(x, ti)
        torch.testing.assert_close(out[i], pred, rtol=0, atol=1e-12)
        (pred - y).pow(2).mean().backward()
        for name, p in net.named_parameters():
            mine = grads[name].grad.unflatten(0, (3, -1))[i].reshape(p.shape)
            torch.testing.assert_close(mine, p.grad, rtol=0, atol=1e-12, msg=name)


def test_stack_and_unstack_round_trip(models):
    stacked = StackedUNet.from_models(models)
    assert set(stacked.state_dict()) == set(models[0].state_dict())
    for net, weights in zip(models, stacked.unstack(), strict=False):
        for name, tensor in net.state_dict().items():
            assert torch.equal(weights[name], tensor), name


def test_models_of_other_configs_do_not_stack(models):
    other = UNet(UNetConfig(**{**CONFIG.__dict__, "base_channels": 4})).double()
    with pytest.raises(ValueError, match="2 configs, need one"):
        StackedUNet.from_models([models[0], other])
