"""Reliability: bad parameters, numerical faults and corrupt or hostile files, each tried and
counted (issue 14, parts 1, 3 and 4).

- **Bad parameters** (:data:`CASES`, a case registry in the manner of curvlinops'
  ``test/cases.py``): every case is a different key or failure class. Each must make
  ``python -m diffusion_attribution.core.config FILE`` and ``python -m diffusion_attribution.pipeline.runner
  STAGE`` exit with status 2, print one message naming the key and what is allowed, no
  traceback, and compute nothing. Most cases run through the two ``main`` functions in this
  process; :data:`SUBPROCESS_CASES` also through real interpreters; one test runs ``dvc repro``
  on a bad file and checks that no earlier output is deleted.
- **Numerical faults** (:data:`FAULTS`): a NaN weight, a diverged training run, an Inf
  curvature factor, a non-finite measurement.
- **Corrupt and hostile files** (:data:`CORRUPTIONS`): truncated, bit-flipped, empty, a
  pickle (with code in it) where a tensor file is expected, a full disk during a write; and
  an AST scan of ``lib/`` for unsafe loads.

The ``test_*_counts`` tests assert and print the counts the README's reliability section
reports (run with ``-s`` to see them).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_attribution.core import config as config_module
from diffusion_attribution.core import io, sections
from diffusion_attribution.core.config import VALID_MARKER, Config, ConfigError, load_config
from diffusion_attribution.pipeline import dvcgraph, sandbox, stages
from diffusion_attribution.pipeline import runner as pipeline

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib" / "diffusion_attribution"
SMOKE = ROOT / "configs" / "smoke.yaml"
SMOKE_RAW = yaml.safe_load(SMOKE.read_text())


# ---- part 1: bad parameters ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A bad parameters file: ``make`` turns the smoke profile's mapping into the file's text;
    the message must contain ``key`` and ``allowed`` (what the key may be)."""

    id: str
    make: Callable[[dict], str]
    key: str
    allowed: str
    #: a problem in the mapping (one line naming one key), not in the file as text
    one_line: bool = True


