"""Attributing a model of one's own: a diffusers ``UNet2DModel`` with its ``DDPMScheduler``,
trained here for a few steps (nothing downloaded), attributed through the public API only.

The block between the ``README`` markers below is the README's "Use the library on your own
model" example for diffusers, verbatim (checked by ``test_readme_shows_this_code``)."""

import re
import textwrap
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

README = Path(__file__).resolve().parents[1] / "README.md"
N, Q, STEPS = 12, 3, 40


def tiny_unet_and_scheduler():
    """A small diffusers U-Net with self-attention at 4x4, and its DDPM scheduler."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    return unet, scheduler


def train(unet, scheduler, images, steps: int) -> list[float]:
    """The standard diffusers training loop: eps-prediction MSE at uniform timesteps."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    unet.train()
    for _ in range(steps):
        noise = torch.randn(images.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=g)
        pred = unet(scheduler.add_noise(images, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def generate(unet, scheduler, n: int) -> torch.Tensor:
    """Ancestral sampling with the scheduler's own step."""
    g = torch.Generator().manual_seed(2)
    unet.eval()
    x = torch.randn((n, 1, 8, 8), generator=g)
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, generator=g).prev_sample
    return x


def readme_example(unet, scheduler, train_images, queries):
    """The README's example: ``unet`` and ``scheduler`` from diffusers, ``train_images`` the
    training set (N, C, H, W), ``queries`` the images to attribute (e.g. generated samples)."""
    # README
    import diffusion_attribution as da

    attributor = da.Attributor.from_diffusers(unet, scheduler, train_images)
    scores = attributor.scores(queries)  # K-FAC influence on the diffusion loss
    values, indices = scores.top(3)  # per query: the training images whose removal hurts most
    elbo = attributor.scores(queries, "elbo", settings=da.ScoreSettings(damping=1e-3))
    # end README
    return scores, indices, elbo


def low_level(unet, scheduler, train_images, queries):
    """The same scores from the low-level functions the pipeline calls."""
    import diffusion_attribution as da
    from diffusion_attribution.attributor import DiffusersEps, schedule_from_betas

    model = DiffusersEps(unet).eval()
    schedule = schedule_from_betas(scheduler.betas)
    loss = da.DiffusionLoss(schedule)
    params = da.kfac_parameters(model)
    d = loss.draw(train_images, torch.arange(len(train_images)), 8, seed=2)
    K = da.fit_kfac(
        model, params, schedule, train_images, d["t"], d["eps"], batch_size=512, mc_seed=2
    )
    key = da.ScoreKey(
        "kfac", "loss", "mc_expand", damping=1e-8 * K.mean_eigenvalue(), compression="int8"
    )
    draws = dict(train_measurement=loss, train_draws=256, query_draws=256, seed=3)
    scores, _ = da.attribute(
        model, params, train_images, queries, {"loss": loss}, {"mc_expand": K}, [key], **draws
    )
    return scores[key]


@pytest.fixture(scope="module")
def attributed():
    unet, scheduler = tiny_unet_and_scheduler()
    train_images = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    losses = train(unet, scheduler, train_images, STEPS)
    samples = generate(unet, scheduler, Q)
    # the queries: generated samples, then two training images (for the sanity check)
    queries = torch.cat([samples, train_images[:2]])
    scores, indices, elbo = readme_example(unet, scheduler, train_images, queries)
    return {
        "scores": scores,
        "indices": indices,
        "elbo": elbo,
        "low_level": low_level(unet, scheduler, train_images, queries),
        "losses": losses,
    }


def test_training_ran(attributed):
    losses = attributed["losses"]
    assert sum(losses[-10:]) < sum(losses[:10]), losses  # a few steps do lower the loss


def test_scores_are_finite_and_shaped(attributed):
    for result in (attributed["scores"], attributed["elbo"]):
        assert result.matrix.shape == (Q + 2, N)
        assert torch.isfinite(result.matrix).all() and result.matrix.abs().sum() > 0
    assert attributed["indices"].shape == (Q + 2, 3)
    assert attributed["elbo"].measurement == "elbo"


def test_scores_are_the_low_level_paths(attributed):
    assert torch.equal(attributed["scores"].matrix, attributed["low_level"])


def test_a_training_image_is_its_own_top_influence(attributed):
    """Removing x_j raises the loss on x_j most: as a query, a training image has itself as
    its most positive score."""
    top = attributed["indices"][:, 0]
    assert top[Q:].tolist() == [0, 1], attributed["scores"].matrix[Q:]


def code_between_markers() -> str:
    text = Path(__file__).read_text()
    block = re.search(r"\n( *)# README\n(.*?)\n *# end README\n", text, re.S)
    return textwrap.dedent(block.group(2)) + "\n"


def readme_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Use the library on your own model") :]
    section = section[: section.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_shows_this_code():
    code = code_between_markers()
    assert 3 <= len([line for line in code.splitlines() if line.strip()]) <= 8
    assert code in readme_blocks(), (
        "the README's diffusers example differs from tests/test_own_model.py:\n" + code
    )
