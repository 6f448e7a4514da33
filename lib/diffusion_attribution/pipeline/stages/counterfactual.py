"""Stage ``counterfactual``: retraining without the top influences (Fig. 3, App. G.6).

For the first ``counterfactual.num_queries`` samples, the fraction of the training set that
a method scores highest for the sample's loss (by the convention: the examples whose removal is
predicted to *increase* the loss most) is removed and a model retrained "using the same
procedure as training on the full dataset (with the same number of training steps)": the
``train`` settings, steps and seed. The change in the sample's loss is taken against the full
model itself, which shares that seed, so training and measurement use common random numbers.
``random`` removal is the control: one random set per fraction, removed for all samples at
once (the paper has no control; one model per fraction keeps its cost small). TRAK and D-TRAK
use their best damping on the loss LDS (``evaluate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import KNeighborsClassifier

from diffusion_attribution.attribution.scores import ScoreSet, select
from diffusion_attribution.core.config import Config
from diffusion_attribution.core.identity import file_digest
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.evaluation import retraining_claims
from diffusion_attribution.evaluation.ground_truth import measure_models
from diffusion_attribution.evaluation.lds import (
    class_share,
    random_removal_sets,
    retraining_scores,
    same_class_share,
    top_removal_sets,
)
from diffusion_attribution.evaluation.retraining import (
    RetrainJob,
    make_job,
    prune,
    run_jobs,
    stack_jobs,
)
from diffusion_attribution.pipeline.attributed import retraining_recipe, sample_labels
from diffusion_attribution.pipeline.figures import class_influences
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "10_counterfactual.ipynb"
INPUTS = (
    "outputs/data",
    "outputs/train",
    "outputs/sample",
    "outputs/influence",
    "outputs/baselines",
    "outputs/evaluate",
    "outputs/measure",
)
OUTS = ("outputs/counterfactual",)
PERSIST = ("outputs/counterfactual",)
FIGURES = ("fig03_counterfactual.png", "class_influences.png")
METRICS = ("metrics/counterfactual.json",)

LABELS = {
    "kfac": "K-FAC influence",
    "trak": "TRAK*",
    "d-trak": "D-TRAK*",
    "das": "DAS*",
    "journey-trak": "Journey-TRAK*",
    "feature_cos": "U-Net feature cosine",
    "random": "random (control)",
    "retraining": "exact retraining (LDS subsets)",
}


def chosen_keys(table: pd.DataFrame, kfac_damping: float, compression: str) -> dict[str, dict]:
    """The score matrix each method removes by: K-FAC influence as configured, TRAK / D-TRAK /
    DAS / Journey-TRAK at their best damping on the loss LDS (App. G.3.1), the feature cosine as it is.
    Values are :class:`ScoreKey` fields."""
    out = {
        "kfac": dict(
            method="kfac",
            curvature="mc_expand",
            measurement="loss",
            damping=kfac_damping,
            compression=compression,
        )
    }
    for name, method, measurement in (
        ("trak", "trak", "loss"),
        ("d-trak", "d-trak", "square_norm"),
        ("das", "das", "output_mean"),
        ("journey-trak", "trak", "journey"),
    ):
        query = dict(method=method, measurement=measurement, precision="float32")
        row = select(table, "loss", **query)
        if row is not None:  # DAS and Journey-TRAK only where the run scored them
            out[name] = {**query, "damping": float(row.damping)}
    if select(table, "loss", method="feature_cos") is not None:
        out["feature_cos"] = dict(method="feature_cos", measurement="none")
    return out


def margins_over_baselines(changes: pd.DataFrame) -> pd.Series:
    """Per sample: K-FAC's change minus the better of TRAK / D-TRAK's, averaged over the
    removed fractions (the samples, not the (sample, fraction) pairs, are independent)."""
    wide = changes.pivot_table(index=["fraction", "sample"], columns="method", values="change")
    baselines = [m for m in ("trak", "d-trak") if m in wide]
    return (wide["kfac"] - wide[baselines].max(axis=1)).groupby(level="sample").mean()


def sample_classes(samples: dict, ds: ImageDataset) -> tuple[torch.Tensor, str]:
    """Each generated sample's class and what it is: the class a class-conditional model
    generated it for, else the class of its 5 nearest training images in pixel space."""
    labels = sample_labels(samples)
    if labels is not None:
        return labels, "the class it was generated for"
    knn = KNeighborsClassifier(n_neighbors=5).fit(ds.images.flatten(1).numpy(), ds.labels.numpy())
    predicted = knn.predict(samples["images"].flatten(1).numpy())
    return torch.as_tensor(predicted, dtype=torch.int64), "its 5-NN class in pixel space"


def class_agreement(
    scores: dict[str, torch.Tensor],
    classes: torch.Tensor,
    train_labels: torch.Tensor,
    fractions: tuple[float, ...],
) -> tuple[pd.DataFrame, float]:
    """Per method (``scores``: method -> (Q, N)) and fraction: the mean (and standard error
    over samples) share of a sample's top influences in its class ``classes`` (Q,)
    (:func:`~diffusion_attribution.evaluation.lds.same_class_share`); and the chance level,
    the training set's mean share of a sample's class."""
    rows = []
    for method, s in scores.items():
        for frac in fractions:
            share = same_class_share(s, classes, train_labels, frac)
            se = float(share.std() / len(share) ** 0.5) if len(share) > 1 else float("nan")
            rows.append(
                {"method": method, "fraction": frac, "mean": float(share.mean()), "stderr": se}
            )
    return pd.DataFrame(rows), float(class_share(classes, train_labels).mean())


def removal_jobs(
    job: Callable[[str, list[int]], RetrainJob],
    chosen: dict,
    methods: tuple[str, ...],
    fractions: tuple[float, ...],
    seed: int,
    num_train: int,
    num_queries: int,
) -> tuple[dict[str, RetrainJob], dict[str, tuple[str, torch.Tensor]]]:
    """The retraining jobs (``job(name, kept ids)``) of every (method, fraction, sample) and
    what each removes: ``"<method>_remove<fraction>_sample<q>"`` -> (job name, removed ids).
    ``random`` removal has one set per fraction (seed ``seed``), one job for every sample."""
    N, Qc = num_train, num_queries
    jobs = {}
    removed = {}
    for method in methods:
        for frac in fractions:
            if method == "random":  # one random set per fraction, the control for every sample
                sets = random_removal_sets(N, frac, 1, seed=seed).expand(Qc, -1)
            else:
                sets = top_removal_sets(chosen[method][1][:Qc], frac)
            for q in range(Qc):
                name = f"{method}_remove{frac:g}_sample{q}"
                job_name = f"random_remove{frac:g}" if method == "random" else name
                removed[name] = (job_name, sets[q])
                if job_name not in jobs:
                    keep = sorted(set(range(N)) - set(sets[q].tolist()))
                    jobs[job_name] = job(job_name, keep)
    return jobs, removed


def changes(removed: dict, values: dict, ref: torch.Tensor) -> pd.DataFrame:
    """Per (method, fraction, sample): the change of the sample's loss against the full
    model's ``ref``, absolute and relative."""
    rows = []
    for name, (job_name, _) in removed.items():
        method, frac, q = name.rsplit("_", 2)  # a method name may hold "_"
        q = int(q.removeprefix("sample"))
        change = float(values[job_name]["loss"][q] - ref[q])
        rows.append(
            {
                "method": method,
                "fraction": float(frac.removeprefix("remove")),
                "sample": q,
                "change": change,
                "relative": change / float(ref[q]),
            }
        )
    return pd.DataFrame(rows)


