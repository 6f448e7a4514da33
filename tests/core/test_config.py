"""params.yaml schema: one source of defaults, clear one-message errors naming the key."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusion_attribution.core.config import (
    Config,
    ConfigError,
    dump_config,
    load_config,
    parse_config,
)
from diffusion_attribution.core.sections import ConditionalConfig, FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "configs").glob("*.yaml"))


def keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= keys(v, prefix + k + ".")
    return out


def test_params_yaml_is_the_schema_default():
    """The default profile is exactly the schema's defaults, spelled out for DVC."""
    assert load_config(ROOT / "params.yaml") == Config()
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load(
        dump_config(Config())
    )


def test_profiles_exist_and_spell_out_every_key():
    names = {p.stem for p in PROFILES}
    assert {"smoke", "digits10", "cifar2", "cifar10"} <= names
    full = keys(Config().model_dump())
    tuned = keys(FinetuneConfig().model_dump(), "finetune.")  # the optional sections' keys
    cond = keys(ConditionalConfig().model_dump(), "conditional.")
    for p in PROFILES:
        raw = yaml.safe_load(p.read_text())
        expected = full | (tuned if raw.get("finetune") is not None else set())
        expected |= cond if raw.get("conditional") is not None else set()
        assert keys(raw) == expected, f"{p.name} must list every key of params.yaml"
        load_config(p)
    assert {"digits-lora", "smoke-lora", "digits10-cond", "smoke-cond"} <= names


