"""The smoke profile end to end: one run shared by every test here, which run in this order and
build on each other.

The run is ``dvc repro`` in a copy of the repository made by
:func:`diffusion_attribution.pipeline.sandbox.prepare` (what ``python -m diffusion_attribution.pipeline.sandbox
smoke``, the README's ten-minute look, does), after a first attempt killed half-way through
the retraining. Training shards of 120 examples (``DA_SHARD_EXAMPLES``) give the curvature,
influence and baselines stages several resumable shards each.

1. The killed run resumed and completed: no finished model lost or retrained, every output,
   every notebook without an error, a second ``dvc repro`` finds everything up to date.
2. The report, ``reports/index.html``, in headless Chromium: every image loads, every link
   resolves, no request leaves the machine (pages of the rendered notebooks too).
3. Shared results: ``dvc push`` to a directory remote, ``dvc pull dvc.yaml`` into a fresh clone
   (``dvc status`` clean, ``dvc repro`` runs nothing), and ``dvc repro --pull --allow-missing``
   after a parameter edit reruns only the stages that read it.
4. Kills (issue 14): each long stage (counterfactual, measure, retrain, baselines, influence),
   its resumable work removed, is killed twice at seeded random moments (SIGTERM, what SLURM
   sends on preemption, then SIGKILL); then an unrelated parameter is edited and ``dvc repro``
   completes the run. No process outlives a kill, no file is left half-written, nothing
   finished before a kill is recomputed, and every redone stage's outputs are bitwise those of
   the first run (two runs from empty caches, same thread count: the hashes in ``dvc.lock``).
   A comment added to the training code at the same time reruns every stage and recomputes
   nothing else.
5. An experiment with another recipe retrains, keeps the old models aside, and ``dvc exp show``
   lists both runs.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml

from diffusion_attribution.core import io
from diffusion_attribution.pipeline import results, sandbox, stages
from diffusion_attribution.pipeline.bundle import MANIFEST_KEYS, publish
from diffusion_attribution.pipeline.runner import notebook
from tests import browser

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
pytestmark = pytest.mark.slow


def dvc(smoke, *args: str, env: dict | None = None, cwd: Path | None = None, check: bool = True):
    run = subprocess.run(
        [*DVC, *args], cwd=cwd or smoke.repo, env=env or smoke.env, capture_output=True, text=True
    )
    if check:
        assert run.returncode == 0, (
            f"dvc {' '.join(args)}:\n{run.stdout[-4000:]}{run.stderr[-4000:]}"
        )
    return run


def ran(output: str) -> set[str]:
    """The stages a ``dvc repro`` ran."""
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def reads(stage: dict, section: str) -> bool:
    """Does a ``dvc.yaml`` stage depend on ``params.yaml``'s ``section`` (or a key of it)?"""
    for entry in stage.get("params", []):
        keys = entry.get("params.yaml", []) if isinstance(entry, dict) else [entry]
        if any(k == section or k.startswith(section + ".") for k in keys):
            return True
    return False


def declared_outputs(repo: Path):
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    for stage in spec["stages"].values():
        for section in ("outs", "metrics", "plots"):
            for o in stage.get(section, []):
                yield o if isinstance(o, str) else next(iter(o))


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """Stage -> output path -> md5 in ``dvc.lock``: results and figures (executed notebooks
    and metrics left out: they carry timestamps, timings and counts of work done)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {
        name: {
            o["path"]: o["md5"]
            for o in s.get("outs", [])
            if "notebooks" not in o["path"] and not o["path"].startswith("metrics/")
        }
        for name, s in lock.items()
    }


def processes_in(repo: Path) -> list[str]:
    """Command lines of the processes working in ``repo`` (their cwd, or ``repo`` in their
    command line), this one excepted."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(repo) in cmd or cwd == str(repo) or cwd.startswith(f"{repo}/"):
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


