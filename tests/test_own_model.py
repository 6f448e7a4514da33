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
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
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
    import torch

    import diffusion_attribution as da

    class Eps(torch.nn.Module):  # (x_t, t) -> eps; the library counts t = 1..T, diffusers 0..T-1
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t):
            return self.unet(x, t - 1).sample

    model = Eps(unet).eval()
    betas = torch.cat([torch.zeros(1), scheduler.betas]).double()  # index 0: t = 0, no noise
    schedule = da.NoiseSchedule(betas, 1 - betas, torch.cumprod(1 - betas, 0))
    loss = da.DiffusionLoss(schedule)
    params = da.kfac_parameters(model)
    d = loss.draw(train_images, torch.arange(len(train_images)), 8, seed=0)
    K = da.fit_kfac(model, params, schedule, train_images, d["t"], d["eps"])  # MC Fisher, expand
    key = da.ScoreKey("kfac", "loss", curvature="K", damping=1e-3)
    draws = dict(train_measurement=loss, train_draws=64, query_draws=64, seed=0)
    scores, _ = da.attribute(
        model, params, train_images, queries, {"loss": loss}, {"K": K}, [key], **draws
    )
    scores[key]  # (queries, N): score[q, j] ~ m(theta_{-j}, x_q) - m(theta, x_q)
    # end README
    return scores[key], schedule


@pytest.fixture(scope="module")
def attributed():
    unet, scheduler = tiny_unet_and_scheduler()
    train_images = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    losses = train(unet, scheduler, train_images, STEPS)
    samples = generate(unet, scheduler, Q)
    # the queries: generated samples, then two training images (for the sanity check)
    queries = torch.cat([samples, train_images[:2]])
    scores, schedule = readme_example(unet, scheduler, train_images, queries)
    return {"scores": scores, "losses": losses, "schedule": schedule, "scheduler": scheduler}


def test_training_ran_and_the_schedule_is_the_schedulers(attributed):
    losses = attributed["losses"]
    assert sum(losses[-10:]) < sum(losses[:10]), losses  # a few steps do lower the loss
    s, sch = attributed["schedule"], attributed["scheduler"]
    # library t = diffusers index + 1
    torch.testing.assert_close(s.alpha_bars[1:], sch.alphas_cumprod.double())


def test_scores_are_finite_and_shaped(attributed):
    scores = torch.as_tensor(attributed["scores"])
    assert scores.shape == (Q + 2, N)
    assert torch.isfinite(scores).all() and scores.abs().sum() > 0


def test_a_training_image_is_its_own_top_influence(attributed):
    """Removing x_j raises the loss on x_j most: as a query, a training image has itself as
    its most positive score."""
    scores = torch.as_tensor(attributed["scores"])
    for q, j in ((Q, 0), (Q + 1, 1)):
        assert int(scores[q].argmax()) == j, scores[q]


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
    assert len(code.splitlines()) >= 10
    assert code in readme_blocks(), (
        "the README's diffusers example differs from tests/test_own_model.py:\n" + code
    )