def test_conditional_errors_name_their_keys():
    """The conditional section: not with LoRA, not with the (unconditional) budget study; its
    values in range; ``conditional: null`` is the unconditional model."""
    raw = yaml.safe_load((ROOT / "configs" / "smoke-cond.yaml").read_text())
    assert load_config(ROOT / "params.yaml").conditional is None
    lora = yaml.safe_load((ROOT / "configs" / "smoke-lora.yaml").read_text())["finetune"]
    for change, message in [
        ({"finetune": lora, "data": {**raw["data"], "dataset": "digits10"}}, "conditional: not with finetune"),
        ({"protocol": {"fit_draws": [2], "projection_dims": []}}, "conditional: the protocol's budget study"),
        ({"conditional": {**raw["conditional"], "p_uncond": 1.0}}, "conditional.p_uncond"),
        ({"conditional": {**raw["conditional"], "guidance": -1}}, "conditional.guidance"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({**raw, **change})


def test_finetune_errors_name_their_keys():
    """The LoRA section: digits-10 only, classes the base has not seen, an equal draw per class
    that the digits can give; a file without it, and one with ``finetune: null``, train from
    scratch."""
    raw = yaml.safe_load((ROOT / "configs" / "smoke-lora.yaml").read_text())
    assert load_config(ROOT / "params.yaml").finetune is None
    for change, message in [
        ({"data": {**raw["data"], "dataset": "digits2"}}, "finetune: LoRA fine-tuning draws"),
        ({"finetune": {**raw["finetune"], "classes": [4, 5]}}, "finetune.classes: [4]"),
        ({"finetune": {**raw["finetune"], "size": 21}}, "finetune.size: 21 is not a multiple"),
        ({"finetune": {**raw["finetune"], "size": 900}}, "finetune.size: 900 exceeds 870"),
        ({"finetune": {**raw["finetune"], "rank": 0}}, "finetune.rank"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({**raw, **change})


def test_paper_profiles_follow_the_paper():
    c2, c10 = load_config(ROOT / "configs/cifar2.yaml"), load_config(ROOT / "configs/cifar10.yaml")
    assert (c2.data.dataset, c2.data.cifar2_size, c2.train.steps) == ("cifar2", 5000, 32000)
    assert (c10.data.dataset, c10.train.steps) == ("cifar10", 160000)
    for c in (c2, c10):  # Ho et al. (2020) CIFAR-10 U-Net (App. G.2)
        assert c.model.base_channels == 128 and c.model.channel_mults == (1, 2, 2, 2)
        assert (
            c.model.num_res_blocks == 2
            and c.model.attn_resolutions == (16,)
            and c.model.dropout == 0.1
        )


@pytest.mark.parametrize(
    ("patch", "key", "words"),
    [
        ({"train": {"steps": -5}}, "train.steps", "greater than 0"),
        ({"train": {"steps": "many"}}, "train.steps", "integer"),
        ({"train": {"stepz": 10}}, "train.stepz", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"data": {"dataset": "mnist"}}, "data.dataset", "digits2"),
        ({"model": {"dropout": 1.5}}, "model.dropout", "less than 1"),
        ({"diffusion": {"beta_start": 0.5, "beta_end": 0.1}}, "beta_start", "beta_end"),
        ({"train": {"warmup_steps": 5000}}, "warmup_steps", "smaller than steps"),
        ({"measure": {"num_queries": 65}}, "measure.num_queries", "sample.num_samples"),
        (
            {"counterfactual": {"num_queries": 33}},
            "counterfactual.num_queries",
            "measure.num_queries",
        ),
        ({"retrain": {"steps": 50}}, "retrain.steps", "train.warmup_steps"),
        ({"retrain": {"num_seeds": 1}}, "retrain.num_seeds", "greater than or equal to 2"),
        ({"counterfactual": {"methods": ["kfac", "lasso"]}}, "counterfactual.methods", "random"),
        # the protocol (App. G.5): subset models get the full model's epochs
        ({"retrain": {"steps": 400}}, "retrain.steps", "needs retrain.steps = 500"),
        ({"train": {"steps": 2000}}, "retrain.steps", "retrain.epoch_matched: false"),
        # LDS seeds disjoint from the full model's
        ({"retrain": {"first_seed": 0}}, "retrain.first_seed", "train.seed = 0"),
        ({"train": {"seed": 101}}, "retrain.first_seed", "train.seed = 101"),
        ({"train": {"seed": 105}}, "retrain.first_seed", "include the full model's"),  # independent
        ({"retrain": {"independent_subsets": 1}}, "retrain.independent_subsets", "0 (no"),
        ({"retrain": {"independent_subsets": 33}}, "retrain.independent_subsets", "num_subsets"),
        ({"counterfactual": {"steps": 500}}, "counterfactual.steps", "unknown key"),
    ],
)
def test_bad_values_name_the_key(patch, key, words):
    raw = Config().model_dump(mode="json")
    for section, values in patch.items():
        if isinstance(values, dict) and section in raw:
            raw[section].update(values)
        else:
            raw[section] = values
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "test.yaml")
    msg = str(err.value)
    assert key in msg and words in msg, msg
    assert msg.startswith("invalid parameters in test.yaml")


def test_several_errors_reported_together():
    raw = Config().model_dump(mode="json")
    raw["train"]["steps"] = 0
    raw["sample"]["num_samples"] = -1
    msg = str(pytest.raises(ConfigError, parse_config, raw).value)
    assert "train.steps" in msg and "sample.num_samples" in msg


def test_command_line_prints_one_message_without_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  steps: -5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_attribution.core.config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "train.steps" in proc.stderr and "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "diffusion_attribution.core.config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_pipeline_runner_validates_before_running(tmp_path):
    """A bad value stops the stage runner at once: exit 2, the key named, no notebook run."""
    (tmp_path / "params.yaml").write_text("sample:\n  num_samples: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_attribution.pipeline.runner", "data"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "sample.num_samples" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists() and not (tmp_path / "outputs").exists()


def test_params_yaml_is_the_schema_defaults_spelled_out():
    """One source of defaults: the default profile is the schema's defaults, key for key (the
    notebooks have none of their own; a test in test_pipeline checks that)."""
    text = (Path(__file__).resolve().parents[2] / "params.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"
    assert body == dump_config(Config())