def wait_for_no_processes(repo: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while (left := processes_in(repo)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes outlived the kill:\n" + "\n".join(left)


def kill_retrain_half_way(repo: Path, env: dict) -> dict[Path, tuple[int, bytes]]:
    """Start `dvc repro retrain`, SIGKILL its whole process group once the first retrained
    model is saved; returns the models finished by then (mtime, bytes)."""
    models = repo / "outputs" / "retrain" / "models"
    proc = subprocess.Popen(
        [*DVC, "repro", "retrain"],
        cwd=repo,
        env=env,
        start_new_session=True,  # its own process group: dvc and the stage's runner
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(models.glob("*.pt")):
            assert proc.poll() is None, "dvc repro retrain exited before any model was saved"
            assert time.monotonic() < deadline, "no retrained model within 300 s"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # The notebook's kernel runs in a session of its own; it exits within a second of losing
    # its parent (and a training job it started exits with it: core.executors.exit_with_owner).
    wait_for_no_processes(repo)
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in models.glob("*.pt")}
    assert 1 <= len(finished) < 10, "the kill should land half-way through the retraining"
    return finished


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    repo = sandbox.prepare("smoke", tmp / "repo", repo=ROOT)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "DA_THREADS": "2",
        # shards and jobs in the stage's own process: a subprocess per small task costs more
        # than the task (the local executor's kills: tests/evaluation/test_retraining.py)
        "DA_EXECUTOR": "inline",
        "DA_SHARD_EXAMPLES": "120",
        "HOME": str(tmp),
        # the copy's own library, not the checkout's editable install: edits below must count
        "PYTHONPATH": str(repo / "lib"),
    }
    start = time.perf_counter()
    finished = kill_retrain_half_way(repo, env)
    run = subprocess.run([*DVC, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    print(f"\nsmoke dvc repro (with a killed first attempt): {seconds:.1f} s")
    return SimpleNamespace(tmp=tmp, repo=repo, env=env, finished=finished, seconds=seconds)


# ---- 1. the run -------------------------------------------------------------------------------


def test_killed_run_resumes_and_completes(smoke):
    repo = smoke.repo
    # the rerun kept every model finished before the kill and retrained none of them
    for path, (mtime, data) in smoke.finished.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path.name
    retrain = json.loads((repo / "metrics" / "retrain.json").read_text())
    # and one reference per seed, and the independent-seed models
    total = (retrain["num_subsets"] + 1) * retrain["num_seeds"] + retrain["independent_subsets"]
    assert retrain["models_trained_this_run"] == total - len(smoke.finished)
    assert len(list((repo / "outputs" / "retrain" / "models").glob("*.pt"))) == total
    for out in declared_outputs(repo):
        assert (repo / out).exists(), f"declared output missing: {out}"
    for name in stages.NAMES:
        nb = nbformat.read(repo / "reports" / "notebooks" / notebook(name), as_version=4)
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                assert o.get("output_type") != "error", (
                    f"{notebook(name)}: {o.get('ename')}: {o.get('evalue')}"
                )
    assert json.loads((repo / "metrics" / "train.json").read_text())["steps"] == 60
    # several training shards, as the environment asks
    assert len(list((repo / ".cache" / "influence").glob("*/scores_*.pt"))) == 3
    # TRAK, D-TRAK and DAS features, three shards each
    assert len(list((repo / ".cache" / "baselines").glob("*/features_*.pt"))) == 3 * 3
    again = dvc(smoke, "repro")
    assert "didn't change" in again.stdout and not ran(again.stdout), again.stdout
    # The pipeline's stages (data.dvc, the CIFAR-10 archive for paper scale, is absent offline).
    assert "up to date" in dvc(smoke, "status", "dvc.yaml").stdout


def test_editing_curvature_code_reruns_only_what_depends_on_it(smoke, tmp_path):
    """In a copy of the finished run, a code change in a curvature module (a new function, no
    comment) makes ``dvc status`` name exactly the stages whose derived dependencies list that
    module: ``curvature`` and what runs its code, none of the stages that run no K-FAC code."""
    repo = tmp_path / "repo"
    shutil.copytree(smoke.repo, repo)
    env = {**smoke.env, "PYTHONPATH": str(repo / "lib")}
    assert json.loads(dvc(smoke, "status", "--json", "dvc.yaml", env=env, cwd=repo).stdout) == {}
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    users = {
        dep: {name for name, s in spec.items() if dep in s["deps"]}
        for dep in spec["curvature"]["deps"]
        if dep.startswith("lib/diffusion_attribution/curvature/")
        and not dep.endswith("__init__.py")
    }
    edited = max(sorted(users), key=lambda dep: len(users[dep]))  # the most widely used one
    module = repo / edited
    module.write_text(
        module.read_text() + "\n\ndef edited_after_the_run() -> None:\n    return None\n"
    )
    status = json.loads(dvc(smoke, "status", "--json", "dvc.yaml", env=env, cwd=repo).stdout)
    named = {name.rsplit(":", 1)[-1] for name in status}
    assert named == users[edited], (edited, status)
    assert "curvature" in named
    assert not named & {"data", "train", "sample", "retrain", "measure"}, named
    print(f"\nediting {edited}: dvc status names {sorted(named)}")


# ---- 2. the report ------------------------------------------------------------------------------


def test_report_offline_in_chromium(smoke):
    why = browser.missing()
    if why:
        pytest.skip(f"headless Chromium unavailable: {why}")
    index = smoke.repo / "reports" / "index.html"
    text = index.read_text()
    for claim in json.loads((smoke.repo / "metrics" / "claims.json").read_text())["claims"]:
        assert html.escape(claim["evidence"]) in text
    driver = browser.browser()
    shot = smoke.tmp / "report.png"
    try:
        pages, seen, visits = [index], set(), []
        while pages:
            page = pages.pop()
            if page in seen:
                continue
            seen.add(page)
            visit = browser.visit(driver, page, screenshot=shot if page == index else None)
            visits.append(visit)
            for link in visit.links:
                target = browser.local_target(link)
                assert target is not None, f"{page.name} links off the machine: {link}"
                path, fragment = target
                assert path.is_file(), f"{page.name}: broken link {link}"
                if path == page.resolve():
                    assert not fragment or fragment in visit.ids, f"{page.name}: no #{fragment}"
                elif path.suffix == ".html":
                    pages.append(path)
    finally:
        driver.quit()
    assert len(visits) == 1 + len(stages.NAMES), [v.url for v in visits]
    images = 0
    for v in visits:
        assert not v.broken_images, f"{v.url}: images did not load: {v.broken_images}"
        leaving = [u for u in v.requests if not u.startswith(("file:", "data:"))]
        assert not leaving, f"{v.url} asked the network for {leaving}"
        images += v.images
    index_visit = visits[0]
    assert index_visit.images == sum(len(stages.module(n).FIGURES) for n in stages.NAMES)
    assert shot.stat().st_size > 50_000
    print(
        f"\nreport: {len(visits)} pages, {images} images, "
        f"{sum(len(v.links) for v in visits)} links, screenshot {shot}"
    )


# ---- 2b. the shipped bundle -----------------------------------------------------------------------


def test_a_finished_run_publishes_to_a_bundle_that_checks(smoke, tmp_path):
    """``results publish`` on the finished run: the bundle checks and is fresh, compares equal
    with the run, and under 60 MiB; a claim's number edited by hand, a figure removed, a stage's
    code edited and a parameter edited are each reported (the first two break the bundle, the
    last two make it stale, naming the stages)."""
    bundle = publish(smoke.repo, "smoke", tmp_path / "results")
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    report = results.check(bundle, smoke.repo)
    assert report.problems == [] and report.stale == [], report.problems + report.stale
    assert report.first_line.startswith("results/smoke: fresh")
    info = json.loads((bundle / "manifest.json").read_text())
    assert set(MANIFEST_KEYS) <= set(info) and info["cores"] >= 1
    assert set(info["stages"]) == set(stages.NAMES)  # every notebook stage
    assert all(r["longest"]["seconds"] > 0 for r in info["stages"].values())
    assert info["stages"]["train"]["longest"]["peak_rss_gib"] > 0  # recorded by the runner
    assert size < 60 * 2**20
    same = results.compare(bundle, smoke.repo)
    assert len(same) > 100 and (same.difference == 0).all()

    broken = Path(shutil.copytree(bundle, tmp_path / "broken" / "smoke"))
    claims_md = broken / "claims.md"
    text = claims_md.read_text()
    number = re.search(r"LDS (-?\d\.\d{3})", text).group(1)
    claims_md.write_text(text.replace(number, f"{float(number) + 0.1:.3f}", 1))
    (broken / "figures" / "fig02a_lds_loss.png").unlink()
    problems = " / ".join(results.check(broken, smoke.repo).problems)
    assert "differs from metrics/claims.json" in problems and "fig02a_lds_loss.png" in problems

    root = tmp_path / "checkout"  # a checkout of the same code, then edited
    for part in ("lib", "notebooks", "configs"):
        shutil.copytree(smoke.repo / part, root / part)
    shutil.copy2(smoke.repo / "dvc.yaml", root / "dvc.yaml")
    assert results.stale_stages(bundle, root) == []
    with (root / "lib/diffusion_attribution/pipeline/stages/claims.py").open("a") as f:
        f.write("\n# an edit\n")
    config = root / "configs" / "smoke.yaml"
    params = yaml.safe_load(config.read_text())
    params["counterfactual"]["seed"] += 1
    config.write_text(yaml.safe_dump(params, sort_keys=False))
    stale = results.stale_stages(bundle, root)
    assert "claims" in stale and "counterfactual" in stale and "train" not in stale, stale


# ---- 3. shared results ---------------------------------------------------------------------------


def test_results_shared_through_a_dvc_remote(smoke):
    """What the README's "Shared results" section says, run: push the run's outputs to a
    directory remote, pull them into a fresh clone, nothing to rerun; a clone that changes a
    parameter pulls only what it needs and reruns only what reads it."""
    repo, remote = smoke.repo, smoke.tmp / "remote"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=repo, env=smoke.env, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "smoke run"], cwd=repo, env=smoke.env, check=True)
    dvc(smoke, "remote", "modify", "--local", "shared", "url", str(remote))
    dvc(smoke, "push", "dvc.yaml")

    clone = smoke.tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    dvc(smoke, "remote", "modify", "--local", "shared", "url", str(remote), cwd=clone)
    plain = dvc(smoke, "pull", cwd=clone, check=False)  # data.dvc's archive is not pushed
    assert plain.returncode != 0 and "cifar-10-binary.tar.gz" in plain.stdout + plain.stderr
    dvc(smoke, "pull", "dvc.yaml", cwd=clone)
    assert "up to date" in dvc(smoke, "status", "dvc.yaml", cwd=clone).stdout
    nothing = dvc(smoke, "repro", cwd=clone)
    assert not ran(nothing.stdout), nothing.stdout
    for model in (repo / "outputs" / "retrain" / "models").glob("*.pt"):
        assert (clone / "outputs" / "retrain" / "models" / model.name).read_bytes() == (
            model.read_bytes()
        )

    # another clone edits a parameter only the data and evaluation stages read, and reruns
    # with what it needs pulled: nothing expensive runs
    edit = smoke.tmp / "edit"
    subprocess.run(["git", "clone", "-q", str(repo), str(edit)], check=True)
    dvc(smoke, "remote", "modify", "--local", "shared", "url", str(remote), cwd=edit)
    params = yaml.safe_load((edit / "params.yaml").read_text())
    params["data"]["cifar2_size"] = 4000  # the digits run does not use it
    (edit / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(smoke, "repro", "--pull", "--allow-missing", cwd=edit)
    expensive = {"train", "curvature", "influence", "baselines", "retrain", "measure"}
    assert "data" in ran(rerun.stdout) and not ran(rerun.stdout) & expensive, rerun.stdout
    assert "counterfactual" not in ran(rerun.stdout), rerun.stdout
    print(f"\nshared results: --pull --allow-missing reran {sorted(ran(rerun.stdout))}")


# ---- 4. kills at random moments --------------------------------------------------------------


@dataclass(frozen=True)
class Resumable:
    """What a stage resumes from: ``wipe`` (removed so the stage has its work to redo) and
    ``units`` (globs of the files of finished work)."""

    wipe: tuple[str, ...]
    units: tuple[str, ...]


#: The long stages, in the order they are killed: each one's inputs come from stages not yet
#: killed.
KILLED = {
    "counterfactual": Resumable(
        ("outputs/counterfactual",),
        ("outputs/counterfactual/models/*.pt", "outputs/counterfactual/cache/*.pt"),
    ),
    "measure": Resumable(("outputs/measure/cache",), ("outputs/measure/cache/*.pt",)),
    "retrain": Resumable(("outputs/retrain/models",), ("outputs/retrain/models/*.pt",)),
    "baselines": Resumable((".cache/baselines",), (".cache/baselines/*/features_*.pt",)),
    "influence": Resumable((".cache/influence",), (".cache/influence/*/*.pt",)),
}
SEED = 14


def stage_seconds(repo: Path, name: str) -> float:
    meta = nbformat.read(repo / "reports" / "notebooks" / notebook(name), as_version=4).metadata
    return float(meta["papermill"]["duration"])


def units(repo: Path, plan: Resumable) -> dict[Path, tuple[int, bytes]]:
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for pattern in plan.units
        for p in repo.glob(pattern)
        if not p.name.startswith(".")
    }


def check_no_half_written_file(repo: Path, name: str) -> int:
    """Every file the stage resumes from or outputs is complete (a torch file passes
    :func:`diffusion_attribution.core.io.verify`, JSON parses); returns the number of partial
    writes (``.<name>.<random>.tmp``, never read, removed when the stage runs again)."""
    folders = [repo / o for o in stages.module(name).OUTS] + [repo / ".cache" / name]
    partial = 0
    for folder in folders:
        for p in folder.rglob("*") if folder.is_dir() else []:
            if not p.is_file():
                continue
            if p.match(io.PARTIAL):
                partial += 1
            elif p.suffix == ".pt":
                io.verify(p, f"{name} output")
            elif p.suffix == ".json":
                json.loads(p.read_text())
    return partial


def kill_at(
    repo: Path, env: dict, name: str, sig: int, after_s: float, log: Path, plan=None
) -> bool:
    """Run ``dvc repro -s -f NAME`` and send ``sig`` to its process group ``after_s`` seconds
    after DVC starts the stage's command (it says "Running stage") or, with ``plan`` (a
    :class:`Resumable`), after the stage's first unit of work is finished; wait for every
    process of the run to end. Returns whether the stage was still running when the signal
    came (else it had finished first)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*DVC, "repro", "-s", "-f", name],
            cwd=repo,
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while f"Running stage '{name}'" not in log.read_text():
        assert proc.poll() is None, f"dvc repro {name} ended before the stage started"
        assert time.monotonic() < deadline, f"dvc did not start {name} within 120 s"
        time.sleep(0.05)
    while plan is not None and not units(repo, plan):
        assert proc.poll() is None, f"dvc repro {name} ended before finishing a unit of work"
        assert time.monotonic() < deadline, f"{name} finished no unit of work within 120 s"
        time.sleep(0.02)
    try:
        proc.wait(timeout=after_s)
        return False
    except subprocess.TimeoutExpired:
        pass
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        pytest.fail(f"dvc repro {name} did not end within 60 s of signal {sig}")
    wait_for_no_processes(repo)
    return True


def test_kills_at_random_moments_lose_nothing(smoke):
    repo, env = smoke.repo, smoke.env
    first = lock_outs(repo)
    rng = random.Random(SEED)
    kept: dict[str, dict[Path, tuple[int, bytes]]] = {}
    hits: dict[str, list[bool]] = {}
    report = []
    for name, plan in KILLED.items():
        expected = stage_seconds(repo, name)
        for target in plan.wipe:
            shutil.rmtree(repo / target, ignore_errors=True)
        landed, partial = [], 0
        # SIGTERM once the stage has finished a first unit of work, 0-30% of its time later;
        # SIGKILL at 10-90% of its time into the resumed run (start-up included)
        for sig, (lo, hi), after_unit in (
            (signal.SIGTERM, (0.0, 0.3), True),
            (signal.SIGKILL, (0.1, 0.9), False),
        ):
            after = rng.uniform(lo, hi) * expected
            log = smoke.tmp / f"kill-{name}.log"
            hit = kill_at(repo, env, name, sig, after, log, plan if after_unit else None)
            landed.append((signal.Signals(sig).name, round(after, 1), hit))
            partial += check_no_half_written_file(repo, name)
        kept[name] = units(repo, plan)
        report.append(
            f"{name}: {landed} (signal, seconds after the start or first unit, before the end?), "
            f"{len(kept[name])} finished units kept, {partial} partial writes left"
        )
        hits[name] = [hit for _, _, hit in landed]
    print("\nkills:\n" + "\n".join(report))
    # the first signal comes while the stage runs, with some of its work finished
    assert all(h[0] for h in hits.values()), hits
    assert all(kept.values()), {n: len(k) for n, k in kept.items()}

    # In between, an unrelated parameter is edited (the digits run does not read it), and a
    # comment is added to the diffusion code: DVC hashes bytes, so every stage that runs that
    # code reruns (the killed ones among them), but results are named by the code with
    # comments and docstrings stripped, so nothing finished is recomputed or moved aside.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["cifar2_size"] = 4000
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ddpm = repo / "lib" / "diffusion_attribution" / "diffusion" / "ddpm.py"
    ddpm.write_text(ddpm.read_text() + "\n# a comment changes no result\n")
    run = dvc(smoke, "repro")
    print(f"then dvc repro reran {len(ran(run.stdout))} stages")
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    edited = "lib/diffusion_attribution/diffusion/ddpm.py"
    needs = {n for n, st in spec.items() if edited in st.get("deps", []) or reads(st, "data")}
    assert set(KILLED) <= needs, needs
    assert needs <= ran(run.stdout), run.stdout
    assert not (repo / ".cache" / "stale").exists()

    # nothing finished before a kill was recomputed
    for name, finished in kept.items():
        for path, (mtime, data) in finished.items():
            assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, (name, path)
    retrain = json.loads((repo / "metrics" / "retrain.json").read_text())
    total = (retrain["num_subsets"] + 1) * retrain["num_seeds"] + retrain["independent_subsets"]
    assert retrain["models_trained_this_run"] == total - len(kept["retrain"])
    measured = json.loads((repo / "metrics" / "measure.json").read_text())
    kept_measured = [p for p in kept["measure"] if p.name != "full.pt"]
    assert measured["models_measured_this_run"] <= total - len(kept_measured)
    cf = json.loads((repo / "metrics" / "counterfactual.json").read_text())
    cf_models = [p for p in kept["counterfactual"] if p.parent.name == "models"]
    cf_total = len(list((repo / "outputs" / "counterfactual" / "models").glob("*.pt")))
    assert cf["models_trained_this_run"] == cf_total - len(cf_models)
    # no partial write is left, and no process
    left = [p for p in (repo / "outputs").rglob(io.PARTIAL)]
    left += [p for n in KILLED for p in (repo / ".cache" / n).rglob(io.PARTIAL)]
    assert not left, left
    assert not processes_in(repo)
    # determinism: every stage's outputs are bitwise the first run's -- the killed stages'
    # redone from empty caches, the others (the full model retrained, the samples drawn
    # again, the LDS tables) recomputed; only the report carries the time it was built
    after = lock_outs(repo)
    for name in [*stages.NAMES, "validate"]:
        assert after[name] == first[name], f"{name}: outputs differ from the first run's"
    assert after["report"] != first["report"]
    assert "up to date" in dvc(smoke, "status", "dvc.yaml").stdout


# ---- 5. a recipe change ------------------------------------------------------------


def test_an_experiment_with_another_recipe(smoke):
    """An experiment with another recipe retrains, keeps the old models aside, and `dvc exp
    show` lists the metrics of both runs (they are tracked, not git-ignored copies)."""
    repo = smoke.repo
    models_before = sorted(p.name for p in (repo / "outputs" / "retrain" / "models").glob("*.pt"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=repo, env=smoke.env, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "smoke"], cwd=repo, env=smoke.env, check=True)
    steps = yaml.safe_load((repo / "params.yaml").read_text())["retrain"]["steps"]
    dvc(
        smoke, "exp", "run", "-S", f"retrain.steps={steps + 10}", "-S",
        "retrain.epoch_matched=false", "-n", "longer",
    )  # fmt: skip
    stale = list((repo / ".cache" / "stale" / "retrain").rglob("*.pt"))
    assert sorted(p.name for p in stale) == models_before, "the old models were not kept aside"
    retrain = json.loads((repo / "metrics" / "retrain.json").read_text())
    assert retrain["models_trained_this_run"] == len(models_before)
    shown = json.loads(dvc(smoke, "exp", "show", "--json").stdout)
    steps_seen = set()
    for rev in shown:
        runs = [rev, *[e for x in rev.get("experiments") or [] for e in x.get("revs", [])]]
        for r in runs:
            data = r.get("data") or {}
            head = data.get("metrics", {}).get("metrics/headline.json", {}).get("data", {})
            if head:
                steps_seen.add(data["params"]["params.yaml"]["data"]["retrain"]["steps"])
    assert {steps, steps + 10} <= steps_seen, str(shown)[:2000]
