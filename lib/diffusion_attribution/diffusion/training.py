"""Training a DDPM on a (subset of a) training set (App. G.5).

Minimises the diffusion loss of eq. 3 (per-pixel mean of eq. 2, as in Ho et al.'s code: the
same minimiser, a learning rate that does not depend on the image size) with AdamW, a linear
warm-up followed by a cosine decay of the learning rate, gradient-norm clipping and an
exponential moving average (EMA) of the weights. Later stages use the EMA weights.

Determinism: the initialisation, the batch order and every (t, eps) draw come from
generators seeded with ``seed``, so the same seed and data give the same model. Checkpoints
hold only tensors and plain Python values (loadable with ``weights_only=True``), are written
atomically, and carry the generator states, so an interrupted run resumes where it stopped
and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tqdm.auto
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion_attribution.core import identity
from diffusion_attribution.core.io import atomic_save, check_finite, load
from diffusion_attribution.core.sections import ModelConfig, TrainConfig
from diffusion_attribution.diffusion import ddpm, unet
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample, sample_timesteps
from diffusion_attribution.diffusion.unet import UNet, UNetConfig


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warm-up, then cosine to 0."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class TrainResult:
    """The trained network, its EMA copy (used downstream) and the loss per step."""

    model: nn.Module
    ema_model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_ddpm(
    model_fn: Callable[[], nn.Module],
    images: Tensor,
    schedule: NoiseSchedule,
    cfg: TrainConfig,
    *,
    checkpoint_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "training",
) -> TrainResult:
    """Train ``model_fn()`` on ``images`` (N, C, H, W) in [-1, 1] for ``cfg.steps`` steps.

    ``model_fn`` builds the network; it is called after seeding with ``cfg.seed`` so that the
    initialisation is part of the seeded state. With ``checkpoint_path``, the full training
    state is saved every ``cfg.checkpoint_every`` steps and at the end, and an existing
    checkpoint is resumed from (a finished one returns at once).
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}"
        )
    torch.manual_seed(cfg.seed)
    model = model_fn().to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    # Separate streams: batch order, (t, eps) draws, and dropout (the global torch RNG).
    g_batch = torch.Generator().manual_seed(cfg.seed + 1)
    g_noise = torch.Generator().manual_seed(cfg.seed + 2)
    n = len(images)
    bs = min(cfg.batch_size, n)
    perm, pos = torch.randperm(n, generator=g_batch), 0
    step, losses, seconds = 0, [], 0.0

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        g_batch.set_state(state["g_batch"])
        g_noise.set_state(state["g_noise"])
        torch.set_rng_state(state["torch_rng"])
        perm, pos, step = state["perm"], state["pos"], state["step"]
        losses, seconds = list(state["losses"]), state["seconds"]

    def save() -> None:
        if ckpt is None:
            return
        atomic_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "lr_schedule": sched.state_dict(),
                "g_batch": g_batch.get_state(),
                "g_noise": g_noise.get_state(),
                "torch_rng": torch.get_rng_state(),
                "perm": perm,
                "pos": pos,
                "step": step,
                "losses": losses,
                "seconds": seconds,
            },
            ckpt,
        )

    model.train()
    bar = tqdm.auto.tqdm(
        total=cfg.steps, initial=step, desc=desc, disable=not progress, mininterval=2
    )
    start = time.perf_counter() - seconds
    while step < cfg.steps:
        if pos + bs > n:  # new epoch: reshuffle
            perm, pos = torch.randperm(n, generator=g_batch), 0
        x0 = images[perm[pos : pos + bs]].to(device)
        pos += bs
        t = sample_timesteps(bs, schedule.num_timesteps, g_noise)
        eps = torch.randn(x0.shape, generator=g_noise).to(device)
        t = t.to(device)
        xt = q_sample(schedule, x0, t, eps)
        loss = (eps - model(xt, t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            seconds = time.perf_counter() - start
            save()
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    ema.module.eval()
    return TrainResult(model=model, ema_model=ema.module, losses=losses, seconds=seconds)


def build_model(model_cfg: ModelConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """The U-Net of ``model_cfg`` for images of shape (C, H, W) (square)."""
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"the U-Net needs square images, got {h}x{w}")
    return UNet(UNetConfig(in_channels=c, image_size=h, **model_cfg.model_dump()))


def save_model(
    path: str | Path, model: nn.Module, model_cfg: ModelConfig, image_shape: tuple[int, ...]
) -> None:
    """Weights plus what is needed to rebuild the network, loadable with ``weights_only=True``."""
    atomic_save(
        {
            "state_dict": model.state_dict(),
            "model_config": model_cfg.model_dump(mode="json"),
            "image_shape": list(image_shape),
        },
        path,
    )


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild and load a network saved by :func:`save_model`, in eval mode."""
    state = torch.load(path, map_location=device, weights_only=True)
    model = build_model(ModelConfig(**state["model_config"]), tuple(state["image_shape"]))
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def load_checked_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """:func:`load_model` after checking the file: a corrupt one (truncated, bit-flipped, a
    pickle) raises :class:`~diffusion_attribution.core.io.CorruptFileError` and a weight that
    is not finite :class:`~diffusion_attribution.core.io.NonFiniteError`, each naming the file
    (and the layer, index and value)."""
    state = load(path, "model")
    check_finite(state["state_dict"], f"load_model({path})")
    return load_model(path, device=device)


def fingerprint(*parts: object) -> str:
    """Short stable hash naming a resumable checkpoint (or a model) of one training run.

    :func:`~diffusion_attribution.core.identity.fingerprint` of the training recipe -- the
    :func:`~diffusion_attribution.core.identity.code_digest` of the modules that define the
    training (this one, ``ddpm``, ``unet``), docstrings and comments not included -- and the
    given configs / tensors. So a checkpoint left by an interrupted run is never resumed after
    the code that produced it has changed, while an edited comment or docstring renames
    nothing (what an identity covers: :mod:`diffusion_attribution.core.identity`).
    """
    recipe = identity.code_digest(sys.modules[__name__], ddpm, unet)
    return identity.fingerprint(recipe, *parts)
