"""The smoke-sized LoRA fine-tuning profile (``configs/smoke-lora.yaml``) through every stage,
in-process (the digits-lora profile's run is the same code at full size): the base and the
adapter are trained, attribution covers the LoRA weights alone, the retrained models are
fine-tunings of the one base, and the evaluation and the claims table are written."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from diffusion_attribution.core.config import load_config
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.lora import load_attributed
from diffusion_attribution.diffusion.training import load_checked_model
from diffusion_attribution.pipeline import stages
from diffusion_attribution.pipeline.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    config = load_config(ROOT / "configs" / "smoke-lora.yaml")
    ws = Workspace(tmp_path_factory.mktemp("lora"), device="cpu", threads=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA_EXECUTOR", "inline")  # tiny jobs: no worker processes
        for name in stages.NAMES:
            importlib.import_module(f"diffusion_attribution.pipeline.stages.{name}").run(config, ws)
    return config, ws


def test_the_fine_tuning_set_and_the_base_set(lora_run):
    config, ws = lora_run
    f = config.finetune
    train, base = ImageDataset.load(ws.path(ws.TRAIN_SET)), ImageDataset.load(ws.path(ws.BASE_SET))
    assert len(train) == f.size
    assert sorted(train.labels.unique().tolist()) == list(f.classes)
    assert sorted(base.labels.unique().tolist()) == list(f.base_classes)
    counts = torch.bincount(train.labels)[list(f.classes)]
    assert (counts == f.size // len(f.classes)).all()


def test_attribution_covers_the_lora_weights_alone(lora_run):
    config, ws = lora_run
    net, params = load_attributed(ws.path(ws.MODEL), ws.lora_model())
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(".lora_" in names[id(p)] for p in params)
    n_lora = sum(p.numel() for p in params)
    assert json.loads(ws.path("metrics/train.json").read_text())["lora_parameters"] == n_lora
    for variant in config.curvature.variants:
        assert KFAC.load(ws.path(ws.CURVATURE.format(variant=variant))).num_params == n_lora


def test_retrained_models_are_fine_tunings_of_the_one_base(lora_run):
    """Every retrained model keeps the base's GroupNorm weights (LoRA adapts only the Linear /
    Conv2d layers), and differs from the base in the adapted ones."""
    _, ws = lora_run
    base = load_checked_model(ws.path(ws.BASE_MODEL)).state_dict()
    norms = [k for k in base if "norm" in k]
    models = sorted(ws.path("outputs/retrain/models").glob("*.pt"))
    models += sorted(ws.path("outputs/counterfactual/models").glob("*.pt"))
    assert len(models) >= 10 and norms
    for path in models:
        state = load_checked_model(path).state_dict()
        assert all(torch.equal(state[k], base[k]) for k in norms), path.name
        assert not torch.equal(state["conv_in.weight"], base["conv_in.weight"]), path.name


def test_the_evaluation_and_the_claims_table(lora_run):
    _, ws = lora_run
    headline = json.loads(ws.path("metrics/headline.json").read_text())
    assert {"K-FAC influence", "TRAK*", "D-TRAK*", "DAS*"} <= set(headline["loss_lds"])
    assert all(-1 <= v <= 1 for v in headline["loss_lds"].values())
    assert sum(headline["claims"].values()) > 10
    table = ws.path("reports/claims.md").read_text()
    assert "| claim |" in table and "K-FAC" in table
