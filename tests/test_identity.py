"""Identities by meaning (comments and docstrings rename nothing, code does), stale results
moved aside, and the adoption of results named by the legacy raw-bytes scheme."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusion_attribution import ground_truth, migrate, retrain
from diffusion_attribution.config import DiffusionConfig, ModelConfig, TrainConfig
from diffusion_attribution.data import ImageDataset
from diffusion_attribution.ddpm import NoiseSchedule
from diffusion_attribution.identity import (
    code_digest,
    fingerprint,
    move_aside,
    normalized_source,
    source_digest,
)
from diffusion_attribution.measurements import DiffusionLoss
from diffusion_attribution.train import load_model

MODULE = '''
"""A module docstring."""

import math

#: an attribute documented by a comment
SCALE = 2.0


def f(x):
    """Scaled cosine."""
    # a comment
    return SCALE * math.cos(x)


class C:
    """A class."""

    def g(self, y):
        """A method."""
        return f(y) + 1
'''


def load(tmp_path: Path, name: str, text: str, monkeypatch):
    """Import ``text`` as module ``name`` (registered, so inspect finds its classes)."""
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_source_digest_ignores_comments_docstrings_and_layout() -> None:
    base = source_digest(MODULE)
    same = [
        MODULE.replace('"""Scaled cosine."""', '"""Another text, over\n    two lines."""'),
        MODULE.replace("    # a comment\n", "    # another comment\n    # and more\n"),
        MODULE.replace('"""A module docstring."""', ""),
        MODULE.replace("return SCALE * math.cos(x)", "return (SCALE\n            * math.cos(x))"),
        MODULE.replace('"""A method."""', "'''A method, in other quotes.'''"),
        MODULE.replace("SCALE = 2.0", "SCALE = 2.00  # trailing comment"),
    ]
    for text in same:
        assert text != MODULE and source_digest(text) == base
    changed = [
        MODULE.replace("SCALE = 2.0", "SCALE = 3.0"),
        MODULE.replace("math.cos(x)", "math.sin(x)"),
        MODULE.replace("return f(y) + 1", "return f(y) - 1"),
        MODULE.replace('"""Scaled cosine."""', 'x = "Scaled cosine."'),
    ]
    for text in changed:
        assert source_digest(text) != base
    # a function left with only a docstring is a `pass`
    assert normalized_source('def h():\n    """Doc."""\n') == "def h():\n    pass"


def test_code_digest_of_modules_functions_and_methods(tmp_path: Path, monkeypatch) -> None:
    a = load(tmp_path, "mod_a", MODULE, monkeypatch)
    doc = MODULE.replace('"""A method."""', '"""Edited."""').replace("# a comment", "# edited")
    b = load(tmp_path, "mod_b", doc, monkeypatch)
    c = load(tmp_path, "mod_c", MODULE.replace("return f(y) + 1", "return f(y) + 2"), monkeypatch)
    assert code_digest(a) == code_digest(b) != code_digest(c)
    assert code_digest(a.C.g) == code_digest(b.C.g) != code_digest(c.C.g)  # indented source
    assert code_digest(a.C) == code_digest(b.C) != code_digest(c.C)
    assert code_digest(a.f) == code_digest(c.f)  # only g changed
    assert code_digest(a.f, a.C) != code_digest(a.C, a.f)  # order counts
    # the file on disk is read at each call: an edited comment keeps the digest
    before = code_digest(a)
    (tmp_path / "mod_a.py").write_text(MODULE.replace("# a comment", "# a longer comment"))
    assert code_digest(a) == before


def test_fingerprint_of_parts() -> None:
    x = torch.arange(6.0)
    base = fingerprint("a", x, TrainConfig(), (1, 2), 3)
    assert base == fingerprint("a", x.clone(), TrainConfig(), (1, 2), 3) and len(base) == 16
    for other in [
        fingerprint("b", x, TrainConfig(), (1, 2), 3),
        fingerprint("a", x.reshape(2, 3), TrainConfig(), (1, 2), 3),  # shape counts
        fingerprint("a", x.double(), TrainConfig(), (1, 2), 3),  # dtype counts
        fingerprint("a", x, TrainConfig(steps=3000), (1, 2), 3),
        fingerprint("a", x, TrainConfig(), (1, 2, 3)),  # parts do not run together
        fingerprint(x, "a", TrainConfig(), (1, 2), 3),
    ]:
        assert other != base


def test_move_aside_never_deletes(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "m.pt", tmp_path / "y" / "m.pt"
    for i, f in enumerate((a, b)):
        f.parent.mkdir()
        f.write_bytes(b"model %d" % i)
    assert move_aside([], tmp_path / "stale") == [] and not (tmp_path / "stale").exists()
    moved = move_aside([a, b], tmp_path / "stale")
    assert [src for src, _ in moved] == [a, b] and not a.exists() and not b.exists()
    (folder,) = (tmp_path / "stale").iterdir()  # one UTC-timestamped folder per call
    assert folder.name.endswith("Z")
    assert sorted(dst.name for _, dst in moved) == ["m.pt", "m.pt.1"]  # a clash gets a suffix
    assert {dst.read_bytes() for _, dst in moved} == {b"model 0", b"model 1"}


def test_differences_between_legacy_and_current_code() -> None:
    legacy = textwrap.dedent(
        """
        import hashlib
        import math

        def naming():
            return hashlib.sha256(b"")

        def work(x):
            \"\"\"Doc.\"\"\"
            return math.cos(x)
        """
    )
    same = legacy.replace("import hashlib\n", "").replace("Doc.", "Other doc.")
    same = same.replace('return hashlib.sha256(b"")', "return 'new scheme'")
    assert migrate.differences(legacy, same, ignore={"naming"}) == []
    assert migrate.differences(legacy, same) == ["naming"]
    assert migrate.differences(legacy, legacy + "\ndef helper():\n    return 1\n") == []
    assert migrate.differences(legacy, legacy + "\nmath = None\n") == ["math"]  # rebinds
    assert migrate.differences(legacy, legacy.replace("cos", "sin")) == ["work"]
    assert migrate.differences(legacy, legacy + "\nprint('side effect')\n") == [
        "print('side effect')"
    ]
    assert migrate.differences(legacy + "\nX = 1\n", legacy) == ["X"]  # dropped
    # a reviewed change passes in exactly its reviewed version
    changed = legacy.replace("cos", "sin")
    (work,) = [src for src, names, _ in migrate._statements(changed, ()) if names == {"work"}]
    reviewed = {"work": source_digest(work)[:16]}
    assert migrate.differences(legacy, changed, reviewed=reviewed) == []
    again = legacy.replace("cos", "tan")
    assert migrate.differences(legacy, again, reviewed=reviewed) == [
        "work (not the reviewed version)"
    ]
    assert migrate.differences(legacy + "\nX = 1\n", legacy, reviewed={"X": None}) == []
    assert migrate.differences(legacy, legacy + "\nX = 1\n", reviewed={"X": None}) != []
    # the pinned reviews are of the current code
    for file, names in migrate.REVIEWED.items():
        for name, digest in names.items():
            assert migrate.reviewed_digest(file, name) == digest, f"re-review {file}: {name}"


def test_legacy_getsource_is_inspect_getsource(tmp_path: Path, monkeypatch) -> None:
    for obj in (retrain.run_job, retrain._configs, ImageDataset.subset, retrain._job_code):
        text = Path(inspect.getsourcefile(inspect.unwrap(obj))).read_text()
        assert migrate.legacy_getsource(text, obj.__qualname__) == inspect.getsource(obj)
    text = textwrap.dedent(
        """
        import functools

        class K:
            @staticmethod
            @functools.cache
            def m(x):
                return (x +
            1)  # a continued line
                # a trailing comment in the block

        def m():
            pass
        """
    )
    module = load(tmp_path, "mod_k", text, monkeypatch)
    assert migrate.legacy_getsource(text, "K.m") == inspect.getsource(module.K.m)
    assert migrate.legacy_getsource(text, "m") == inspect.getsource(module.m)
    assert migrate.legacy_getsource(text, "nope") is None


# -- adoption of legacy results -------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
#: The last landed commit of the legacy (raw-bytes) scheme.
LEGACY = "ac727a5"
MODEL = ModelConfig(
    base_channels=4, channel_mults=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=2
)
DIFFUSION = DiffusionConfig(num_timesteps=20, beta_start=1e-3, beta_end=0.2)
TRAIN = TrainConfig(steps=10, batch_size=8, warmup_steps=2, checkpoint_every=5)

LEGACY_RUN = """
import json, sys
from pathlib import Path
import torch
from diffusion_attribution import ground_truth, retrain
from diffusion_attribution.config import DiffusionConfig, ModelConfig, TrainConfig
from diffusion_attribution.ddpm import NoiseSchedule
from diffusion_attribution.measurements import DiffusionLoss