def _job_maker(sections: tuple, ws: Workspace, data_path, out_dir):
    """``job(name, keep)``: a model trained as the full model on the examples ``keep``; and
    what trains it (LoRA: only the fine-tuning is re-run, from the shared base). ``sections``:
    ``model``, ``diffusion``, ``train``, ``finetune`` and ``conditional``."""
    model_cfg, diffusion, tcfg, finetune, cond = sections
    digest = file_digest(data_path)
    recipe, runner = retraining_recipe(finetune, cond, ws)

    def job(name, keep):
        return make_job(
            name, data_path, keep, tcfg.seed, model_cfg, diffusion, tcfg, out_dir, digest,
            **recipe,
        )  # fmt: skip

    return job, runner


def run(config: Config, ws: Workspace) -> StageResult:
    """Train the removal models and the reference (resumable), measure their loss on the samples."""
    cfcfg, mscfg = config.counterfactual, config.measure
    data_path = ws.path(ws.TRAIN_SET)
    ds, samples = ImageDataset.load(data_path), torch.load(ws.path(ws.SAMPLES), weights_only=True)
    N, Qc = len(ds), cfcfg.num_queries
    queries, labels = samples["images"][:Qc], sample_labels(samples, slice(0, Qc))
    scores = ScoreSet.load(ws.path(ws.INFLUENCE_SCORES))
    scores |= ScoreSet.load(ws.path(ws.BASELINE_SCORES))
    chosen = {
        m: scores.one(**q)
        for m, q in chosen_keys(
            pd.read_csv(ws.path(ws.LDS_TABLE)),
            config.influence.damping,
            config.influence.compression,
        ).items()
    }
    tcfg = config.train  # the full model's procedure, steps and seed (App. G.6)
    out_dir = ws.folder("outputs/counterfactual/models")
    sections = (config.model, config.diffusion, tcfg, config.finetune, config.conditional)
    job, runner = _job_maker(sections, ws, data_path, out_dir)
    jobs, removed = removal_jobs(
        job, chosen, cfcfg.methods, cfcfg.fractions, cfcfg.seed, num_train=N, num_queries=Qc
    )
    # trained in stacks of retrain.stack_size (part of each model's name); the same order
    jobs = dict(zip(jobs, stack_jobs(list(jobs.values()), config.retrain.stack_size), strict=False))
    prune(out_dir, list(jobs.values()), stale_dir=ws.stale_dir("counterfactual"))
    existing = {j.output for j in jobs.values() if Path(j.output).exists()}
    print(
        f"{len(jobs)} models (for each of {len(cfcfg.fractions)} fractions: {len(cfcfg.methods)} methods x {Qc} samples, "
        "one random set for all samples), "
        f"{tcfg.steps} steps and seed {tcfg.seed} each, as the full model; damping: "
        + ", ".join(f"{m} {key.damping:.3g}" for m, (key, _) in chosen.items())
    )
    start = time.perf_counter()
    folder = str(ws.folder(".cache/submitit/counterfactual"))
    run_jobs(list(jobs.values()), folder=folder, runner=runner)
    train_seconds = time.perf_counter() - start
    models = {"full": ws.path(ws.MODEL), **{name: j.output for name, j in jobs.items()}}
    loss = {"loss": DiffusionLoss(schedule_of(config.diffusion))}
    cache = ws.folder("outputs/counterfactual/cache")
    what = (models, loss, queries, {"loss": mscfg.draws}, mscfg.seed, cache)
    values = measure_models(
        *what,
        batch_size=mscfg.batch_size,
        workers=ws.threads,
        prune=True,
        stale_dir=ws.stale_dir("counterfactual"),
        folder=ws.folder(".cache/jobs/counterfactual-measure"),
        labels=labels,
    )
    seconds = time.perf_counter() - start
    ref = values["full"]["loss"]
    cf = changes(removed, values, ref)
    means = cf.groupby(["fraction", "method"]).change.mean()
    metrics = {
        "num_queries": Qc,
        "steps": tcfg.steps,
        "seed": tcfg.seed,
        "seconds": round(seconds, 1),
        "models_trained_this_run": len(jobs) - len(existing),
        "models_measured_this_run": len(values.measured),
        "damping": {m: key.damping for m, (key, _) in chosen.items()},
        "mean_change": {f"{m}@{f:g}": round(float(v), 4) for (f, m), v in means.items()},
        "reference_loss_mean": round(float(ref.mean()), 4),
    }
    by_class = _class_shares(ws, samples, ds, chosen, cfcfg.fractions)
    shares, chance, (class_kind, qm) = by_class["shares"], by_class["chance"], by_class["kind"]
    metrics |= by_class["metrics"]
    methods = list(cfcfg.methods)
    result = None
    if "kfac" in methods and len(set(methods) & {"trak", "d-trak"}):
        margins = margins_over_baselines(cf)
        result = retraining_claims.counterfactual_top_removal(margins.tolist())
        metrics["margin_over_baselines"] = {
            "mean": round(float(margins.mean()), 4),
            "stderr": round(float(margins.std(ddof=1) / len(margins) ** 0.5), 4)
            if len(margins) > 1
            else None,
        }
        metrics["claims"] = [result]
    ws.write_metrics("counterfactual", metrics)
    parts = [
        f"top {frac:.0%} removed: "
        + ", ".join(f"{LABELS[k]} {v:+.3f}" for k, v in means.loc[frac].items())
        for frac in cfcfg.fractions
    ]
    trained = sum(1 for j in jobs.values() if j.output not in existing)
    summary = (
        f"**This run.** {len(jobs)} models of {tcfg.steps} steps with the full model's seed {tcfg.seed}, as App. G.6 "
        f"prescribes ({trained} trained now, in {train_seconds:.0f} s), measured with {mscfg.draws} common draws; the "
        f"full model's loss on these samples is {float(ref.mean()):.3f} on average. Mean change in the sample's loss "
        f"against the full model: "
        + "; ".join(parts)
        + ". Random removal sets the noise floor of this comparison "
        "(the same seed, but a different training set, changes the training trajectory). "
        + _class_sentence(shares, chance, class_kind, qm)
        + (
            f"{result['evidence']}: the claim of Fig. 3 (K-FAC's top influences matter more) **{result['verdict']}** "
            f"here, with only {Qc} samples (see the dots)."
            if result
            else ""
        )
    )
    summary_table = (
        cf.groupby(["fraction", "method"]).change.agg(["mean", "std", "count"]).unstack("method")
    )
    return StageResult(
        metrics=metrics,
        tables={"changes": summary_table.round(4)},
        data={
            "changes": cf,
            "methods": methods,
            "fractions": list(cfcfg.fractions),
            "num_queries": Qc,
            "classes": by_class["figure"],
            "shares": (shares, chance),
        },
        summary=summary,
    )