def _dump(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


def setting(dotted: str, value: object) -> Callable[[dict], str]:
    def make(raw: dict) -> str:
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
        return _dump(raw)

    return make


def settings(**values: object) -> Callable[[dict], str]:
    def make(raw: dict) -> str:
        for dotted, value in values.items():
            setting(dotted.replace("__", "."), value)(raw)
        return _dump(raw)

    return make


def dropping(dotted: str) -> Callable[[dict], str]:
    def make(raw: dict) -> str:
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        del node[last]
        return _dump(raw)

    return make


def text(body: str | bytes) -> Callable[[dict], str | bytes]:
    return lambda raw: body


def editing(old: str, new: str) -> Callable[[dict], str]:
    def make(raw: dict) -> str:
        body = _dump(raw)
        assert old in body, old
        return body.replace(old, new, 1)

    return make


SECTIONS = list(Config.model_fields)
#: A complete LoRA section (the profiles without LoRA have ``finetune: null``).
FINETUNE = sections.FinetuneConfig().model_dump(mode="json")
CASES = [
    # unknown keys, at the top level and in every section
    Case("unknown-top-level", setting("bogus", 1), "bogus", "allowed here: data, model"),
    Case("unknown-data", setting("data.datset", "digits2"), "data.datset", "dataset, digits"),
    Case("unknown-model", setting("model.channels", 8), "model.channels", "base_channels"),
    Case("unknown-diffusion", setting("diffusion.T", 10), "diffusion.T", "num_timesteps"),
    Case("unknown-train", setting("train.stepz", 10), "train.stepz", "steps, batch_size"),
    Case("unknown-sample", setting("sample.count", 4), "sample.count", "num_samples"),
    Case("unknown-curvature", setting("curvature.damping", 1.0), "curvature.damping", "variants"),
    Case("unknown-influence", setting("influence.draws", 4), "influence.draws", "train_draws"),
    Case("unknown-trak", setting("trak.dim", 64), "trak.dim", "projection_dim"),
    Case("unknown-retrain", setting("retrain.models", 4), "retrain.models", "num_subsets"),
    Case("unknown-measure", setting("measure.queries", 4), "measure.queries", "num_queries"),
    Case(
        "unknown-counterfactual",
        setting("counterfactual.steps", 60),
        "counterfactual.steps",
        "fractions, num_queries",
    ),
    Case(
        "unknown-protocol",
        setting("protocol.draws", [8]),
        "protocol.draws",
        "fit_draws, projection_dims",
    ),
    Case(
        "unknown-finetune",
        setting("finetune", {**FINETUNE, "ranks": 4}),
        "finetune.ranks",
        "base_classes, classes, size",
    ),
    Case(
        "finetune-not-on-digits10",
        setting("finetune", FINETUNE),
        "finetune",
        "set data.dataset: digits10 (got digits2)",
    ),
    Case(
        "unknown-conditional",
        setting("conditional", {"p_uncond": 0.1, "guidance": 1.0, "guidanse": 1.0}),
        "conditional.guidanse",
        "p_uncond, guidance",
    ),
    Case(
        "conditional-with-the-budget-study",
        setting("conditional", {"p_uncond": 0.1, "guidance": 1.0}),
        "conditional",
        "set protocol.fit_draws and protocol.projection_dims to []",
    ),
    # incomplete files
    Case("missing-section", dropping("measure"), "measure", "missing section"),
    Case("missing-key", dropping("train.seed"), "train.seed", "the default is 0"),
    Case("null-section", setting("train", None), "train", "valid dictionary"),
    Case("section-is-a-list", setting("model", [1, 2]), "model", "valid dictionary"),
    # wrong types
    Case("int-from-text", setting("train.steps", "many"), "train.steps", "valid integer"),
    Case("int-from-bool", setting("train.batch_size", True), "train.batch_size", "valid integer"),
    Case("int-from-fraction", setting("sample.num_samples", 2.5), "sample.num_samples", "integer"),
    Case("float-from-text", setting("train.lr", "fast"), "train.lr", "valid number"),
    Case("float-from-bool", setting("train.grad_clip", True), "train.grad_clip", "not a boolean"),
    Case("tuple-from-int", setting("model.channel_mults", 2), "model.channel_mults", "valid tuple"),
    Case(
        "tuple-from-text",
        setting("data.digits_classes", "3,8"),
        "data.digits_classes",
        "valid tuple",
    ),
    Case(
        "bool-from-text",
        setting("retrain.epoch_matched", "maybe"),
        "retrain.epoch_matched",
        "valid boolean",
    ),
    # not finite
    Case("nan", editing("lr: 0.003", "lr: .nan"), "train.lr", "finite number"),
    Case("inf", editing("damping: 1.0e-08", "damping: .inf"), "influence.damping", "finite"),
    # out of range
    Case("negative-steps", setting("train.steps", -5), "train.steps", "greater than 0"),
    Case("zero-lr", setting("train.lr", 0), "train.lr", "greater than 0"),
    Case("dropout-1.5", setting("model.dropout", 1.5), "model.dropout", "less than 1"),
    Case("beta-1.5", setting("diffusion.beta_end", 1.5), "diffusion.beta_end", "less than 1"),
    Case("ema-decay-1", setting("train.ema_decay", 1.0), "train.ema_decay", "less than 1"),
    Case("fraction-1", setting("retrain.fraction", 1.0), "retrain.fraction", "less than 1"),
    Case("one-subset", setting("retrain.num_subsets", 1), "retrain.num_subsets", "equal to 2"),
    Case("digit-12", setting("data.digits_classes", [3, 12]), "digits_classes.1", "equal to 9"),
    Case("projection-0", setting("trak.projection_dim", 0), "trak.projection_dim", "than 0"),
    Case("fit-draws-twice", setting("protocol.fit_draws", [8, 8]), "protocol.fit_draws", "twice"),
    Case("fraction-0", setting("counterfactual.fractions", [0.0]), "fractions.0", "than 0"),
    Case("negative-seed", setting("sample.seed", -1), "sample.seed", "equal to 0"),
    Case("seed-2**64", setting("data.seed", 2**64), "data.seed", "less than 4611686018427387904"),
    Case("timestep-0", setting("influence.timesteps", [0, 50]), "timesteps.0", "greater than 0"),
    # not one of the choices
    Case("dataset", setting("data.dataset", "mnist"), "data.dataset", "'digits2', 'digits10'"),
    Case("variance", setting("diffusion.variance", "learned"), "diffusion.variance", "fixed_large"),
    Case("variant", setting("curvature.variants", ["mc_expandd"]), "variants.0", "'mc_reduce'"),
    Case("compression", setting("influence.compression", "int2"), "compression", "'int4'"),
    Case("projection", setting("trak.projection", "sparse"), "trak.projection", "'gaussian'"),
    Case(
        "method",
        setting("counterfactual.methods", ["kfac", "lasso"]),
        "methods.1",
        "'feature_cos' or 'random'",
    ),
    # empty or repeated lists
    Case(
        "no-variants", setting("curvature.variants", []), "curvature.variants", "at least one entry"
    ),
    Case(
        "no-dampings",
        setting("trak.relative_dampings", []),
        "trak.relative_dampings",
        "at least one entry",
    ),
    Case(
        "timestep-twice",
        setting("influence.timesteps", [5, 5]),
        "influence.timesteps",
        "5 is given twice",
    ),
    Case(
        "method-twice",
        setting("counterfactual.methods", ["kfac", "kfac"]),
        "counterfactual.methods",
        "distinct",
    ),
    # inconsistent across keys and sections
    Case(
        "more-queries-than-samples",
        setting("measure.num_queries", 17),
        "measure.num_queries",
        "exceeds sample.num_samples = 16",
    ),
    Case(
        "more-counterfactual-queries",
        setting("counterfactual.num_queries", 9),
        "counterfactual.num_queries",
        "measure.num_queries = 8",
    ),
    Case(
        "timestep-above-T",
        setting("influence.timesteps", [5, 101]),
        "influence.timesteps",
        "must lie in 1..100",
    ),
    Case(
        "subset-of-one",
        setting("retrain.fraction", 0.003),
        "retrain.fraction",
        "keeps 1 and drops 356; both must be at least 2",
    ),
    Case(
        "complement-of-one",
        setting("retrain.fraction", 0.998),
        "retrain.fraction",
        "drops 1",
    ),
    Case(
        "removes-nothing",
        setting("counterfactual.fractions", [0.001]),
        "counterfactual.fractions",
        "must remove at least 1",
    ),
    Case(
        "fractions-same-name",
        setting("counterfactual.fractions", [0.1, 0.1000001]),
        "counterfactual.fractions",
        "print as 0.1",
    ),
    Case(
        "warmup-too-long",
        setting("train.warmup_steps", 60),
        "train.warmup_steps",
        "smaller than steps (train.steps = 60)",
    ),
    Case(
        "betas-reversed",
        setting("diffusion.beta_start", 0.5),
        "diffusion.beta_start",
        "must not exceed diffusion.beta_end = 0.2",
    ),
    Case(
        "epochs-not-matched",
        setting("retrain.steps", 25),
        "retrain.steps",
        "needs retrain.steps = 30",
    ),
    Case(
        "seeds-overlap",
        setting("retrain.first_seed", 0),
        "retrain.first_seed",
        "train.seed = 0",
    ),
    Case(
        "one-independent-subset",
        setting("retrain.independent_subsets", 1),
        "retrain.independent_subsets",
        "0 (no sensitivity check) or between 2 and retrain.num_subsets = 4",
    ),
    Case(
        "unknown-ablation-measurement",
        setting("influence.ablation_measurements", ["loss", "l_t=7"]),
        "influence.ablation_measurements",
        "choose from",
    ),
    Case(
        "unknown-trak-measurement",
        setting("trak.query_measurements", ["loss", "elbow"]),
        "trak.query_measurements",
        "'l_t=5', 'l_t=50', 'loss'",
    ),
    Case(
        "norm-groups",
        setting("model.norm_groups", 3),
        "model.norm_groups",
        "must divide every level's width",
    ),
    Case(
        "too-many-levels",
        setting("model.channel_mults", [1, 2, 2, 2, 2]),
        "model.channel_mults",
        "at most 4 levels fit",
    ),
    Case(
        "attention-resolution",
        setting("model.attn_resolutions", [5]),
        "model.attn_resolutions",
        "some level reaches on 8x8 images: [8, 4]",
    ),
    Case(
        "digits2-one-class",
        setting("data.digits_classes", [3, 3]),
        "data.digits_classes",
        "exactly two distinct classes",
    ),
    Case(
        "cifar2-too-large",
        settings(data__dataset="cifar2", data__cifar2_size=10002),
        "data.cifar2_size",
        "at most 10000",
    ),
    # the file itself
    Case("empty-file", text(""), "(top level)", "mapping of the sections data, model", False),
    Case("only-comments", text("# nothing\n"), "(top level)", "got an empty file", False),
    Case("top-level-list", text("- data\n- model\n"), "(top level)", "got a list", False),
    Case("invalid-yaml", editing("train:\n", "train: [\n"), "line", "not valid YAML", False),
    Case(
        "key-twice",
        editing("  lr: 0.003\n", "  lr: 0.003\n  steps: 61\n"),
        "'steps' is given twice",
        "line",
        False,
    ),
    Case(
        "tab-indent", editing("  steps: 60", "\tsteps: 60"), "line", "cannot start any token", False
    ),
    Case(
        "python-tag",
        text('train: !!python/object/apply:os.system ["touch hacked"]\n'),
        "python/object/apply",
        "not valid YAML",
        False,
    ),
    Case("not-utf8", text(b"train:\n  steps: \xff\xfe\n"), "UTF-8", "cannot be read", False),
]

#: Cases also run through real interpreters (the others through the same ``main`` functions
#: in this process, which is what those interpreters run).
SUBPROCESS_CASES = ("unknown-train", "more-queries-than-samples", "invalid-yaml", "empty-file")


def write_case(case: Case, folder: Path) -> Path:
    body = case.make(json.loads(json.dumps(SMOKE_RAW)))
    path = folder / "params.yaml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return path


def check_message(case: Case, rc: int, err: str) -> None:
    assert rc == 2, f"{case.id}: exit status {rc}\n{err}"
    assert "Traceback" not in err, f"{case.id}: a traceback\n{err}"
    assert case.key in err, f"{case.id}: the message does not name {case.key!r}\n{err}"
    assert case.allowed in err, f"{case.id}: the message does not say {case.allowed!r}\n{err}"
    if case.one_line:  # one problem: a header and one line naming one key
        lines = err.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("invalid parameters in"), err


def stage_of(case: Case) -> str:
    """Each case's pipeline run names another stage, so every stage's runner is tried."""
    return stages.NAMES[CASES.index(case) % len(stages.NAMES)]


def reject_in_process(case: Case, folder: Path, capsys) -> tuple[str, str]:
    """Run the case through ``config.main`` and ``pipeline.main`` (in ``folder``); returns
    what each printed to stderr, after checking the exit status, the message and that
    nothing was computed."""
    path = write_case(case, folder)
    capsys.readouterr()
    rc = config_module.main([str(path)])
    out = capsys.readouterr()
    check_message(case, rc, out.err)
    assert out.out == "", out.out
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        rc = pipeline.main([stage_of(case)])
    finally:
        os.chdir(cwd)
    piped = capsys.readouterr()
    check_message(case, rc, piped.err)
    assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"], "something was computed"
    return out.err, piped.err


def test_case_registry_is_distinct():
    """Every case is its own key or failure class: distinct ids and distinct (key, allowed)."""
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(c.key, c.allowed) for c in CASES}) == len(CASES)
    assert set(SUBPROCESS_CASES) <= {c.id for c in CASES}
    for section in SECTIONS:  # an unknown key in every section
        assert any(c.id == f"unknown-{section}" for c in CASES), section


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_parameters_are_rejected_cleanly(case, tmp_path, capsys):
    reject_in_process(case, tmp_path, capsys)


