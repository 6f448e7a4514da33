"""The shipped bundle of one finished run: what a reader gets in ``results/<profile>/`` without
running anything.

Layout (every file is written by :func:`publish` from a finished run, never by hand)::

    results/<profile>/
      README.md           what is here, the commit that produced it, how to check and compare
      manifest.json       commit, hashes of params.yaml and dvc.lock, packages (pip freeze),
                          CPU model and cores, each stage's wall time and peak memory
      params.yaml         the parameters the run used (the profile's)
      dvc.lock            the run's lock: the code and parameters each stage ran with
      claims.md           the claims table
      report.html         the offline HTML report (links figures/ and notebooks_html/)
      notebooks/          every executed notebook (.ipynb, outputs kept)
      notebooks_html/     the same notebooks rendered to HTML
      figures/            every figure (PNG)
      metrics/            every stage's metrics (JSON)
      ground_truth.npz    subset masks, every model's measurements of every query, the queries
                          and the training images (fields: :data:`GROUND_TRUTH_FIELDS`)
      scores.npz          the score matrix of each method's headline variant (Figs. 2a, 2b)
      scores.json         for each of them: its ScoreKey, target, sign and the run's LDS

The ground truth is plain NumPy: ``np.load("ground_truth.npz")`` needs no code of this
library, and a new method is scored against it with the recipe of the bundle's README
(:data:`LDS_RECIPE`, executed by a test). Freshness, the claims' numbers and the comparison of
a rerun are :mod:`diffusion_attribution.pipeline.results`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from diffusion_attribution.attribution.scores import KEY_FIELDS, ScoreKey, ScoreSet
from diffusion_attribution.core.config import load_config
from diffusion_attribution.core.io import atomic_write_text
from diffusion_attribution.core.sections import main_variant
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.pipeline.comparisons import BAR_TARGETS, Methods
from diffusion_attribution.pipeline.runner import STAGE_RECORDS, stage_runs
from diffusion_attribution.pipeline.sandbox import SOURCE
from diffusion_attribution.pipeline.workspace import Workspace

__all__ = [
    "GROUND_TRUTH_FIELDS",
    "LDS_RECIPE",
    "MANIFEST_KEYS",
    "file_md5",
    "headline_scores",
    "manifest",
    "publish",
]

#: The fields of ``ground_truth.npz``; ``<m>`` is a measurement name (``loss``, ``elbo``,
#: ``trajectory``, ``l_t=<t>``).
GROUND_TRUTH_FIELDS = {
    "masks": "(M, N) bool: True where training example j is in random subset i (eq. 13)",
    "queries": "(Q, C, H, W) float32: the generated samples attributed, in [-1, 1]",
    "train_images": "(N, C, H, W) float32: the training set, in [-1, 1], in score-column order",
    "subsets.<m>": "(Q, M, K) float64: m of each query on the model of subset i, seed k",
    "independent.<m>": "(Q, S) float64: m on models of the full set with S other seeds",
    "reference.<m>": "(Q, K) float64: m on models of the full set with the K subset seeds",
    "full.<m>": "(Q,) float64: m on the full model (the one attributed)",
    "num_draws.<m>": "() int64: (t, eps) draws per measurement",
}

#: How to score a new method against the shipped ground truth with NumPy and SciPy alone; the
#: bundle's README shows it and ``tests/pipeline/test_bundle.py`` executes it.
LDS_RECIPE = """\
import numpy as np
from scipy.stats import spearmanr

