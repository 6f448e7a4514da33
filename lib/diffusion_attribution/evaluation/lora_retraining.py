"""Retraining for a LoRA fine-tuning profile: only the fine-tuning is re-run, from the shared
base (:mod:`~diffusion_attribution.diffusion.lora`).

The ground truth of attribution to a fine-tuning set is the response of the *fine-tuned*
model to the fine-tuning data: a subset model (or a model without a sample's top influences)
is the same base adapted with the same recipe and seed to the kept part of the fine-tuning
set. A LoRA job is a :class:`~diffusion_attribution.evaluation.retraining.RetrainJob` whose
``lora`` is :func:`lora_spec`; its name covers the base model's content, the rank and scale
and the code here and in the LoRA module, besides everything a job's name covers. Its model
file is the adapted model merged into a plain U-Net
(:func:`~diffusion_attribution.diffusion.lora.merged_unet`), so the ``measure`` stage reads it
like any other model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffusion_attribution.core.executors import exit_with_owner
from diffusion_attribution.core.identity import code_digest, file_digest
from diffusion_attribution.diffusion import lora
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.training import load_checked_model, save_model
from diffusion_attribution.evaluation.retraining import (
    RetrainStack,
    job_checkpoint,
    job_configs,
    job_images,
    remove_checkpoints,
)


def lora_spec(base_path: str | Path, rank: int, alpha: float) -> dict:
    """The ``lora`` of a LoRA :class:`~diffusion_attribution.evaluation.retraining.RetrainJob`:
    the base model's file and the digest of its bytes, the rank and scale, and the digest of
    the code that fine-tunes (docstrings and comments do not count)."""
    return {
        "base": str(base_path),
        "base_digest": file_digest(base_path),
        "rank": int(rank),
        "alpha": float(alpha),
        "code": code_digest(lora, run_lora_stack),
    }


def run_lora_stack(stack: RetrainStack) -> str:
    """Fine-tune the base of each job of ``stack`` with LoRA on the job's subset (its
    ``train`` settings and seed), one after the other, and save each merged EMA model to its
    ``output``; returns ``stack.output``. One torch thread, on ``DA_DEVICE``; an interrupted
    job resumes from its checkpoint; outputs that exist are not written again."""
    outputs = [Path(job.output) for job in stack.jobs]
    if all(out.exists() for out in outputs):
        return stack.output
    exit_with_owner()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    device = os.environ.get("DA_DEVICE", "cpu")
    try:
        for job, out in zip(stack.jobs, outputs, strict=True):
            if out.exists():
                continue
            model_cfg, diff_cfg, train_cfg = job_configs(job)
            images = job_images(job)
            schedule = NoiseSchedule.linear(
                diff_cfg.num_timesteps, diff_cfg.beta_start, diff_cfg.beta_end
            )
            ckpt = job_checkpoint(
                out, model_cfg, diff_cfg, train_cfg, images, sorted(job.lora.items())
            )
            remove_checkpoints(out, keep=ckpt)  # one of other settings is never resumed
            base = load_checked_model(job.lora["base"])
            result = lora.finetune_lora(
                base, images, schedule, train_cfg, rank=job.lora["rank"],
                alpha=job.lora["alpha"], checkpoint_path=ckpt, device=device, progress=False,
                desc=job.name,
            )  # fmt: skip
            shape = tuple(images.shape[1:])
            merged = lora.merged_unet(result.ema_model, model_cfg, shape)
            save_model(out, merged, model_cfg, shape)
            ckpt.unlink(missing_ok=True)
    finally:
        torch.set_num_threads(threads)
    return stack.output