def test_bad_parameters_counts(tmp_path, capsys):
    """The count the README reports: bad parameter files tried, and rejected cleanly by both
    entry points (exit 2, one message naming the key and what is allowed, no traceback,
    nothing computed)."""
    clean = 0
    for i, case in enumerate(CASES):
        folder = tmp_path / str(i)
        folder.mkdir()
        with contextlib.suppress(AssertionError):
            reject_in_process(case, folder, capsys)
            clean += 1
    assert len(CASES) >= 40
    assert clean == len(CASES), f"{len(CASES) - clean} bad files were not rejected cleanly"
    with capsys.disabled():
        print(f"\nbad parameter files: {len(CASES)} tried, {clean} rejected cleanly")


def test_bad_parameters_through_real_interpreters(tmp_path):
    """The command lines DVC runs: exit 2, the message, no traceback, nothing computed."""
    procs = []
    for case in (c for c in CASES if c.id in SUBPROCESS_CASES):
        folder = tmp_path / case.id
        folder.mkdir()
        path = write_case(case, folder)
        for argv in (
            ["diffusion_attribution.core.config", str(path)],
            ["diffusion_attribution.pipeline.runner", stage_of(case)],
        ):
            proc = subprocess.Popen(
                [sys.executable, "-m", *argv],
                cwd=folder,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append((case, folder, proc))
    for case, folder, proc in procs:
        _, err = proc.communicate(timeout=120)
        check_message(case, proc.returncode, err)
        assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"]


def test_usage_errors_exit_2(tmp_path, capsys):
    assert pipeline.main(["no_such_stage"]) == 2
    assert "unknown stage 'no_such_stage'" in capsys.readouterr().err
    assert pipeline.main([]) == 2 and "usage" in capsys.readouterr().err
    assert config_module.main([str(SMOKE), "--write"]) == 2
    assert config_module.main([str(SMOKE), "extra.yaml"]) == 2
    assert config_module.main([str(tmp_path / "absent.yaml")]) == 2
    assert "parameters file not found" in capsys.readouterr().err
    assert config_module.main([str(tmp_path)]) == 2  # a directory


def test_every_profile_is_valid_and_complete():
    for path in sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "params.yaml"]:
        load_config(path)


