"""LoRA fine-tuning of a trained U-Net (beyond the paper), with `peft`_.

A base model ``eps_theta0`` trained on one part of the data is adapted to a small
fine-tuning set by low-rank updates of every layer K-FAC covers (all ``nn.Linear`` and
``nn.Conv2d``, :func:`~diffusion_attribution.diffusion.unet.kfac_parameters`): a layer with
weight ``W0`` computes

    W x = W0 x + (alpha / r) B A x,      A: (r, d_in[, k, k]),  B: (d_out, r[, 1, 1]),

(Hu et al., 2021; for a convolution ``A`` is a k x k convolution to ``r`` channels and ``B`` a
1x1 convolution, `peft`_'s ``lora.Conv2d``). ``B`` starts at zero, so the adapted model starts
as the base. Only ``A`` and ``B`` are trained and attributed: :func:`lora_parameters` is the
parameter list the curvature, the gradients and the projections then use, and the training
data being attributed is the fine-tuning set alone (the base is shared by every model).

The fine-tuning loop (:func:`finetune_lora`) is the one of
:func:`~diffusion_attribution.diffusion.training.train_stack` for a single run -- AdamW,
linear warm-up then cosine, per-model gradient clipping, EMA of the trained weights, the
batch-order stream seeded with ``seed + 1`` and the (t, eps) stream with ``seed + 2`` -- over
the LoRA parameters only, seeded with ``seed`` before the adapters are initialised. A model
is saved twice: as the adapter model (:func:`save_lora`, for attribution) and merged into a
plain :class:`~diffusion_attribution.diffusion.unet.UNet` (:func:`merged_unet`, the same
function up to rounding) for sampling and measuring, which therefore need no LoRA code.

.. _peft: https://github.com/huggingface/peft
"""

from __future__ import annotations

import copy
import re
import sys
import time
from pathlib import Path

import torch
import tqdm.auto
from torch import Tensor, nn

from diffusion_attribution.core.io import atomic_save, check_finite, load
from diffusion_attribution.core.sections import ModelConfig, TrainConfig
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample, sample_timesteps
from diffusion_attribution.diffusion.training import (
    TrainResult,
    build_model,
    load_checked_model,
    lr_lambda,
)
from diffusion_attribution.diffusion.unet import kfac_parameters


def _peft():
    """Import `peft`. Its import of ``transformers`` imports torchvision when it is installed;
    the torchvision that curvlinops' dependencies pull in beside the CPU torch fails at import
    with a RuntimeError (its operators do not match torch's). Nothing here needs torchvision,
    so it is hidden from that import unless something imported it already."""
    sys.modules.setdefault("torchvision", None)
    import peft

    return peft


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the modules LoRA adapts: every ``nn.Linear`` and ``nn.Conv2d``, the layers
    K-FAC covers."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def add_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """``model`` with a rank-``rank`` adapter of scale ``alpha / rank`` on every layer of
    :func:`lora_targets` (in place; returned). Every other parameter is frozen
    (``requires_grad = False``); ``A`` is drawn from the global torch generator (seed it
    first), ``B`` is zero."""
    peft = _peft()
    pattern = "^(" + "|".join(re.escape(n) for n in lora_targets(model)) + ")$"
    config = peft.LoraConfig(
        r=int(rank), lora_alpha=float(alpha), target_modules=pattern, lora_dropout=0.0
    )
    return peft.inject_adapter_in_model(config, model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of the adapted layers (every ``A`` and ``B``), in module order:
    the parameter list attribution uses for a LoRA model."""
    params = [p for p in kfac_parameters(model) if p.requires_grad]
    if not params:
        raise ValueError("lora_parameters: the model has no trainable LoRA weights")
    return params


def merged_unet(
    model: nn.Module, model_cfg: ModelConfig, image_shape: tuple[int, ...]
) -> nn.Module:
    """A plain U-Net computing ``W0 + (alpha / r) B A`` in every adapted layer: the LoRA model
    folded into its base weights (``model`` is not changed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    folded = copy.deepcopy(model).cpu()
    for module in folded.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {
        k.replace(".base_layer", ""): v for k, v in folded.state_dict().items() if ".lora_" not in k
    }
    net = build_model(model_cfg, tuple(image_shape)).to(next(folded.parameters()).dtype)
    net.load_state_dict(state)
    return net.eval()


def save_lora(
    path: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    image_shape: tuple[int, ...],
    rank: int,
    alpha: float,
) -> None:
    """The adapter model (base and adapter weights) and what rebuilds it, loadable with
    ``weights_only=True`` (:func:`load_lora`)."""
    atomic_save(
        {
            "state_dict": model.state_dict(),
            "model_config": model_cfg.model_dump(mode="json"),
            "image_shape": list(image_shape),
            "lora": {"rank": int(rank), "alpha": float(alpha)},
        },
        path,
    )


def load_lora(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_lora`, in eval mode, its base frozen. A corrupt
    file or a weight that is not finite raises an error naming the file."""
    state = load(path, "LoRA model")
    check_finite(state["state_dict"], f"load_lora({path})")
    net = build_model(ModelConfig(**state["model_config"]), tuple(state["image_shape"]))
    net = add_lora(net, state["lora"]["rank"], state["lora"]["alpha"])
    net.load_state_dict(state["state_dict"])
    return net.to(device).eval()