gt = np.load("ground_truth.npz")
masks, measured = gt["masks"], gt["subsets.loss"].mean(-1)  # (M, N), (Q, M): K-seed mean
scores = my_scores  # (Q, N): score[q, j] ~ change of the query's loss when example j is removed
predicted = scores @ (~masks).T.astype(float)  # (Q, M): summed over the examples left out
lds = np.mean([spearmanr(p, m).statistic for p, m in zip(predicted, measured)])
"""

#: What the commit of a run stands for: its code and parameters (``dirty`` when they differ).
CODE_PATHS = ("lib", "notebooks", "params.yaml", "configs", "dvc.yaml", "pyproject.toml")

#: What every manifest holds (:func:`manifest`).
MANIFEST_KEYS = (
    "profile", "commit", "dirty", "params_sha256", "dvc_lock_sha256", "packages", "cpu",
    "cores", "platform", "python", "stages", "total_seconds",
)  # fmt: skip


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes, as DVC records a file dependency in ``dvc.lock``."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git(run: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=run, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _stage_records(run: Path, stages: list[str]) -> dict[str, dict]:
    """Each notebook stage's last run and its longest run in this checkout with the run's
    parameters (wall time, peak memory, when it finished), from ``reports/stages/`` (the
    runner's records; a record without a parameters hash, from before they had one, counts);
    a stage without a record has its executed notebook's papermill duration (memory not
    recorded). The longest run is what computing the stage cost: a rerun may find its work
    cached."""
    params = _sha256(run / "params.yaml")
    out = {}
    for name in stages:
        runs = [
            r
            for r in stage_runs(run / STAGE_RECORDS / f"{name}.json")
            if r.get("params_sha256", params) == params
        ]
        if not runs:
            nb = next((run / "reports" / "notebooks").glob(f"*_{name}.ipynb"), None)
            if nb is None:
                continue  # not a notebook stage (validate, report)
            meta = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {})
            seconds = meta.get("duration")
            runs = [
                {
                    "seconds": round(float(seconds), 1) if seconds is not None else None,
                    "peak_rss_gib": None,
                    "finished": meta.get("end_time"),
                }
            ]
        keys = ("seconds", "peak_rss_gib", "finished")
        longest = max(runs, key=lambda r: r.get("seconds") or 0)
        out[name] = {
            **{k: runs[-1].get(k) for k in keys},
            "longest": {k: longest.get(k) for k in keys},
            "runs": len(runs),
        }
    return out


def manifest(run: Path, profile: str) -> dict:
    """Where a run came from and what it cost (:data:`MANIFEST_KEYS`). ``commit`` / ``dirty``:
    the run's checkout when it is published (a sandbox copy: the commit it was copied from);
    ``packages``, ``cpu``, ``cores`` and ``platform``: the machine and environment that
    publish it, which are the run's when it is published where it ran (as ``results/`` is)."""
    stages = list(yaml.safe_load((run / "dvc.lock").read_text()).get("stages", {}))
    records = _stage_records(run, stages)
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    source = run / SOURCE  # a sandbox copy: the commit it was copied from
    if source.exists():
        origin = json.loads(source.read_text())
        commit, dirty = origin["commit"], bool(origin["dirty"])
    else:
        commit = _git(run, "rev-parse", "HEAD")
        # the code or parameters differ from the commit (tracked or not; dvc.lock is the run's)
        dirty = bool(_git(run, "status", "--porcelain", "--", *CODE_PATHS))
    return {
        "profile": profile,
        "commit": commit,
        "dirty": dirty,
        "params_sha256": _sha256(run / "params.yaml"),
        "dvc_lock_sha256": _sha256(run / "dvc.lock"),
        "packages": freeze,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "stages": records,
        # what computing every stage cost: the sum of each stage's longest run
        "total_seconds": round(sum(r["longest"]["seconds"] or 0 for r in records.values()), 1),
    }


