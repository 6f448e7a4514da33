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

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tqdm.auto
from torch import Tensor, nn

from diffusion_attribution.core import identity
from diffusion_attribution.core.io import atomic_save, check_finite, load
from diffusion_attribution.core.sections import ModelConfig, TrainConfig
from diffusion_attribution.diffusion import ddpm, stacked, unet
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample, sample_timesteps
from diffusion_attribution.diffusion.stacked import (
    StackedUNet,
    per_model_view,
    stack_inputs,
    unstack_outputs,
)
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
    model_fn: Callable[[], UNet],
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
    checkpoint is resumed from (a finished one returns at once). One run of
    :func:`train_stack`.
    """
    (result,) = train_stack(
        model_fn, [images], schedule, [cfg], checkpoint_path=checkpoint_path, device=device,
        progress=progress, desc=desc,
    )  # fmt: skip
    return result


def _check_stack(image_sets: Sequence[Tensor], cfgs: Sequence[TrainConfig]) -> int:
    """The common batch size of a stack, after checking that its runs can share one step."""
    if not image_sets or len(image_sets) != len(cfgs):
        raise ValueError(f"train_stack: {len(image_sets)} image sets for {len(cfgs)} configs")
    for i, images in enumerate(image_sets):
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(
                f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}"
                + (f" (run {i} of the stack)" if len(image_sets) > 1 else "")
            )
    shared = {repr(c.model_dump(exclude={"seed"})) for c in cfgs}
    if len(shared) != 1:
        raise ValueError("train_stack: the runs of a stack must share every setting but seed")
    sizes = {min(cfgs[0].batch_size, len(x)) for x in image_sets}
    if len(sizes) != 1:
        raise ValueError(f"train_stack: the runs would use batch sizes {sorted(sizes)}, need one")
    return sizes.pop()


def train_stack(
    model_fn: Callable[[], UNet],
    image_sets: Sequence[Tensor],
    schedule: NoiseSchedule,
    cfgs: Sequence[TrainConfig],
    *,
    checkpoint_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "training",
) -> list[TrainResult]:
    """M independent training runs in one batched computation: run ``i`` trains
    ``model_fn()`` (seeded with ``cfgs[i].seed``) on ``image_sets[i]`` with ``cfgs[i]``.

    The runs must share every setting but the seed, and the batch size. Each run has its own
    initialisation, batch order, (t, eps) stream, per-model gradient clipping, AdamW state and
    EMA, exactly as if it were trained alone; only the arithmetic is shared, through a
    :class:`~diffusion_attribution.diffusion.stacked.StackedUNet` (one grouped convolution
    for the M models instead of M small ones, one optimizer step for all parameters). Dropout
    masks come from the one global generator seeded by the last run's seed (the default
    profile has no dropout).
    """
    bs = _check_stack(image_sets, cfgs)
    cfg, m = cfgs[0], len(cfgs)
    nets = _initial_models(model_fn, cfgs)
    model = StackedUNet.from_models(nets).to(device)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    # Separate streams per run: batch order and (t, eps) draws; dropout: the global torch RNG.
    g_batch = [torch.Generator().manual_seed(c.seed + 1) for c in cfgs]
    g_noise = [torch.Generator().manual_seed(c.seed + 2) for c in cfgs]
    sizes = [len(x) for x in image_sets]
    perms = [torch.randperm(n, generator=g) for n, g in zip(sizes, g_batch, strict=False)]
    pos, step, losses, seconds = [0] * m, 0, [[] for _ in range(m)], 0.0

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        for e, saved in zip(ema, state["ema"], strict=False):
            e.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        for g, saved in zip(g_batch + g_noise, state["g_batch"] + state["g_noise"], strict=False):
            g.set_state(saved)
        torch.set_rng_state(state["torch_rng"])
        perms, pos, step = list(state["perm"]), list(state["pos"]), state["step"]
        losses, seconds = [list(x) for x in state["losses"]], state["seconds"]

    def save() -> None:
        if ckpt is None:
            return
        atomic_save(
            {
                "model": model.state_dict(),
                "ema": ema,
                "optimizer": opt.state_dict(),
                "lr_schedule": sched.state_dict(),
                "g_batch": [g.get_state() for g in g_batch],
                "g_noise": [g.get_state() for g in g_noise],
                "torch_rng": torch.get_rng_state(),
                "perm": perms,
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
        x0, t, eps = _draw_batch(image_sets, perms, pos, bs, schedule, g_batch, g_noise)
        x0, t, eps = x0.to(device), t.to(device), eps.to(device)
        # eq. 1 per run, then the M runs side by side (channels [i C, (i + 1) C) are run i's)
        xt = stack_inputs([q_sample(schedule, x0[i], t[i], eps[i]) for i in range(m)])
        out = unstack_outputs(model(xt, t), m)
        loss = (eps - out).pow(2).flatten(1).mean(dim=1)  # eq. 3 per run, shape (M,)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # run i's parameters get run i's gradient
        _clip_per_model(params, m, cfg.grad_clip)
        opt.step()
        sched.step()
        _update_ema(ema, params, cfg.ema_decay, first=step == 0)
        step += 1
        for run_losses, value in zip(losses, loss.tolist(), strict=False):
            run_losses.append(value)
        bar.update(1)
        if step % 50 == 0:
            recent = sum(sum(x[-50:]) for x in losses) / (50 * m)
            bar.set_postfix(loss=f"{recent:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            seconds = time.perf_counter() - start
            save()
    bar.close()
    seconds = time.perf_counter() - start
    return _results(nets, model, ema, losses, seconds, device)


def _results(
    nets: Sequence[UNet],
    model: StackedUNet,
    ema: Sequence[Tensor],
    losses: Sequence[list[float]],
    seconds: float,
    device: torch.device | str,
) -> list[TrainResult]:
    """Per run: ``nets[i]`` with its trained weights, a copy with its EMA weights, its losses."""
    trained, averaged = model.unstack(), _unstack_ema(model, ema)
    results = []
    for net, weights, ema_weights, run_losses in zip(nets, trained, averaged, losses, strict=True):
        ema_net = copy.deepcopy(net)
        net.load_state_dict(weights)
        ema_net.load_state_dict(ema_weights)
        results.append(
            TrainResult(
                model=net.to(device).eval(),
                ema_model=ema_net.to(device).eval(),
                losses=run_losses,
                seconds=seconds,
            )
        )
    return results


def _initial_models(model_fn: Callable[[], UNet], cfgs: Sequence[TrainConfig]) -> list[UNet]:
    """``model_fn()`` after seeding with each run's seed: the initialisations."""
    nets = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        nets.append(model_fn())
    if not all(isinstance(net, UNet) for net in nets):
        raise TypeError("train_stack: model_fn must build a diffusion_attribution UNet")
    return nets