def test_digit_counts_are_those_of_the_data():
    """The training-set sizes the subset checks use are the data's (a derived fact, tested)."""
    from diffusion_attribution.diffusion.datasets import load_digits

    counts = tuple(len(load_digits([c])) for c in range(10))
    assert counts == sections.DIGIT_COUNTS
    assert load_config(SMOKE).data.num_train == len(load_digits([3, 8])) == 357


def test_validation_marker_is_the_same_for_every_valid_file(tmp_path, capsys):
    """The ``validate`` stage's output does not change with the parameters, so it reruns no
    stage by itself; and it is written only for a valid file."""
    a, b = tmp_path / "a" / "ok.json", tmp_path / "b" / "ok.json"
    assert config_module.main([str(SMOKE), "--write", str(a)]) == 0
    assert config_module.main([str(ROOT / "params.yaml"), "--write", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text()) == VALID_MARKER
    bad = write_case(CASES[0], tmp_path)
    c = tmp_path / "c" / "ok.json"
    assert config_module.main([str(bad), "--write", str(c)]) == 2 and not c.exists()


def test_every_stage_depends_on_the_validation():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert next(iter(spec)) == dvcgraph.VALIDATE
    validate = spec[dvcgraph.VALIDATE]
    assert validate["outs"] == [dvcgraph.VALIDATED]
    assert {"params.yaml", "lib/diffusion_attribution/core/config.py"} <= set(validate["deps"])
    assert "--write" in validate["cmd"] and dvcgraph.VALIDATED in validate["cmd"]
    for name in stages.NAMES:
        assert dvcgraph.VALIDATED in spec[name]["deps"], name


@pytest.mark.slow
def test_dvc_repro_with_bad_parameters_deletes_nothing(tmp_path):
    """`dvc repro` on a bad params.yaml stops at the validation stage: it fails naming the key
    and no earlier output is deleted or rewritten (DVC removes a stage's outputs right before
    it runs the stage's command)."""
    repo = sandbox.prepare("smoke", tmp_path / "repo", repo=ROOT)  # the smoke profile's copy
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "DA_THREADS": "1",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(repo / "lib"),
    }
    dvc = [sys.executable, "-m", "dvc"]
    start = time.perf_counter()
    first = subprocess.run([*dvc, "repro", "data"], cwd=repo, env=env, capture_output=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    marker = repo / dvcgraph.VALIDATED  # the validation's own output: rewritten when it passes
    outputs = [p for p in (repo / "outputs").rglob("*") if p.is_file() and p != marker]
    outputs += [p for p in (repo / "reports").rglob("*") if p.is_file()]
    assert any("outputs/data" in str(p) for p in outputs)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    bad = yaml.safe_load((repo / "params.yaml").read_text())
    bad["data"]["seed"] = -1  # the data stage's own parameter: data would rerun first
    (repo / "params.yaml").write_text(_dump(bad))
    run = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "data.seed" in said and "greater than or equal to 0" in said, said[-3000:]
    assert "Traceback" not in said
    for p, (mtime, data) in before.items():
        assert p.exists(), f"{p.relative_to(repo)} was deleted"
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, p
    assert not marker.exists(), "a failed validation must not leave its marker"
    print(f"dvc repro data + dvc repro on a bad file: {seconds:.1f} s")


# ---- part 3: numerical faults ----------------------------------------------------------------


def tiny_model():
    from diffusion_attribution.core.sections import ModelConfig
    from diffusion_attribution.diffusion.training import build_model

    cfg = ModelConfig(base_channels=4, channel_mults=(1,), attn_resolutions=(), norm_groups=2)
    torch.manual_seed(0)
    return cfg, build_model(cfg, (1, 8, 8))


def fault_nan_weight_checkpoint(tmp_path: Path) -> Exception:
    """A model file with one NaN weight: the pipeline's loader refuses it, naming file, layer,
    value."""
    from diffusion_attribution.diffusion.training import load_checked_model, save_model

    cfg, model = tiny_model()
    path = tmp_path / "model.pt"
    save_model(path, model, cfg, (1, 8, 8))
    state = torch.load(path, weights_only=True)
    layer = next(k for k, v in state["state_dict"].items() if v.ndim == 4)
    state["state_dict"][layer].view(-1)[3] = float("nan")
    io.atomic_save(state, path, finite=False)  # as a damaged file or another tool might
    with pytest.raises(io.NonFiniteError) as err:
        load_checked_model(path)
    msg = str(err.value)
    assert f"load_model({path})" in msg and layer in msg and "nan" in msg, msg
    return err.value


def fault_diverged_training(tmp_path: Path) -> Exception:
    """A training run whose loss becomes NaN (a NaN pixel in the data): saving the model is
    refused (every atomic save checks its tensors), naming the output, the layer and the
    value, and nothing is written."""
    from diffusion_attribution.core.sections import TrainConfig
    from diffusion_attribution.diffusion.ddpm import NoiseSchedule
    from diffusion_attribution.diffusion.training import build_model, save_model, train_ddpm

    cfg, _ = tiny_model()
    images = torch.zeros(4, 1, 8, 8)
    images[2, 0, 3, 3] = float("nan")
    train = TrainConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=10)
    result = train_ddpm(
        lambda: build_model(cfg, (1, 8, 8)),
        images,
        NoiseSchedule.linear(10, 1e-3, 0.2),
        train,
        progress=False,
    )
    assert not all(math.isfinite(x) for x in result.losses)
    out = tmp_path / "outputs" / "train" / "model.pt"
    with pytest.raises(io.NonFiniteError) as err:
        save_model(out, result.ema_model, cfg, (1, 8, 8))
    msg = str(err.value)
    assert f"atomic_save({out})" in msg and "weight" in msg and "nan" in msg, msg
    assert not out.exists() and not out.parent.exists()
    return err.value


