"""Per-example gradients of every measurement against a loop of plain autograd calls."""

import pytest
import torch

from diffusion_attribution.diffusion.ddpm import NoiseSchedule, sample
from diffusion_attribution.diffusion.gradients import (
    flatten_params,
    gradient_matrix,
    per_example_gradients,
)
from diffusion_attribution.diffusion.likelihood import quantize
from diffusion_attribution.diffusion.measurements import make_measurement
from diffusion_attribution.diffusion.unet import UNet, UNetConfig, kfac_parameters
from tests.helpers import TINY_4X4

T, N, S = 20, 5, 6
CFG = TINY_4X4
NAMES = ["loss", "l_t=1", "l_t=13", "elbo", "trajectory", "square_norm"]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T, 1e-4, 0.3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(CFG).double().eval()


@pytest.fixture(scope="module")
def examples(schedule, model):
    """Generated samples (quantised for the ELBO) with their recorded trajectories."""
    res = sample(model.float(), schedule, N, (1, 4, 4), seed=1, record_trajectory=True)
    model.double()
    return quantize(res.x0, 17).double(), res.trajectory.double()


def setup(name, schedule, examples, num_draws=S):
    x0, traj = examples
    meas = make_measurement(name, schedule, **({"levels": 17} if name == "elbo" else {}))
    draws = meas.draw(x0, torch.arange(N), num_draws, seed=2, trajectories=traj)
    if name in ("elbo", "trajectory"):  # make sure the t = 1 (decoder) branch is exercised
        draws["t"][:, 0] = 1
        if name == "trajectory":
            draws["x_t"][:, 0], draws["x_prev"][:, 0] = traj[1], traj[0]
    return meas, x0, draws


def loop_gradients(model, params, meas, x0, draws):
    """Row n: torch.autograd.grad of example n's measurement alone."""
    rows = []
    for n in range(x0.shape[0]):
        value = meas(model, x0[n : n + 1], {k: v[n : n + 1] for k, v in draws.items()})[0]
        grads = torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)
        rows.append(flatten_params(grads))
    return torch.stack(rows)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_matches_autograd_loop(schedule, model, examples, name, method):
    meas, x0, draws = setup(name, schedule, examples)
    params = kfac_parameters(model)
    expected = loop_gradients(model, params, meas, x0, draws)
    assert expected.abs().max() > 1e-3  # non-trivial
    got = gradient_matrix(model, params, meas, x0, draws, method=method)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    # Independent of batching and of draw chunking (chunks of 4 + 2 draws, batches of 2+2+1).
    chunked = gradient_matrix(
        model, params, meas, x0, draws, method=method, batch_size=2, draw_chunk=4, scale=-0.5
    )
    torch.testing.assert_close(chunked, -0.5 * expected, rtol=1e-9, atol=1e-10)


def test_float32_model_with_float64_computation(schedule, model, examples):
    meas, x0, draws = setup("elbo", schedule, examples)
    expected = loop_gradients(model, kfac_parameters(model), meas, x0, draws)
    model32 = UNet(CFG).eval()
    model32.load_state_dict(model.state_dict())  # float64 weights rounded to float32
    params = kfac_parameters(model32)
    got = gradient_matrix(model32, params, meas, x0.float(), draws, dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    got32 = gradient_matrix(
        model32, params, meas, x0.float(), draws | {"eps": draws["eps"].float()}
    )
    assert got32.dtype == torch.float32


def test_only_given_params_in_given_order(schedule, model, examples):
    meas, x0, draws = setup("loss", schedule, examples)
    params = kfac_parameters(model)
    full = gradient_matrix(model, params, meas, x0, draws)
    sizes = [p.numel() for p in params]
    assert full.shape == (N, sum(sizes)) == (N, flatten_params(params).numel())
    blocks = dict(zip(range(len(params)), full.split(sizes, 1), strict=True))
    chosen = [7, 2, 11, 0]  # a subset, out of module order
    sub = gradient_matrix(model, [params[i] for i in chosen], meas, x0, draws)
    torch.testing.assert_close(sub, torch.cat([blocks[i] for i in chosen], 1), rtol=0, atol=1e-12)


def test_other_parameters_fall_back_to_vmap(schedule, model, examples):
    """A GroupNorm weight is not a Linear/Conv2d parameter: 'auto' uses vmap, 'hooks' refuses."""
    meas, x0, draws = setup("square_norm", schedule, examples)
    params = [model.conv_in.weight, model.norm_out.weight, model.conv_out.bias]
    expected = loop_gradients(model, params, meas, x0, draws)
    torch.testing.assert_close(gradient_matrix(model, params, meas, x0, draws), expected)
    with pytest.raises(ValueError, match="method='hooks'"):
        gradient_matrix(model, params, meas, x0, draws, method="hooks")


def test_eval_mode_and_training_flag_restored(schedule, examples):
    """Dropout is off during the computation, and the model's mode is left as it was."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(**{**CFG.__dict__, "dropout": 0.5})).double()
    meas, x0, draws = setup("loss", schedule, examples)
    params = kfac_parameters(model)
    model.eval()
    expected = loop_gradients(model, params, meas, x0, draws)
    model.train()
    got = gradient_matrix(model, params, meas, x0, draws)
    assert model.training
    torch.testing.assert_close(got, expected)


class CountingMeasurement:
    """Wraps a measurement and records the examples each call saw."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, eps_model, x0, draws):
        self.seen.append(x0.shape[0])
        return self.inner(eps_model, x0, draws)


def test_yields_lazily_batch_by_batch(schedule, model, examples):
    meas, x0, draws = setup("loss", schedule, examples)
    counting = CountingMeasurement(meas)
    params = kfac_parameters(model)
    gen = per_example_gradients(model, params, counting, x0, draws, batch_size=2, draw_chunk=3)
    rows, g = next(gen)
    assert rows == slice(0, 2) and g.shape == (2, flatten_params(params).numel())
    assert counting.seen == [2, 2]  # two draw chunks of the first batch only
    rest = list(gen)
    assert [r for r, _ in rest] == [slice(2, 4), slice(4, 5)]
    assert counting.seen == [2, 2, 2, 2, 1, 1]


def test_errors(schedule, model, examples):
    meas, x0, draws = setup("loss", schedule, examples)
    other = UNet(CFG).double()
    with pytest.raises(ValueError, match="not a parameter of model"):
        gradient_matrix(model, kfac_parameters(other)[:2], meas, x0, draws)
    with pytest.raises(ValueError, match="twice"):
        gradient_matrix(model, [model.conv_in.weight] * 2, meas, x0, draws)
    with pytest.raises(ValueError, match="leading dims"):
        gradient_matrix(model, kfac_parameters(model), meas, x0[:3], draws)
    with pytest.raises(ValueError, match="unknown method"):
        gradient_matrix(model, kfac_parameters(model), meas, x0, draws, method="jacrev")


def test_hooks_detect_rows_not_split_by_example(schedule, model, examples):
    meas, x0, draws = setup("loss", schedule, examples)

    def odd(eps_model, x, d):  # calls the model on one row for a batch of several examples
        return meas(eps_model, x, d) + eps_model(x[:1], d["t"][:1, 0]).sum()

    with pytest.raises(RuntimeError, match="example-major"):
        gradient_matrix(model, kfac_parameters(model), odd, x0, draws, method="hooks")
