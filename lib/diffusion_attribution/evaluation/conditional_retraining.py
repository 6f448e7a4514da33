"""Retraining for a class-conditional profile (:mod:`~diffusion_attribution.diffusion.conditional`).

A subset model (or a model without a sample's top influences) of a conditional profile is the
conditional U-Net trained from scratch with the same recipe -- condition dropout included -- on
the kept images and their classes. A conditional job is a
:class:`~diffusion_attribution.evaluation.retraining.RetrainJob` whose ``conditional`` is
:func:`conditional_spec`; its name covers the number of classes, the dropout and the code
here and in the conditional module, besides everything a job's name covers. Every model is
trained alone (no stacking: the stacked U-Net has no class embedding).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from diffusion_attribution.core.executors import exit_with_owner
from diffusion_attribution.core.identity import code_digest
from diffusion_attribution.diffusion import conditional
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.evaluation.retraining import (
    RetrainStack,
    job_checkpoint,
    job_configs,
    remove_checkpoints,
)


def conditional_spec(num_classes: int, p_uncond: float) -> dict:
    """The ``conditional`` of a conditional
    :class:`~diffusion_attribution.evaluation.retraining.RetrainJob`: the number of classes,
    the condition-dropout probability and the digest of the code that trains (docstrings and
    comments do not count)."""
    return {
        "num_classes": int(num_classes),
        "p_uncond": float(p_uncond),
        "code": code_digest(conditional, run_conditional_stack),
    }


def run_conditional_stack(stack: RetrainStack) -> str:
    """Train each job of ``stack`` (:func:`~diffusion_attribution.diffusion.conditional.train_conditional`
    on the job's subset and its classes, its ``train`` settings and seed), one after the other,
    and save each EMA model to its ``output``; returns ``stack.output``. One torch thread, on
    ``DA_DEVICE``; an interrupted job resumes from its checkpoint; outputs that exist are not
    written again."""
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
            subset = ImageDataset.load(job.data_path).subset(list(job.keep))
            schedule = NoiseSchedule.linear(
                diff_cfg.num_timesteps, diff_cfg.beta_start, diff_cfg.beta_end
            )
            spec = sorted(job.conditional.items())
            ckpt = job_checkpoint(out, model_cfg, diff_cfg, train_cfg, subset.images, spec)
            remove_checkpoints(out, keep=ckpt)  # one of other settings is never resumed
            shape = tuple(subset.images.shape[1:])
            k = job.conditional["num_classes"]
            result = conditional.train_conditional(
                functools.partial(conditional.build_conditional, model_cfg, shape, k),
                subset.images, subset.labels, schedule, train_cfg, job.conditional["p_uncond"],
                checkpoint_path=ckpt, device=device, progress=False, desc=job.name,
            )  # fmt: skip
            conditional.save_conditional(out, result.ema_model, model_cfg, shape)
            ckpt.unlink(missing_ok=True)
    finally:
        torch.set_num_threads(threads)
    return stack.output