def fault_diverged_training_checkpoint(tmp_path: Path) -> Exception:
    """The same diverging run with checkpoints: it stops at its first checkpoint after the
    loss became NaN, naming the checkpoint file and the layer, and leaves no NaN checkpoint
    to resume from."""
    from diffusion_attribution.core.sections import TrainConfig
    from diffusion_attribution.diffusion.ddpm import NoiseSchedule
    from diffusion_attribution.diffusion.training import build_model, train_ddpm

    cfg, _ = tiny_model()
    images = torch.zeros(4, 1, 8, 8)
    images[2, 0, 3, 3] = float("nan")
    train = TrainConfig(steps=6, batch_size=4, warmup_steps=1, checkpoint_every=2)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(io.NonFiniteError) as err:
        train_ddpm(
            lambda: build_model(cfg, (1, 8, 8)),
            images,
            NoiseSchedule.linear(10, 1e-3, 0.2),
            train,
            checkpoint_path=ckpt,
            progress=False,
        )
    msg = str(err.value)
    assert f"atomic_save({ckpt})" in msg and "nan" in msg, msg
    assert not ckpt.exists()
    return err.value


def fault_inf_curvature_factor(tmp_path: Path) -> Exception:
    """An Inf in a layer's gradient covariance: the Kronecker blocks are not built; the
    error names the function's check, the layer, the factor, the index and the value."""
    from diffusion_attribution.curvature.kronecker import LayerFactors, kronecker_blocks

    G, A = torch.eye(3), torch.eye(5)
    G[1, 2] = float("inf")
    layer = LayerFactors("down.0.conv", {"weight": 0, "bias": 1}, A=A, G=G)
    with pytest.raises(FloatingPointError) as err:
        kronecker_blocks([layer], [(3, 5), (3,)], ekfac=False, separate_weight_and_bias=False)
    msg = str(err.value)
    assert "'down.0.conv'" in msg and "G (gradient covariance)" in msg, msg
    assert "inf at index [1, 2]" in msg, msg
    return err.value


