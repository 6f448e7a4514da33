"""A small workspace for the fan-outs: the smoke profile's first four stages (data, train,
sample, curvature), shrunk further, and what the unsharded computations read from it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from diffusion_attribution.attribution.influence import influence_specs
from diffusion_attribution.core.config import Config
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.diffusion.training import load_checked_model
from diffusion_attribution.pipeline.attributed import measurements_of
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.workspace import Workspace

ROOT = Path(__file__).resolve().parents[3]


def small_smoke_params() -> dict:
    params = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    params["sample"].update(num_samples=6, batch_size=6)
    params["measure"].update(num_queries=6)
    params["counterfactual"].update(num_queries=min(6, params["counterfactual"]["num_queries"]))
    params["curvature"].update(variants=["mc_expand", "ekfac_mc_expand"], num_draws=1)
    params["influence"].update(
        train_draws=2, query_draws=2, damping_sweep=[1e-3], svd_ranks=[1], batch_size=16
    )
    return params


def specs_of(config: Config):
    """The stage's kinds of score matrix, on two measurements (the others cost more time and
    test nothing more here)."""
    return influence_specs(
        config.curvature.variants,
        ["loss", "elbo"],
        config.influence.damping,
        config.influence.compression,
        config.influence.damping_sweep,
        compression_ablation=["none", "int8", "int4"],
        ablation_measurements=config.influence.ablation_measurements,
    )


def inputs(config: Config, ws: Workspace) -> SimpleNamespace:
    """What the stages read from ``ws``: the training set, the model, the samples, every
    measurement attributed and the fitted curvatures."""
    dataset = ImageDataset.load(ws.path(ws.TRAIN_SET))
    diffusion = config.diffusion
    return SimpleNamespace(
        dataset=dataset,
        model=load_checked_model(ws.path(ws.MODEL), device=ws.device),
        samples=torch.load(ws.path(ws.SAMPLES), weights_only=True),
        measurements=measurements_of(
            schedule_of(diffusion),
            diffusion.variance,
            pixel_levels(dataset.name),
            config.influence.timesteps,
        ),
        curvatures={
            v: KFAC.load(ws.path(ws.CURVATURE.format(variant=v))).to(ws.device)
            for v in config.curvature.variants
        },
    )