def load_attributed(
    model_path: str | Path, lora_path: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model whose samples are attributed and the parameters attribution covers: the
    LoRA model of ``lora_path`` and :func:`lora_parameters` when it is given, else the model
    of ``model_path`` and every Linear / Conv2d weight."""
    if lora_path is not None:
        net = load_lora(lora_path, device=device)
        return net, lora_parameters(net)
    net = load_checked_model(model_path, device=device)
    return net, kfac_parameters(net)


def finetune_lora(
    base: nn.Module,
    images: Tensor,
    schedule: NoiseSchedule,
    cfg: TrainConfig,
    *,
    rank: int,
    alpha: float,
    checkpoint_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "LoRA fine-tuning",
) -> TrainResult:
    """Adapt a copy of ``base`` to ``images`` (N, C, H, W) with LoRA for ``cfg.steps`` steps
    (the module docstring); ``base`` is not changed. With ``checkpoint_path`` the state is
    saved every ``cfg.checkpoint_every`` steps and at the end and resumed from, ending with
    the same weights as an uninterrupted run. Returns the adapted model and its EMA copy."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}"
        )
    torch.manual_seed(cfg.seed)
    model = add_lora(copy.deepcopy(base).cpu(), rank, alpha).to(device)
    params = lora_parameters(model)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    g_batch = torch.Generator().manual_seed(cfg.seed + 1)
    g_noise = torch.Generator().manual_seed(cfg.seed + 2)
    n, bs = len(images), min(cfg.batch_size, len(images))
    perm, pos, step, losses, seconds = torch.randperm(n, generator=g_batch), 0, 0, [], 0.0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        with torch.no_grad():
            for p, e, saved, saved_e in zip(
                params, ema, state["params"], state["ema"], strict=True
            ):
                p.copy_(saved)
                e.copy_(saved_e)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        g_batch.set_state(state["g_batch"])
        g_noise.set_state(state["g_noise"])
        perm, pos, step = state["perm"], state["pos"], state["step"]
        losses, seconds = list(state["losses"]), state["seconds"]
    model.train()
    bar = tqdm.auto.tqdm(
        total=cfg.steps, initial=step, desc=desc, disable=not progress, mininterval=2
    )
    start = time.perf_counter() - seconds
    while step < cfg.steps:
        if pos + bs > n:  # new epoch: reshuffle
            perm, pos = torch.randperm(n, generator=g_batch), 0
        x0 = images[perm[pos : pos + bs]]
        pos += bs
        t = sample_timesteps(bs, schedule.num_timesteps, g_noise)
        eps = torch.randn(x0.shape, generator=g_noise)
        x0, t, eps = x0.to(device), t.to(device), eps.to(device)
        out = model(q_sample(schedule, x0, t, eps), t)
        loss = (eps - out).pow(2).mean()  # eq. 3, per-pixel mean as in training
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                if step == 0:  # the first update copies, as in training
                    e.copy_(p)
                else:
                    e.lerp_(p, 1.0 - cfg.ema_decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            seconds = time.perf_counter() - start
            atomic_save(
                {
                    "params": [p.detach() for p in params],
                    "ema": ema,
                    "optimizer": opt.state_dict(),
                    "lr_schedule": sched.state_dict(),
                    "g_batch": g_batch.get_state(),
                    "g_noise": g_noise.get_state(),
                    "perm": perm,
                    "pos": pos,
                    "step": step,
                    "losses": losses,
                    "seconds": seconds,
                },
                ckpt,
            )
    bar.close()
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(lora_parameters(ema_model), ema, strict=True):
            p.copy_(e)
    return TrainResult(
        model=model.eval(),
        ema_model=ema_model.eval(),
        losses=losses,
        seconds=time.perf_counter() - start,
    )