def fault_inf_ekfac_eigenvalue(tmp_path: Path) -> Exception:
    """An Inf among EK-FAC's corrected eigenvalues (a separate weight block)."""
    from diffusion_attribution.curvature.kronecker import LayerFactors, kronecker_blocks

    corrected = {0: torch.ones(3, 5), 1: torch.ones(3, 1)}
    corrected[0][2, 4] = float("-inf")
    layer = LayerFactors(
        "up.1.proj", {"weight": 0, "bias": 1}, QG=torch.eye(3), QA=torch.eye(5), corrected=corrected
    )
    with pytest.raises(FloatingPointError) as err:
        kronecker_blocks([layer], [(3, 5), (3,)], ekfac=True, separate_weight_and_bias=True)
    msg = str(err.value)
    assert "'up.1.proj'" in msg and "corrected eigenvalues" in msg and "-inf" in msg, msg
    return err.value


class InfAtSecondQuery:
    """A measurement whose value is Inf for query 1 (module-level: picklable)."""

    def draw(self, x0, ids, s, seed, trajectories=None):
        return {"eps": torch.zeros(len(x0), s)}

    def __call__(self, model, x0, chunk):
        out = torch.zeros(len(x0), dtype=torch.float64)
        out[1:2] = float("inf")
        return out


def fault_non_finite_measurement(tmp_path: Path) -> Exception:
    """A measurement that is not finite for one query: the measure task stops before caching
    it, naming the model, the measurement, the query and the value."""
    from diffusion_attribution.diffusion.training import save_model
    from diffusion_attribution.evaluation.ground_truth import MeasureTask, run_measure_task

    cfg, model = tiny_model()
    save_model(tmp_path / "m.pt", model, cfg, (1, 8, 8))
    io.atomic_save({"queries": torch.zeros(3, 1, 8, 8), "trajectories": None}, tmp_path / "in.pt")
    cache = tmp_path / "cache" / "subset3_seed101.pt"
    task = MeasureTask(
        "measure_subset3_seed101", str(cache),
        (("subset3_seed101", str(tmp_path / "m.pt"), str(cache), "key"),),
        str(tmp_path / "in.pt"), {"elbo": InfAtSecondQuery()}, {"elbo": 2}, 0, 16,
    )  # fmt: skip
    with pytest.raises(io.NonFiniteError) as err:
        run_measure_task(task)
    msg = str(err.value)
    assert "model 'subset3_seed101'" in msg and "elbo" in msg, msg
    assert "inf at index [1]" in msg, msg
    assert not cache.exists()
    return err.value


FAULTS = {
    "nan-weight-checkpoint": fault_nan_weight_checkpoint,
    "diverged-training": fault_diverged_training,
    "diverged-training-checkpoint": fault_diverged_training_checkpoint,
    "inf-curvature-factor": fault_inf_curvature_factor,
    "inf-ekfac-eigenvalue": fault_inf_ekfac_eigenvalue,
    "non-finite-measurement": fault_non_finite_measurement,
}


@pytest.mark.parametrize("name", FAULTS)
def test_numerical_fault_is_caught(name, tmp_path):
    FAULTS[name](tmp_path)


def test_numerical_fault_counts(tmp_path):
    caught = 0
    for i, fault in enumerate(FAULTS.values()):
        (tmp_path / str(i)).mkdir()
        with contextlib.suppress(Exception):
            fault(tmp_path / str(i))
            caught += 1
    assert caught == len(FAULTS) >= 4
    print(f"\nnumerical faults: {len(FAULTS)} tried, {caught} caught")


