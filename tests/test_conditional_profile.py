"""The smoke-sized class-conditional profile (``configs/smoke-cond.yaml``) through every stage,
in-process (the digits10-cond profile's run is the same code at full size): the model is
conditional and its samples cycle through the classes, attribution covers the class embedding,
the retrained models are conditional, the ground truth is measured given each sample's class,
and the class figure, the evaluation and the claims table are written."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from diffusion_attribution.core.config import load_config
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.diffusion.conditional import ConditionalUNet, load_conditional
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.evaluation.ground_truth import (
    ground_truth_measurements,
    measure_by_class,
)
from diffusion_attribution.pipeline import stages
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.stages import counterfactual
from diffusion_attribution.pipeline.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    config = load_config(ROOT / "configs" / "smoke-cond.yaml")
    ws = Workspace(tmp_path_factory.mktemp("cond"), device="cpu", threads=2)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA_EXECUTOR", "inline")  # tiny jobs: no worker processes
        for name in stages.NAMES:
            stage = importlib.import_module(f"diffusion_attribution.pipeline.stages.{name}")
            results[name] = stage.run(config, ws)
    return config, ws, results


def test_the_model_is_conditional_and_its_samples_cycle_through_the_classes(cond_run):
    config, ws, _ = cond_run
    train = ImageDataset.load(ws.path(ws.TRAIN_SET))
    assert torch.equal(train.labels, train.labels.sort().values)  # sorted by class
    net = load_conditional(ws.path(ws.MODEL))
    assert net.num_classes == int(train.labels.max()) + 1
    samples = torch.load(ws.path(ws.SAMPLES), weights_only=True)
    classes = train.labels.unique()
    expected = classes[torch.arange(config.sample.num_samples) % len(classes)]
    assert torch.equal(samples["labels"], expected)
    assert samples["guidance"] == config.conditional.guidance
    metrics = json.loads(ws.path("metrics/sample.json").read_text())
    assert 0 <= metrics["knn_agrees_with_class"] <= 1


def test_attribution_covers_the_class_embedding(cond_run):
    config, ws, _ = cond_run
    net = load_conditional(ws.path(ws.MODEL))
    n = sum(p.numel() for p in kfac_parameters(net))
    assert any(p is net.class_in.weight for p in kfac_parameters(net))
    for variant in config.curvature.variants:
        K = KFAC.load(ws.path(ws.CURVATURE.format(variant=variant)))
        assert K.num_params == n and "class_in" in {b.layer for b in K.blocks}


def test_retrained_models_are_conditional_and_measured_given_the_class(cond_run):
    config, ws, _ = cond_run
    models = sorted(ws.path("outputs/retrain/models").glob("*.pt"))
    models += sorted(ws.path("outputs/counterfactual/models").glob("*.pt"))
    assert len(models) >= 10
    embeddings = [load_conditional(p).class_in.weight for p in models]
    assert all(isinstance(load_conditional(p), ConditionalUNet) for p in models[:2])
    assert not torch.equal(embeddings[0], embeddings[1])
    # the cached ground truth of the full model is its measurement given each sample's class
    samples = torch.load(ws.path(ws.SAMPLES), weights_only=True)
    q = config.measure.num_queries
    measured = torch.load(ws.path("outputs/measure/cache/full.pt"), weights_only=True)["values"]
    m = ground_truth_measurements(
        schedule_of(config.diffusion),
        config.diffusion.variance,
        pixel_levels("digits2"),
        config.influence.timesteps,
    )
    draws = {"loss": config.measure.draws}
    again = measure_by_class(
        load_conditional(ws.path(ws.MODEL)), {"loss": m["loss"]}, samples["images"][:q],
        samples["labels"][:q], draws, config.measure.seed,
        trajectories=samples["trajectory"][:, :q], batch_size=config.measure.batch_size,
    )  # fmt: skip
    torch.testing.assert_close(again["loss"], measured["loss"])


def test_the_class_figure_the_evaluation_and_the_claims_table(cond_run):
    _, ws, results = cond_run
    metrics = json.loads(ws.path("metrics/counterfactual.json").read_text())
    shares = metrics["same_class_share"]
    assert {"kfac@0.1", "trak@0.1", "das@0.1", "retraining@0.1"} <= set(shares)
    assert all(0 <= v["mean"] <= 1 for v in shares.values())
    assert 0 < metrics["same_class_chance"] < 1
    fig = counterfactual.fig_class_influences(results["counterfactual"])
    assert len(fig.axes) > 10
    plt.close(fig)
    headline = json.loads(ws.path("metrics/headline.json").read_text())
    assert {"K-FAC influence", "TRAK*", "D-TRAK*", "DAS*"} <= set(headline["loss_lds"])
    assert sum(headline["claims"].values()) > 10