def _draw_batch(
    image_sets: Sequence[Tensor],
    perms: list[Tensor],
    pos: list[int],
    bs: int,
    schedule: NoiseSchedule,
    g_batch: Sequence[torch.Generator],
    g_noise: Sequence[torch.Generator],
) -> tuple[Tensor, Tensor, Tensor]:
    """Each run's next batch (reshuffled at a new epoch) and its (t, eps) draws, stacked
    along a leading run axis: x0 and eps (M, B, C, H, W), t (M, B). Advances ``perms`` and
    ``pos`` in place."""
    x0s, ts, epss = [], [], []
    for i, images in enumerate(image_sets):
        if pos[i] + bs > len(images):  # new epoch: reshuffle
            perms[i], pos[i] = torch.randperm(len(images), generator=g_batch[i]), 0
        x0 = images[perms[i][pos[i] : pos[i] + bs]]
        pos[i] += bs
        ts.append(sample_timesteps(bs, schedule.num_timesteps, g_noise[i]))
        epss.append(torch.randn(x0.shape, generator=g_noise[i]))
        x0s.append(x0)
    return torch.stack(x0s), torch.stack(ts), torch.stack(epss)


def _clip_per_model(params: Sequence[Tensor], m: int, max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_`` for each run of a stack on its own gradient: run i's
    gradient g_i is scaled by min(1, max_norm / (||g_i|| + 1e-6))."""
    grads = [per_model_view(p.grad, m) for p in params]
    sq = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(m, *([1] * (g.dim() - 1))))


@torch.no_grad()
def _update_ema(ema: Sequence[Tensor], params: Sequence[Tensor], decay: float, first: bool) -> None:
    """EMA of the weights, as ``AveragedModel`` with ``get_ema_multi_avg_fn``: the first
    update copies the weights, later ones do ``ema <- decay ema + (1 - decay) theta``."""
    for e, p in zip(ema, params, strict=False):
        if first:
            e.copy_(p)
        else:
            e.lerp_(p, 1.0 - decay)


def _unstack_ema(model: StackedUNet, ema: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """Per-run state dicts of the EMA weights (the stacked model's buffers are its own)."""
    names = [name for name, _ in model.named_parameters()]
    return model.unstack({**model.state_dict(), **dict(zip(names, ema, strict=True))})


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
    training (this one, ``ddpm``, ``stacked``, ``unet``), docstrings and comments not included -- and the
    given configs / tensors. So a checkpoint left by an interrupted run is never resumed after
    the code that produced it has changed, while an edited comment or docstring renames
    nothing (what an identity covers: :mod:`diffusion_attribution.core.identity`).
    """
    recipe = identity.code_digest(sys.modules[__name__], ddpm, stacked, unet)
    return identity.fingerprint(recipe, *parts)