# ---- part 4: corrupt and hostile files ----------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path) -> None:
    """Flip one bit inside the largest tensor's bytes (torch.load itself does not notice)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # the data follow the local header (30 bytes, the name, the local extra field)
    local_extra = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + local_extra
    data[start + info.file_size // 2] ^= 0x08
    path.write_bytes(bytes(data))


def empty(path: Path) -> None:
    path.write_bytes(b"")


class _Hostile:
    """Unpickling this would create ``marker`` (code run by a data file)."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def as_pickle(path: Path) -> None:
    _Hostile.marker = str(path.with_suffix(".pwned"))
    path.write_bytes(pickle.dumps({"state_dict": _Hostile()}))


def as_torch_pickle(path: Path) -> None:
    _Hostile.marker = str(path.with_suffix(".pwned"))
    torch.save({"state_dict": _Hostile()}, path)


DAMAGE = {
    "truncated": (truncate, "truncated or corrupt"),
    "bit-flipped": (flip_bit, "does not match its CRC-32"),
    "empty": (empty, "is empty"),
    "bare-pickle": (as_pickle, "bare pickle"),
    "pickled-code": (as_torch_pickle, "Python objects other than tensors"),
}


def write_model(path: Path) -> Callable[[Path], object]:
    from diffusion_attribution.diffusion.training import load_checked_model, save_model

    cfg, model = tiny_model()
    save_model(path, model, cfg, (1, 8, 8))
    return load_checked_model


def write_scores(path: Path) -> Callable[[Path], object]:
    from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet

    ScoreSet({ScoreKey("kfac", "loss"): torch.randn(4, 50)}).save(path)
    return ScoreSet.load


def write_measurements(path: Path) -> Callable[[Path], object]:
    io.atomic_save({"key": "abc", "values": {"loss": torch.randn(64, dtype=torch.float64)}}, path)
    return lambda p: io.load(p, "measurements")


FILES = {"checkpoint": write_model, "scores": write_scores, "measurements": write_measurements}
CORRUPTIONS = [(f, d) for f in FILES for d in DAMAGE]


@pytest.mark.parametrize(("kind", "damage"), CORRUPTIONS, ids=[f"{f}-{d}" for f, d in CORRUPTIONS])
def test_corrupt_file_is_reported(kind, damage, tmp_path):
    check_corrupt_file(kind, damage, tmp_path)


