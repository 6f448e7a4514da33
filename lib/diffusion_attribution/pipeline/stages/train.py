"""Stage ``train``: the DDPM whose samples are attributed (App. G.2, G.5).

AdamW with linear warm-up then cosine decay, gradient clipping and EMA weights, everything
seeded; resumes from its last checkpoint when interrupted.
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import pandas as pd
import torch

from diffusion_attribution.core.config import Config
from diffusion_attribution.core.identity import code_digest
from diffusion_attribution.core.io import atomic_write_text
from diffusion_attribution.diffusion import conditional, lora
from diffusion_attribution.diffusion.conditional import (
    build_conditional,
    num_classes,
    per_class,
    save_conditional,
    train_conditional,
)
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.ddpm import diffusion_loss, draw_noise
from diffusion_attribution.diffusion.lora import (
    finetune_lora,
    lora_parameters,
    merged_unet,
    save_lora,
)
from diffusion_attribution.diffusion.training import (
    build_model,
    fingerprint,
    save_model,
    train_ddpm,
)
from diffusion_attribution.diffusion.unet import kfac_parameters, num_parameters
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "02_train.ipynb"
INPUTS = ("outputs/data",)
OUTS = ("outputs/train",)
PERSIST: tuple[str, ...] = ()
FIGURES = ("training_curve.png",)
METRICS = ("metrics/train.json",)

#: (t, eps) draws per training image for the reported training-set loss, and their seed.
EVAL_DRAWS, EVAL_SEED = 16, 12345
#: Training images the reported loss is averaged over (the first ones): all of digits and of
#: CIFAR-2; for CIFAR-10 the noise of all 50000 x 16 draws alone would take 9.8 GB.
EVAL_IMAGES = 5000


@torch.no_grad()
def _train_set_loss(model, schedule, images, t, eps, batch: int = 256) -> torch.Tensor:
    """Per-image loss from the given draws, batch by batch on the model's device (the draws
    stay on the CPU)."""
    device = next(model.parameters()).device
    return torch.cat(
        [
            diffusion_loss(
                model,
                schedule,
                images[i : i + batch].to(device),
                t[i : i + batch].to(device),
                eps[i : i + batch].to(device),
            ).cpu()
            for i in range(0, len(images), batch)
        ]
    )


def run(config: Config, ws: Workspace) -> StageResult:
    """Train the full model on the training set; save its EMA weights and the loss curve."""
    ds = ImageDataset.load(ws.path(ws.TRAIN_SET))
    shape = tuple(ds.images.shape[1:])
    schedule = schedule_of(config.diffusion)
    k = num_classes(ds)
    net = (
        build_conditional(config.model, shape, k)
        if config.conditional
        else build_model(config.model, shape)
    )
    n_kfac = sum(p.numel() for p in kfac_parameters(net))
    print(
        f"U-Net: {num_parameters(net):,} parameters, {n_kfac:,} in Linear/Conv2d layers (covered by K-FAC)"
    )
    if config.conditional is not None:
        sections = (config.model, config.diffusion, config.train, config.conditional)
        result, extra, note = _train_conditional(*sections, ws, ds, schedule)
    elif config.finetune is None:
        checkpoint = ws.out(
            f".cache/checkpoints/train-{fingerprint(config.model, config.diffusion, config.train, ds.images)}.pt"
        )
        result = train_ddpm(
            lambda: build_model(config.model, shape),
            ds.images,
            schedule,
            config.train,
            checkpoint_path=checkpoint,
            device=ws.device,
        )
        save_model(ws.out(ws.MODEL), result.ema_model, config.model, shape)
        checkpoint.unlink()  # it only serves to resume an interrupted run
        extra, note = {}, ""
    else:
        result, extra, note = _train_lora(
            config.model, config.diffusion, config.train, config.finetune, ws, ds.images, schedule
        )
    losses = pd.Series(result.losses, name="loss")
    atomic_write_text(losses.rename_axis("step").to_csv(), ws.out("outputs/train/losses.csv"))
    steps = config.train.steps
    print(f"{steps} steps in {result.seconds:.1f} s ({steps / result.seconds:.1f} steps/s)")
    n_eval = min(len(ds), EVAL_IMAGES)
    t_draws, eps_draws = draw_noise(
        n_eval, EVAL_DRAWS, shape, schedule.num_timesteps, seed=EVAL_SEED
    )
    eval_images = ds.images[:n_eval]

    def train_set_loss(model):
        if config.conditional is None:
            return _train_set_loss(model, schedule, eval_images, t_draws, eps_draws)
        return per_class(  # each image's loss given its class
            model, ds.labels[:n_eval],
            lambda ids: _train_set_loss(model, schedule, eval_images[ids], t_draws[ids], eps_draws[ids]),
        )  # fmt: skip

    loss_ema, loss_raw = train_set_loss(result.ema_model), train_set_loss(result.model)
    metrics = {
        "steps": steps,
        "seconds": round(result.seconds, 1),
        "num_parameters": num_parameters(net),
        "final_running_loss": round(float(losses.tail(100).mean()), 5),
        "train_diffusion_loss_ema": round(float(loss_ema.mean()), 4),
        "train_diffusion_loss_raw": round(float(loss_raw.mean()), 4),
        **extra,
    }
    ws.write_metrics("train", metrics)
    summary = (
        f"**This run.** {metrics['num_parameters']:,} parameters trained for {metrics['steps']} steps in "
        f"{metrics['seconds']} s. Running mean of the last 100 mini-batch losses: {metrics['final_running_loss']}. "
        f"Diffusion loss l on the training set (eq. 2, sum over {int(torch.tensor(shape).prod())} pixels, "
        f"{EVAL_DRAWS} draws per image, {'all' if n_eval == len(ds) else f'the first {n_eval}'} images): EMA weights {metrics['train_diffusion_loss_ema']}, raw weights "
        f"{metrics['train_diffusion_loss_raw']}. Later stages use the EMA weights.{note}"
    )
    return StageResult(
        metrics=metrics, data={"losses": losses, "dataset": ds.name}, summary=summary
    )


def _train_lora(model_cfg, diffusion, train_cfg, finetune, ws: Workspace, images, schedule):
    """The base model on the base set (``finetune.base``), then its LoRA adaptation to the
    training set (``train``); saves the base, the adapter model and the merged model (the
    ``MODEL`` sampling and measuring use). Returns the fine-tuning's result, its metrics and
    a sentence for the summary."""
    shape = tuple(images.shape[1:])
    base_images = ImageDataset.load(ws.path(ws.BASE_SET)).images
    checkpoint = ws.out(
        f".cache/checkpoints/base-{fingerprint(model_cfg, diffusion, finetune.base, base_images)}.pt"
    )
    base = train_ddpm(
        lambda: build_model(model_cfg, shape),
        base_images,
        schedule,
        finetune.base,
        checkpoint_path=checkpoint,
        device=ws.device,
        desc="base model",
    )
    save_model(ws.out(ws.BASE_MODEL), base.ema_model, model_cfg, shape)
    checkpoint.unlink()
    recipe = code_digest(lora)  # a checkpoint of other fine-tuning code is never resumed
    lora_ckpt = ws.out(
        f".cache/checkpoints/lora-{fingerprint(train_cfg, finetune, base_images, images, recipe)}.pt"
    )
    result = finetune_lora(
        base.ema_model,
        images,
        schedule,
        train_cfg,
        rank=finetune.rank,
        alpha=finetune.alpha,
        checkpoint_path=lora_ckpt,
        device=ws.device,
    )
    save_lora(
        ws.out(ws.LORA_MODEL), result.ema_model, model_cfg, shape, finetune.rank, finetune.alpha
    )
    save_model(ws.out(ws.MODEL), merged_unet(result.ema_model, model_cfg, shape), model_cfg, shape)
    lora_ckpt.unlink()
    n_lora = sum(p.numel() for p in lora_parameters(result.ema_model))
    extra = {
        "base_steps": finetune.base.steps,
        "base_seconds": round(base.seconds, 1),
        "lora_parameters": n_lora,
    }
    note = (
        f" The base model was trained for {finetune.base.steps} steps ({base.seconds:.0f} s) on "
        f"{len(base_images)} images of classes {list(finetune.base_classes)}; the steps above "
        f"are its rank-{finetune.rank} LoRA fine-tuning on the training set, {n_lora:,} "
        "trainable LoRA weights, which are the parameters attributed."
    )
    return result, extra, note


def _train_conditional(
    model_cfg, diffusion, train_cfg, cc, ws: Workspace, ds: ImageDataset, schedule
):
    """The class-conditional model with condition dropout (``cc``, the ``conditional``
    section) on the training set and its classes; saves its EMA weights as the ``MODEL``.
    Returns the result, its metrics and a sentence."""
    shape, k = tuple(ds.images.shape[1:]), num_classes(ds)
    recipe = code_digest(conditional)  # a checkpoint of other training code is never resumed
    parts = (model_cfg, diffusion, train_cfg, cc, ds.images, ds.labels, recipe)
    checkpoint = ws.out(f".cache/checkpoints/conditional-{fingerprint(*parts)}.pt")
    result = train_conditional(
        functools.partial(build_conditional, model_cfg, shape, k), ds.images, ds.labels,
        schedule, train_cfg, cc.p_uncond, checkpoint_path=checkpoint, device=ws.device,
    )  # fmt: skip
    save_conditional(ws.out(ws.MODEL), result.ema_model, model_cfg, shape)
    checkpoint.unlink()
    note = (
        f" The model is class-conditional (class ids 0..{k - 1} and the null class; each image's class "
        f"dropped to the null class with probability {cc.p_uncond:g}, for classifier-free "
        "guidance); the losses above are each image's given its class."
    )
    return result, {"num_classes": k, "p_uncond": cc.p_uncond}, note


def fig_training_curve(result: StageResult) -> plt.Figure:
    """Mini-batch loss per step and its running mean over 100 steps (log scale)."""
    losses = result.data["losses"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses.index + 1, losses, lw=0.4, alpha=0.4, label="mini-batch loss")
    ax.plot(
        losses.index + 1,
        losses.rolling(100, min_periods=1).mean(),
        lw=1.5,
        label="running mean (100 steps)",
    )
    ax.set(
        xlabel="training step",
        ylabel="loss (per-pixel MSE)",
        yscale="log",
        title=f"Training the DDPM on {result.data['dataset']}",
    )
    ax.legend()
    return fig