def headline_scores(run: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The score matrix of every bar of Figs. 2a / 2b (each method's headline variant) with
    its key, target, sign and LDS as the run's ``evaluate`` stage computed them."""
    config = load_config(run / "params.yaml")
    table = pd.read_csv(run / Workspace.LDS_TABLE)
    per_query = torch.load(run / "outputs/evaluate/lds_per_query.pt", weights_only=True)
    meth = Methods(
        table,
        per_query["per_query"],
        main_variant(config.curvature.variants),
        config.influence.damping,
        config.influence.compression,
    )
    sets = ScoreSet.load(run / Workspace.INFLUENCE_SCORES) | ScoreSet.load(
        run / Workspace.BASELINE_SCORES
    )
    arrays, index = {}, {}
    for target in BAR_TARGETS:
        for group, label, row in meth.bars(target):
            key = ScoreKey(**{f: row[f] for f in KEY_FIELDS})
            name = key.label
            arrays.setdefault(name, sets[key].numpy().astype(np.float32))
            entry = index.setdefault(name, {"key": {f: getattr(key, f) for f in KEY_FIELDS}})
            entry.setdefault("lds", {})[target] = {
                "label": label,
                "group": group,
                "sign": int(row["sign"]),
                "lds": float(row["lds"]),
                "stderr": float(row["stderr"]),
            }
    return arrays, index


def _ground_truth(run: Path) -> dict[str, np.ndarray]:
    gt = torch.load(run / Workspace.GROUND_TRUTH, weights_only=True)
    samples = torch.load(run / Workspace.SAMPLES, weights_only=True)
    out = {
        "masks": gt["masks"].numpy(),
        "queries": samples["images"].float().numpy(),
        "train_images": ImageDataset.load(run / Workspace.TRAIN_SET).images.float().numpy(),
    }
    for part in ("subsets", "independent", "reference", "full"):
        for m, values in (gt.get(part) or {}).items():
            out[f"{part}.{m}"] = values.double().numpy()
    for m, n in gt.get("num_draws", {}).items():
        out[f"num_draws.{m}"] = np.asarray(n, dtype=np.int64)
    return out


def _copy_tree(src: Path, dest: Path, pattern: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob(pattern)):
        shutil.copy2(f, dest / f.name)


#: The damping figures under the paper's numbers on a 10-class dataset (its Figs. 9, 10 are
#: Figs. 7, 8 on CIFAR-10); the ``evaluate`` stage titles them so.
TEN_CLASS_FIGURES = {
    "fig07_damping_kfac.png": "fig09_damping_kfac.png",
    "fig08_damping_trak.png": "fig10_damping_trak.png",
}


def paper_numbered_figures(run: Path) -> list[tuple[str, str]]:
    """(figure, its name under the paper's numbering) for the figures a bundle of ``run`` also
    holds under the paper's name: Figs. 9 and 10 when ``run``'s dataset has 10 classes."""
    params = yaml.safe_load((run / "params.yaml").read_text()) or {}
    dataset = (params.get("data") or {}).get("dataset", "")
    if dataset not in ("digits10", "cifar10"):
        return []
    figures = run / "reports" / "figures"
    return [(a, b) for a, b in TEN_CLASS_FIGURES.items() if (figures / a).is_file()]


def publish(run: str | Path, profile: str, dest: str | Path = "results") -> Path:
    """Copy a finished run (a checkout where ``dvc repro`` finished: ``reports/``,
    ``metrics/``, ``outputs/``, ``dvc.lock``) into ``dest/<profile>/``, replacing what was
    there. Returns the bundle's folder."""
    run = Path(run).resolve()
    missing = [
        p
        for p in ("dvc.lock", "params.yaml", "reports/claims.md", "reports/index.html",
                  Workspace.LDS_TABLE, Workspace.GROUND_TRUTH)
        if not (run / p).exists()
    ]  # fmt: skip
    if missing:
        raise FileNotFoundError(f"{run} is not a finished run: missing {', '.join(missing)}")
    bundle = Path(dest).resolve() / profile
    staging = bundle.with_name(f".{profile}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("params.yaml", "dvc.lock"):
        shutil.copy2(run / name, staging / name)
    shutil.copy2(run / "reports/claims.md", staging / "claims.md")
    shutil.copy2(run / "reports/index.html", staging / "report.html")
    _copy_tree(run / "reports/notebooks", staging / "notebooks", "*.ipynb")
    _copy_tree(run / "reports/notebooks_html", staging / "notebooks_html", "*.html")
    _copy_tree(run / "reports/figures", staging / "figures", "*.png")
    for src, name in paper_numbered_figures(run):
        shutil.copy2(staging / "figures" / src, staging / "figures" / name)
    _copy_tree(run / "metrics", staging / "metrics", "*.json")
    np.savez_compressed(staging / "ground_truth.npz", **_ground_truth(run))
    arrays, index = headline_scores(run)
    np.savez_compressed(staging / "scores.npz", **arrays)
    atomic_write_text(json.dumps(index, indent=1) + "\n", staging / "scores.json")
    info = manifest(run, profile)
    atomic_write_text(json.dumps(info, indent=1) + "\n", staging / "manifest.json")
    atomic_write_text(_readme(info, index), staging / "README.md")
    old = bundle.with_name(f".{profile}.old")  # the old bundle is moved aside, then deleted:
    shutil.rmtree(old, ignore_errors=True)  # at every moment one complete bundle is in place
    if bundle.exists():
        bundle.rename(old)
    staging.rename(bundle)
    shutil.rmtree(old, ignore_errors=True)
    return bundle


def _readme(info: dict, index: dict) -> str:
    def gib(value):
        return value if value is not None else "not recorded"

    stages = "\n".join(
        f"| {name} | {r['longest']['seconds']} | {gib(r['longest']['peak_rss_gib'])} | "
        f"{r['seconds']} | {r['runs']} |"
        for name, r in info["stages"].items()
    )
    fields = "\n".join(f"| `{k}` | {v} |" for k, v in GROUND_TRUTH_FIELDS.items())
    methods = "\n".join(
        f"| `{name}` | "
        + "; ".join(
            f"{t}: {v['label']} {v['lds']:.3f} ± {v['stderr']:.3f}" for t, v in e["lds"].items()
        )
        + " |"
        for name, e in index.items()
    )
    return f"""# Results of the `{info["profile"]}` profile

Written by `python -m diffusion_attribution.pipeline.results publish --profile {info["profile"]}`
from a finished `dvc repro` of commit `{info["commit"]}` on {info["cores"]} cores of
{info["cpu"]}. Whether the code and parameters of main still match is what
`python -m diffusion_attribution.pipeline.results check` says (its first line per bundle).

Read: [`report.html`](report.html) (offline), [`claims.md`](claims.md), the executed
notebooks in [`notebooks/`](notebooks/), the figures in [`figures/`](figures/) and the metrics
in [`metrics/`](metrics/).

## Stages (wall time in s, peak resident memory in GiB)

Each stage's longest run in the run's checkout (what computing it cost) and its last run (a
rerun after a code edit may find its work cached). Peak memory is that of the stage's largest
single process (the notebook's kernel or one worker), not the sum over workers running at
once: where a stage runs two retraining workers side by side, the machine held up to about
twice it.

| stage | seconds | peak memory | last run (s) | runs recorded |
|---|---|---|---|---|
{stages}

Total {info["total_seconds"]} s (the longest runs). Numbers are this machine's; another CPU computes other float32
bits (`results compare` shows by how much).

## Ground truth (`ground_truth.npz`, NumPy only)

| field | meaning |
|---|---|
{fields}

Score a new method against it, without retraining anything:

```python
{LDS_RECIPE}```

A score matrix follows the convention of the library: `score[q, j]` predicts the change of
the query's measurement when training example j is removed (positive: removing it raises the
loss). For a likelihood target (`elbo`, `trajectory`) a loss-like score enters with a minus sign.

## Shipped score matrices (`scores.npz`, float32, with `scores.json`)

| matrix | LDS in this run (target: bar, mean ± standard error over queries) |
|---|---|
{methods}
"""