def check_corrupt_file(kind: str, damage: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.pt"
    loader = FILES[kind](path)
    loader(path)  # intact: loads
    spoil, words = DAMAGE[damage]
    spoil(path)
    with pytest.raises(io.CorruptFileError) as err:
        loader(path)
    msg = str(err.value)
    assert str(path) in msg and words in msg, msg
    assert not path.with_suffix(".pwned").exists(), "a data file ran code"


def test_corrupt_file_counts(tmp_path):
    caught = 0
    for i, (kind, damage) in enumerate(CORRUPTIONS):
        (tmp_path / str(i)).mkdir()
        with contextlib.suppress(Exception):
            check_corrupt_file(kind, damage, tmp_path / str(i))
            caught += 1
    disk = 0
    for i, writer in enumerate(("atomic_save", "atomic_write_text")):
        with contextlib.suppress(Exception):
            check_full_disk(writer, tmp_path / f"disk{i}")
            disk += 1
    assert caught == len(CORRUPTIONS) >= 15 and disk == 2
    print(
        f"\ncorrupt or hostile files: {len(CORRUPTIONS)} tried ({len(FILES)} kinds x "
        f"{len(DAMAGE)} damages), {caught} caught; full disk during a write: {disk} of 2 "
        "writers leave the old file intact"
    )


def check_full_disk(writer: str, folder: Path) -> None:
    """The disk fills half-way through a write: the error is ENOSPC, the old file is intact
    and no partial file is left beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    io.atomic_save({"w": torch.ones(100)}, path)
    old = path.read_bytes()

    def full(f, *_):
        f.write(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        if writer == "atomic_save":
            mp.setattr(io.torch, "save", lambda obj, f: full(f))
            with pytest.raises(OSError) as err:
                io.atomic_save({"w": torch.zeros(100)}, path)
        else:

            def fsync(fd):
                raise OSError(errno.ENOSPC, "No space left on device")

            mp.setattr(io.os, "fsync", fsync)
            with pytest.raises(OSError) as err:
                io.atomic_write_text("new text", path)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == old
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"], "a partial file was left"
    assert torch.equal(io.load(path)["w"], torch.ones(100))


@pytest.mark.parametrize("writer", ["atomic_save", "atomic_write_text"])
def test_full_disk_leaves_the_old_file(writer, tmp_path):
    check_full_disk(writer, tmp_path)


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found: .*absent.pt"):
        io.load(tmp_path / "absent.pt", "model")


#: Loads of data files that are not ``torch.load(..., weights_only=True)``: the one allowed,
#: submitit's own job result files (written and read by the same user), in core/executors.py.
ALLOWED_UNSAFE = {("core/executors.py", "pickle_load")}
UNSAFE = {"load", "loads", "pickle_load", "read_pickle", "Unpickler"}
PICKLERS = {"pickle", "cloudpickle", "dill", "joblib", "_pickle", "pd", "pandas"}


def unsafe_loads(root: Path) -> tuple[set[tuple[str, str]], list[str]]:
    """``(file, name)`` of every pickle-style load in ``root``'s Python files, and every
    ``torch.load`` without ``weights_only=True`` (as ``file:line``)."""
    unsafe, torch_loads = set(), []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(root))
        imported = {}  # from pickle import load as x -> x: pickle
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    imported[a.asname or a.name] = (node.module, a.name)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                owner, name = f.value.id, f.attr
            elif isinstance(f, ast.Name):
                owner, name = imported.get(f.id, ("", f.id))
                owner = owner.split(".")[0]
            else:
                continue
            if owner == "torch" and name == "load":
                ok = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not ok:
                    torch_loads.append(f"{rel}:{node.lineno}")
            elif name in UNSAFE and (owner in PICKLERS or name == "pickle_load"):
                unsafe.add((rel, name))
            elif owner in ("np", "numpy") and name == "load":
                if any(k.arg == "allow_pickle" for k in node.keywords):
                    unsafe.add((rel, "np.load(allow_pickle)"))
    return unsafe, torch_loads


def test_no_unsafe_loads_in_the_library(tmp_path):
    """Nothing read from a data file is unpickled: every torch.load passes weights_only=True,
    no pickle load of data, submitit's job files the one exception."""
    unsafe, torch_loads = unsafe_loads(LIB)
    assert torch_loads == [], f"torch.load without weights_only=True: {torch_loads}"
    assert unsafe == ALLOWED_UNSAFE, f"pickle-style loads: {sorted(unsafe - ALLOWED_UNSAFE)}"
    # the scan can fail: it finds each kind of unsafe load in a file made to hold them
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch\nfrom pickle import loads as L\nimport numpy as np\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\npickle.load(f)\nL(b)\n"
        "np.load('x', allow_pickle=True)\n"
    )
    found, loads = unsafe_loads(tmp_path)
    assert loads == ["bad.py:4", "bad.py:5"]
    assert found == {("bad.py", "load"), ("bad.py", "loads"), ("bad.py", "np.load(allow_pickle)")}


def test_messages_are_errors_not_asserts():
    """The library raises errors that name things; it never uses assert (stripped by -O)."""
    paths = sorted(LIB.rglob("*.py"))
    assert len(paths) > 50
    for path in paths:
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.Assert) for n in ast.walk(tree)), path


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError) and issubclass(io.CorruptFileError, ValueError)
    assert issubclass(io.NonFiniteError, FloatingPointError)


# ---- part 5: determinism across threads and batch sizes ------------------------------------------
#
# Bitwise determinism of whole runs (same thread count, empty caches) is checked on the smoke
# run in tests/test_smoke_run.py. Here: K-FAC influence on a tiny U-Net with the same settings
# twice (bitwise), and with another thread count and batch size (float tolerance, the same
# ranking of the training examples for every query: the code claims batch invariance).


def _influence(threads: int, batch_size: int) -> torch.Tensor:
    import diffusion_attribution as da
    from diffusion_attribution.diffusion.unet import UNet
    from tests.helpers import TINY_4X4

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = UNet(TINY_4X4).eval()
        g = torch.Generator().manual_seed(1)
        train = torch.rand(12, 1, 4, 4, generator=g) * 2 - 1
        queries = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
        schedule = da.NoiseSchedule.linear(50, 1e-3, 0.2)
        loss = da.DiffusionLoss(schedule)
        params = da.kfac_parameters(model)
        d = loss.draw(train, torch.arange(len(train)), 4, seed=0)
        K = da.fit_kfac(
            model, params, schedule, train, d["t"], d["eps"], batch_size=batch_size, mc_seed=0
        )
        key = da.ScoreKey("kfac", "loss", curvature="K", damping=1e-3)
        scores, _ = da.attribute(
            model, params, train, queries, {"loss": loss}, {"K": K}, [key],
            train_measurement=loss, train_draws=8, query_draws=8, seed=0, batch_size=batch_size,
        )  # fmt: skip
        return scores[key]
    finally:
        torch.set_num_threads(before)


def test_same_settings_same_bits_other_settings_same_ranking():
    a = _influence(threads=1, batch_size=4)
    assert torch.equal(a, _influence(threads=1, batch_size=4))
    for threads, batch in ((2, 4), (1, 12), (2, 12)):
        b = _influence(threads=threads, batch_size=batch)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
        assert torch.equal(b.argsort(dim=1), a.argsort(dim=1)), (threads, batch)
