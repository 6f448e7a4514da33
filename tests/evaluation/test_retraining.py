"""Retraining jobs: idempotent, deterministic, shared seeds, submitit fan-out, resumption."""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import diffusion_attribution
from diffusion_attribution.core.sections import DiffusionConfig, ModelConfig, TrainConfig
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.training import load_model
from diffusion_attribution.evaluation import retraining as retrain
from diffusion_attribution.evaluation.lds import subset_masks
from diffusion_attribution.evaluation.retraining import (
    RetrainJob,
    checkpoint_path,
    run_job,
    run_jobs,
)

MODEL = ModelConfig(
    base_channels=4, channel_mults=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=2
)
DIFFUSION = DiffusionConfig(num_timesteps=50)
TRAIN = TrainConfig(steps=20, batch_size=8, warmup_steps=2, checkpoint_every=5)


@pytest.fixture
def data_path(tmp_path: Path) -> str:
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(
        images=torch.rand(30, 1, 8, 8, generator=g) * 2 - 1,
        labels=torch.zeros(30, dtype=torch.int64),
        name="random",
        class_names=("x",),
    )
    path = tmp_path / "data.pt"
    ds.save(path)
    return str(path)


def make_job(
    data_path: str, out: Path, keep: tuple[int, ...], seed: int = 0, **train
) -> RetrainJob:
    return RetrainJob(
        name=out.stem,
        data_path=data_path,
        keep=keep,
        seed=seed,
        model=MODEL.model_dump(mode="json"),
        diffusion=DIFFUSION.model_dump(mode="json"),
        train=TRAIN.model_copy(update=train).model_dump(mode="json"),
        output=str(out),
    )


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def model_of(ckpt: Path) -> str:
    """``k1.pt.<fingerprint>.ckpt`` -> ``k1.pt``."""
    return ckpt.name.rsplit(".", 2)[0]


def unfinished_ckpts(folder: Path) -> list[Path]:
    """Checkpoints of models not yet saved (a kill can also land between the two)."""
    return [c for c in sorted(folder.glob("*.ckpt")) if not (folder / model_of(c)).exists()]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_job_idempotent_deterministic_shared_seeds(data_path: str, tmp_path: Path) -> None:
    keep_a, keep_b = tuple(range(0, 30, 2)), tuple(range(1, 30, 2))
    job = make_job(data_path, tmp_path / "m" / "a.pt", keep_a)
    assert run_job(job) == job.output
    out = Path(job.output)
    model = load_model(out)
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    assert not list(out.parent.glob("*.ckpt"))  # checkpoint removed once the model is saved

    mtime, data = out.stat().st_mtime_ns, out.read_bytes()
    time.sleep(0.01)
    run_job(job)  # finished models are never retrained
    assert out.stat().st_mtime_ns == mtime and out.read_bytes() == data

    # the same job again (elsewhere) gives identical weights; another subset, same seed, differs
    again = make_job(data_path, tmp_path / "m" / "a2.pt", keep_a)
    other = make_job(data_path, tmp_path / "m" / "b.pt", keep_b)
    run_job(again)
    run_job(other)
    assert same(weights(out), weights(again.output))
    assert not same(weights(out), weights(other.output))

    # the job's seed overrides the seed in its train config ("shared seeds")
    ignored = make_job(data_path, tmp_path / "m" / "a3.pt", keep_a)
    ignored = RetrainJob(**{**ignored.__dict__, "train": {**ignored.train, "seed": 7}})
    assert ignored.train["seed"] == 7
    run_job(ignored)
    assert same(weights(out), weights(ignored.output))


def test_run_job_ignores_stale_checkpoint(data_path: str, tmp_path: Path) -> None:
    out = tmp_path / "c.pt"
    stale = tmp_path / "c.pt.0123456789abcdef.ckpt"
    stale.write_bytes(b"not a checkpoint")
    run_job(make_job(data_path, out, tuple(range(10))))
    assert out.exists() and not stale.exists()


def test_run_jobs_inline_and_errors(data_path: str, tmp_path: Path, capsys) -> None:
    jobs = [make_job(data_path, tmp_path / f"i{k}.pt", tuple(range(k, 30, 3))) for k in range(2)]
    assert run_jobs(jobs, executor="inline", progress=False) == [j.output for j in jobs]
    assert run_jobs(jobs, executor="inline", progress=False) == [j.output for j in jobs]
    assert "2 of 2 stacks of models exist" in capsys.readouterr().out
    bad = make_job(data_path, tmp_path / "bad.pt", (0, 99))
    with pytest.raises(RuntimeError, match="'bad'"):
        run_jobs([bad], executor="inline", progress=False)
    with pytest.raises(ValueError, match="executor"):
        run_jobs(jobs, executor="nope")