def _class_shares(ws: Workspace, samples: dict, ds: ImageDataset, chosen: dict, fractions) -> dict:
    """Each method's same-class shares (and exact retraining's, read off the LDS subsets) on
    the samples with a ground truth: ``shares``, ``chance``, ``kind`` (what a sample's class
    is, how many samples) and the class figure's inputs (K-FAC's top influences, or the first
    method's without K-FAC)."""
    classes, kind = sample_classes(samples, ds)
    gt = torch.load(ws.path(ws.GROUND_TRUTH), weights_only=True)
    qm = gt["subsets"]["loss"].shape[0]
    by_method = {m: s[:qm] for m, (_, s) in chosen.items()}
    by_method["retraining"] = retraining_scores(gt["masks"], gt["subsets"]["loss"].mean(2))
    shares, chance = class_agreement(by_method, classes[:qm], ds.labels, fractions)
    shown = chosen.get("kfac", next(iter(chosen.values())))[1][:qm]
    table = {
        f"{r.method}@{r.fraction:g}": {"mean": round(r["mean"], 4), "stderr": round(r.stderr, 4)}
        for _, r in shares.iterrows()
    }
    return {
        "metrics": {"same_class_share": table, "same_class_chance": round(chance, 4)},
        "shares": shares,
        "chance": chance,
        "kind": (kind, qm),
        "figure": (samples["images"][:qm], classes[:qm], ds, shown),
    }