a = json.loads(sys.argv[1])
if not retrain.__file__.startswith(a["legacy"]):
    raise SystemExit(f"imported {retrain.__file__}, not the legacy package")
cfgs = ModelConfig(**a["model"]), DiffusionConfig(**a["diffusion"]), TrainConfig(**a["train"])
jobs = [retrain.make_job(n, a["data"], keep, 0, *cfgs, a["out"]) for n, keep in a["jobs"]]
retrain.run_jobs(jobs[:2], executor="inline", progress=False)
ckpt = retrain.checkpoint_path(jobs[2])  # an interrupted job's checkpoint (by name)
ckpt.write_bytes(b"legacy checkpoint")
d = cfgs[1]
loss = {"loss": DiffusionLoss(NoiseSchedule.linear(d.num_timesteps, d.beta_start, d.beta_end))}
models = {Path(j.output).stem: j.output for j in jobs[:2]}
queries = torch.load(a["queries"], weights_only=True)
ground_truth.measure_models(models, loss, queries, {"loss": 4}, 3, a["cache"], workers=1,
                            progress=False)
print(json.dumps({"outputs": [j.output for j in jobs], "ckpt": str(ckpt)}))
"""


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True)


@pytest.fixture
def legacy_package(tmp_path: Path) -> Path:
    """The package as committed at :data:`LEGACY`, in a folder of its own."""
    try:
        found = git("cat-file", "-e", f"{LEGACY}^{{commit}}").returncode == 0
    except OSError:
        found = False
    if not found:
        pytest.skip(f"needs a git checkout with the legacy commit {LEGACY}")
    root = tmp_path / "legacy"
    names = git("ls-tree", "-r", "--name-only", LEGACY, "lib/diffusion_attribution/")
    for name in names.stdout.decode().split():
        dest = root / Path(name).relative_to("lib")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(git("show", f"{LEGACY}:{name}").stdout)
    return root


def test_adopt_legacy_models_and_measurements(
    legacy_package: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data.pt"
    ImageDataset(
        images=torch.rand(24, 1, 8, 8, generator=g) * 2 - 1,
        labels=torch.zeros(24, dtype=torch.int64),
        name="random",
        class_names=("x",),
    ).save(data)
    queries = tmp_path / "queries.pt"
    torch.save(torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, queries)
    out, cache, stale = tmp_path / "models", tmp_path / "cache", tmp_path / "stale"
    spec = [(f"subset{i}_seed0", list(range(i, 24, 2))) for i in range(2)]
    spec += [("interrupted", list(range(12))), ("never_trained", list(range(6)))]
    args = {
        "legacy": str(legacy_package),
        "model": MODEL.model_dump(mode="json"),
        "diffusion": DIFFUSION.model_dump(mode="json"),
        "train": TRAIN.model_dump(mode="json"),
        "data": str(data),
        "out": str(out),
        "jobs": spec,
        "queries": str(queries),
        "cache": str(cache),
    }
    # the legacy code itself names, trains and measures (the oracle for its fingerprints)
    env = {**os.environ, "PYTHONPATH": str(legacy_package)}
    run = subprocess.run(
        [sys.executable, "-c", LEGACY_RUN, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    legacy = json.loads(run.stdout.strip().splitlines()[-1])
    old = [Path(o) for o in legacy["outputs"]]
    jobs = [retrain.make_job(n, data, keep, 0, MODEL, DIFFUSION, TRAIN, out) for n, keep in spec]
    assert all(o.name != Path(j.output).name for o, j in zip(old, jobs, strict=True))
    wrong = out / f"never_trained-{'0123456789abcdef'}.pt"  # not this job's fingerprint
    wrong.write_bytes(b"some other model")
    weights = {o: o.read_bytes() for o in old[:2]}

    # legacy code that differs from the current code is not adopted
    real = migrate._current_sources
    monkeypatch.setattr(
        migrate,
        "_current_sources",
        lambda names: {n: t + "\nNoiseSchedule = None\n" for n, t in real(names).items()},
    )
    assert migrate.adopt_legacy_models(jobs, ROOT) == []
    assert "differs from the current code" in capsys.readouterr().out
    monkeypatch.undo()
    # nor without git history
    assert migrate.adopt_legacy_models(jobs, tmp_path) == []
    assert "no git history" in capsys.readouterr().out

    moved = migrate.adopt_legacy_models(jobs, ROOT)
    assert sorted(moved) == sorted(
        [
            (old[0], Path(jobs[0].output)),
            (old[1], Path(jobs[1].output)),
            (Path(legacy["ckpt"]), retrain.checkpoint_path(jobs[2])),
        ]
    )
    assert "renamed 3 of 4" in capsys.readouterr().out
    for o, j in zip(old[:2], jobs[:2], strict=True):
        assert Path(j.output).read_bytes() == weights[o]  # renamed, not retrained
    assert wrong.exists() and not Path(jobs[3].output).exists()
    # and an adopted model is the one the current code trains, to the bit
    ref = retrain.RetrainJob(**{**jobs[0].__dict__, "output": str(tmp_path / "ref" / "m.pt")})
    adopted, trained = load_model(jobs[0].output), load_model(retrain.run_job(ref))
    for k, v in adopted.state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k
    assert migrate.adopt_legacy_models(jobs, ROOT) == []  # idempotent
    # what is left over is moved aside, not deleted
    assert [src for src, _ in retrain.prune(out, jobs, stale_dir=stale)] == [wrong]

    # the cached measurements follow their renamed models, keeping their values
    labels = {Path(j.output).stem: j.output for j in jobs[:2]}
    saved = {f.stem: torch.load(f, weights_only=True) for f in cache.glob("*.pt")}
    assert sorted(saved) == sorted(o.stem for o in old[:2])
    loss = {"loss": DiffusionLoss(NoiseSchedule.linear(20, 1e-3, 0.2))}
    x = torch.load(queries, weights_only=True)
    settings = (loss, x, {"loss": 4})
    # measured with another seed: not these measurements
    assert migrate.adopt_legacy_measurements(labels, *settings, 4, cache, repo_root=ROOT) == []
    adopted = migrate.adopt_legacy_measurements(labels, *settings, 3, cache, repo_root=ROOT)
    assert sorted(adopted) == sorted(
        (cache / f"{o.stem}.pt", cache / f"{Path(j.output).stem}.pt")
        for o, j in zip(old[:2], jobs[:2], strict=True)
    )

    def boom(*args, **kwargs):
        raise AssertionError("an adopted measurement was measured again")

    monkeypatch.setattr(ground_truth, "measure", boom)
    values = ground_truth.measure_models(
        labels, *settings, 3, cache, workers=1, progress=False, prune=True, stale_dir=stale
    )
    for o, j in zip(old[:2], jobs[:2], strict=True):
        assert torch.equal(values[Path(j.output).stem]["loss"], saved[o.stem]["values"]["loss"])
    assert sorted(f.stem for f in cache.glob("*.pt")) == sorted(labels)