def test_run_jobs_local_submitit(data_path: str, tmp_path: Path) -> None:
    jobs = [make_job(data_path, tmp_path / f"l{k}.pt", tuple(range(k, 30, 3))) for k in range(3)]
    outs = run_jobs(
        jobs, executor="local", max_parallel=2, folder=str(tmp_path / "submitit"), progress=False
    )
    assert outs == [j.output for j in jobs]
    for o in outs:
        load_model(o)
    assert not list(tmp_path.glob("*.ckpt"))
    # a failing job names itself and its log
    bad = make_job(data_path, tmp_path / "bad.pt", (0, 99))
    with pytest.raises(RuntimeError, match=r"'bad'.*submitit log"):
        run_jobs([bad], executor="local", folder=str(tmp_path / "submitit"), progress=False)


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_kill_and_rerun_resumes(data_path: str, tmp_path: Path, executor: str) -> None:
    out_dir = tmp_path / "out"
    # longer runs with frequent checkpoints, so the kill likely lands mid-training
    jobs = [
        make_job(data_path, out_dir / f"k{k}.pt", tuple(range(k, 30, 2)), steps=60)
        for k in range(4)
    ]
    for j in jobs:
        assert j.train["checkpoint_every"] == 5
    script = textwrap.dedent(
        f"""
        import pickle
        from diffusion_attribution.evaluation.retraining import run_jobs
        jobs = pickle.loads({pickle.dumps(jobs)!r})
        run_jobs(jobs, executor={executor!r}, max_parallel=1,
                 folder={str(tmp_path / "submitit")!r}, progress=False)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        start_new_session=True,  # its own process group, with submitit's workers
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        first = Path(jobs[0].output)
        while not first.exists():
            if proc.poll() is not None:
                pytest.fail(f"runner exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no model finished within 60 s")
            time.sleep(0.05)

        # then until the next job has checkpointed, so the kill lands mid-training
        while not unfinished_ckpts(out_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group, workers included
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    time.sleep(0.2)

    finished = {
        j.output: (Path(j.output).stat().st_mtime_ns, Path(j.output).read_bytes())
        for j in jobs
        if Path(j.output).exists()
    }
    assert 1 <= len(finished) < len(jobs), "the kill should land before the last job finished"
    ckpts = unfinished_ckpts(out_dir)
    # exactly one job (max_parallel=1) was interrupted mid-training; its checkpoint is the
    # one the rerun resumes from (same fingerprint)
    resumed = {model_of(c) for c in ckpts}
    assert len(resumed) == 1  # max_parallel=1: exactly one job was interrupted
    assert resumed.isdisjoint(Path(o).name for o in finished)
    (interrupted,) = [j for j in jobs if Path(j.output).name in resumed]
    assert ckpts == [checkpoint_path(interrupted)]
    assert torch.load(ckpts[0], weights_only=True)["step"] > 0

    run_jobs(jobs, executor=executor, max_parallel=1, folder=str(tmp_path / "s2"), progress=False)
    for j in jobs:
        assert Path(j.output).exists()
    for o, (mtime, data) in finished.items():
        assert Path(o).stat().st_mtime_ns == mtime and Path(o).read_bytes() == data
    assert not list(out_dir.glob("*.ckpt"))

    # the interrupted job resumed from its checkpoint: it (and the jobs not yet started) end
    # with the weights of an uninterrupted run
    ref_dir = tmp_path / "ref"
    for j in jobs:
        if j.output in finished:
            continue
        ref = RetrainJob(**{**j.__dict__, "output": str(ref_dir / Path(j.output).name)})
        run_job(ref)
        assert same(weights(j.output), weights(ref.output)), j.name


def test_fingerprinted_jobs_and_prune(data_path: str, tmp_path: Path) -> None:
    out = tmp_path / "models"
    masks = subset_masks(30, 3, 0.5, seed=0)
    jobs = retrain.subset_jobs(data_path, masks, (7, 8), MODEL, DIFFUSION, TRAIN, out)
    assert [[j.name for j in row] for row in jobs][1] == ["subset001_seed7", "subset001_seed8"]
    for i, row in enumerate(jobs):
        for k, job in enumerate(row):
            assert job.seed == (7, 8)[k]  # shared seeds: seed s_k for every subset
            assert job.keep == tuple(torch.nonzero(masks[i]).flatten().tolist())
            assert Path(job.output).parent == out and Path(job.output).name.startswith(job.name)
    flat = [j for row in jobs for j in row]
    assert len({Path(j.output).name for j in flat}) == 6
    # independent seeds: one model per subset, each with its own seed
    indep = retrain.subset_jobs(
        data_path, masks, (20, 21, 22), MODEL, DIFFUSION, TRAIN, out, shared=False
    )
    assert [[j.seed for j in row] for row in indep] == [[20], [21], [22]]
    assert [row[0].name for row in indep] == [
        "subset000_indep20",
        "subset001_indep21",
        "subset002_indep22",
    ]
    with pytest.raises(ValueError, match="3 subsets"):
        retrain.subset_jobs(data_path, masks, (1, 2), MODEL, DIFFUSION, TRAIN, out, shared=False)

    # the file name changes with anything that defines the model, and only then
    base = retrain.make_job("m", data_path, range(10), 0, MODEL, DIFFUSION, TRAIN, out)
    same_again = retrain.make_job("m", data_path, range(10), 0, MODEL, DIFFUSION, TRAIN, out)
    assert base.output == same_again.output
    variants = [
        retrain.make_job("m", data_path, range(9), 0, MODEL, DIFFUSION, TRAIN, out),
        retrain.make_job("m", data_path, range(10), 1, MODEL, DIFFUSION, TRAIN, out),
        retrain.make_job(
            "m",
            data_path,
            range(10),
            0,
            MODEL,
            DIFFUSION,
            TRAIN.model_copy(update={"steps": 21}),
            out,
        ),
    ]
    other_data = tmp_path / "other.pt"
    ds = ImageDataset.load(data_path)
    ImageDataset(ds.images.flip(0), ds.labels, ds.name, ds.class_names).save(other_data)
    variants.append(retrain.make_job("m", other_data, range(10), 0, MODEL, DIFFUSION, TRAIN, out))
    assert len({base.output, *(v.output for v in variants)}) == 5

    # prune keeps the wanted models and their checkpoints and moves everything else aside
    out.mkdir()
    wanted = flat[:2]
    for j in wanted:
        Path(j.output).write_bytes(b"model")
        Path(j.output + ".0123456789abcdef.ckpt").write_bytes(b"ckpt")
    stale = [out / "subset000_seed0-ffffffffffffffff.pt", out / "x.pt.0123456789abcdef.ckpt"]
    for i, f in enumerate(stale):
        f.write_bytes(b"old %d" % i)
    with pytest.raises(TypeError, match="stale_dir"):
        retrain.prune(out, wanted)  # no default: nobody prunes by accident
    moved = retrain.prune(out, wanted, stale_dir=tmp_path / "stale")
    assert [src for src, _ in moved] == sorted(stale)
    assert len(list(out.iterdir())) == 4
    for i, (src, dst) in enumerate(sorted(moved)):  # nothing deleted: all in the stale folder
        assert dst.parent.parent == tmp_path / "stale" and dst.name == src.name
        assert dst.read_bytes() == b"old %d" % i
    assert retrain.prune(out, wanted, stale_dir=tmp_path / "stale") == []


def copy_package(tmp_path: Path, name: str, edits: dict[str, tuple[str, str]]) -> Path:
    """A copy of the package's sources in ``tmp_path / name``, with ``edits`` ({path in the
    package: (old, new)}) applied; returns the folder that holds the copy."""
    src = Path(diffusion_attribution.__file__).parent
    root = tmp_path / name
    for f in src.rglob("*.py"):
        rel = f.relative_to(src).as_posix()
        text = f.read_text()
        if rel in edits:
            old, new = edits[rel]
            assert text.count(old) == 1, (rel, old)
            text = text.replace(old, new)
        dest = root / "diffusion_attribution" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    return root


def _package_module(name: str) -> bool:
    return name == "diffusion_attribution" or name.startswith("diffusion_attribution.")


@contextlib.contextmanager
def imported_from(root: Path):
    """The retraining module of the package copy in ``root`` (:func:`copy_package`), imported
    in place of the checkout's while the block runs; the checkout's modules are back after."""
    saved = {n: m for n, m in sys.modules.items() if _package_module(n)}
    for n in saved:
        del sys.modules[n]
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("diffusion_attribution.evaluation.retraining")
    finally:
        sys.path.remove(str(root))
        for n in [n for n in sys.modules if _package_module(n)]:
            del sys.modules[n]
        sys.modules.update(saved)


def test_job_names_follow_code_not_comments(data_path: str, tmp_path: Path) -> None:
    """A docstring or comment edit in the training code renames no job; a code edit does."""

    def name_of(module) -> str:
        out = tmp_path / "out"
        job = module.make_job("m", data_path, range(10), 0, MODEL, DIFFUSION, TRAIN, out)
        return Path(job.output).name

    def name_in_copy(name: str, edits: dict[str, tuple[str, str]]) -> str:
        with imported_from(copy_package(tmp_path, name, edits)) as module:
            return name_of(module)

    base = name_of(retrain)
    docs = {
        "diffusion/ddpm.py": (
            '"""Denoising diffusion',
            '# a new comment\n"""Edited. Denoising diffusion',
        ),
        "diffusion/training.py": (
            "linear warm-up, then cosine to 0.",
            "warm-up, then a cosine decay (edited).\n\n    More text.",
        ),
        "evaluation/retraining.py": (
            "torch thread (several stacks",
            "torch thread (edited: several stacks",
        ),
        "diffusion/datasets.py": ("Return the examples at", "The examples at"),
    }
    code = {
        "diffusion/training.py": ("0.5 * (1.0 + math.cos", "0.5 * (1.0 - math.cos"),
        "evaluation/retraining.py": (
            '{**job.train, "seed": job.seed}',
            '{**job.train, "seed": job.seed + 1}',
        ),
        "diffusion/datasets.py": (
            "idx = torch.as_tensor(indices)",
            "idx = torch.as_tensor(indices).flip(0)",
        ),
    }
    assert name_in_copy("same", {}) == base  # the location does not count
    assert name_in_copy("docs", docs) == base
    renamed = {name_in_copy(f"code_{Path(f).stem}", {f: edit}) for f, edit in code.items()}
    assert len(renamed) == len(code) and base not in renamed
    assert name_of(retrain) == base  # the checkout's modules are back