def _class_sentence(shares: pd.DataFrame, chance: float, kind: str, num_samples: int) -> str:
    """The summary's sentence on the class of the top influences."""
    parts = [
        f"{LABELS.get(r.method, r.method)} {r['mean']:.0%} (top {r.fraction:.0%})"
        for _, r in shares.iterrows()
    ]
    return (
        f"The share of a sample's top influences in its class ({kind}; the {num_samples} samples "
        f"with a ground truth, chance {chance:.0%}; exact retraining: the difference in the mean "
        "loss of the LDS subset models trained without and with each example): "
        + ", ".join(parts)
        + ". "
    )


def fig_class_influences(result: StageResult) -> plt.Figure:
    """For the first sample of each class, its top positive and negative K-FAC influences;
    each method's share of same-class top influences against chance."""
    queries, classes, ds, scores = result.data["classes"]
    shares, chance = result.data["shares"]
    return class_influences(
        queries, classes, ds.images, ds.labels, scores, shares, chance, labels=LABELS
    )


def fig_counterfactual(result: StageResult) -> plt.Figure:
    """Fig. 3: mean change of the sample's loss per method and fraction, samples as dots."""
    cf, methods, fractions = (
        result.data["changes"],
        result.data["methods"],
        result.data["fractions"],
    )
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        for i, frac in enumerate(fractions):
            t = cf[(cf.method == method) & np.isclose(cf.fraction, frac)]
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(
                x, t.change.mean(), width, color=f"C{j}", label=LABELS[method] if i == 0 else None
            )
            ax.scatter(np.full(len(t), x), t.change, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(fractions)), [f"top {f:.0%} removed" for f in fractions])
    ax.axhline(0, color="k", lw=0.6)
    ax.set(
        ylabel="change in the sample's loss",
        title=f"Retraining without top influences ({result.data['num_queries']} samples, Fig. 3)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