def test_job_exits_when_its_owner_is_killed(tmp_path: Path) -> None:
    """A job outlives neither a SIGKILLed run_jobs process nor its orphaned controller."""
    child = "from diffusion_attribution.core.executors import exit_with_owner; import time; exit_with_owner(0.05); time.sleep(60)"
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        env = {{**os.environ, "DA_RETRAIN_OWNER": str(os.getpid())}}
        p = subprocess.Popen([sys.executable, "-c", {child!r}], env=env, start_new_session=True)
        print(p.pid, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())

    def alive(p: int) -> bool:
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    try:
        time.sleep(1.0)
        assert alive(pid), "the job must keep running while its owner lives"
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the job outlived its owner"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc.stdout.close()


def test_stacks_plan_run_and_name_their_models(data_path: str, tmp_path: Path) -> None:
    """stack_jobs groups the jobs that can share a step (the data, configs but seed, batch
    size), in order, into stacks of at most max_size; the stack size renames a model and
    nothing else does; run_jobs trains each stack as one task, every model as run_job would
    with the same stack size (bit for bit) and close to a model trained alone."""
    out = tmp_path / "models"
    masks = subset_masks(30, 3, 0.5, seed=0)
    jobs = [
        j
        for row in retrain.subset_jobs(data_path, masks, (7, 8), MODEL, DIFFUSION, TRAIN, out)
        for j in row
    ]
    longer = retrain.make_job(
        "ref",
        data_path,
        range(30),
        7,
        MODEL,
        DIFFUSION,
        TRAIN.model_copy(update={"steps": 21}),
        out,
    )
    planned = retrain.stack_jobs([*jobs, longer], 4)
    assert [j.stack for j in planned] == [4, 4, 4, 4, 2, 2, 1]
    assert [j.name for j in planned] == [j.name for j in [*jobs, longer]]
    assert all(a.output != b.output for a, b in zip(planned[:6], jobs, strict=True))
    assert planned[6] == longer  # a stack of one: the name of a model trained alone
    assert retrain.stack_jobs(jobs, 1) == jobs  # stacks of one: the names of lone models
    assert retrain.stack_jobs(planned, 4) == planned
    assert [len(s.jobs) for s in retrain._stacks(planned)] == [4, 2, 1]
    with pytest.raises(ValueError, match="planned for stacks of other sizes"):
        run_jobs(planned[1:], executor="inline", progress=False)
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        retrain.stack_jobs(jobs, 0)

    small = retrain.stack_jobs(jobs[:3], 3)
    assert run_jobs(small, executor="inline", progress=False) == [j.output for j in small]
    assert not list(out.glob("*.ckpt"))
    # a member missing while the stack's last model exists (the counterfactual after one
    # method's damping changed): the stack is trained again, the missing model alone written
    first, last = Path(small[0].output), Path(small[-1].output)
    before, last_written = weights(first), last.stat().st_mtime_ns
    first.unlink()
    assert run_jobs(small, executor="inline", progress=False) == [j.output for j in small]
    assert same(weights(first), before) and last.stat().st_mtime_ns == last_written
    again = RetrainJob(**{**small[1].__dict__, "output": str(tmp_path / "again.pt")})
    run_stack = retrain.run_stack
    run_stack(retrain.RetrainStack((small[0], again, small[2])))  # the others exist: kept
    assert same(weights(small[1].output), weights(again.output))
    alone = jobs[1]
    run_job(alone)
    for name, w in weights(alone.output).items():
        torch.testing.assert_close(weights(small[1].output)[name], w, rtol=0, atol=1e-4)
