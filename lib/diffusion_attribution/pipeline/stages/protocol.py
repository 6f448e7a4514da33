"""Stage ``protocol``: what two budget deviations do to this run's LDS (App. G.3.1).

The paper's protocol fits K-FAC with 125-250 (t, eps) draws per training example (its authors'
code; ``curvature.num_draws`` here) and projects TRAK's gradients to k = 32768 dimensions
(``trak.projection_dim`` here). On the run's own ground truth (the ``measure`` stage's loss on
the retrained models), this stage measures both:

- K-FAC (MC Fisher, expand: the paper's method) fitted at each of ``protocol.fit_draws``, with
  the curvature section's other settings and the loss' seeded per-example draws (seed
  ``curvature.seed``), and K-FAC influence of the loss at ``influence.damping`` and
  ``influence.compression`` with the influence section's draws and seed, all fits scored in one
  call of :func:`~diffusion_attribution.attribution.influence.attribute` (the per-example
  gradients are computed once);
- TRAK and D-TRAK at each of ``protocol.projection_dims`` (:func:`~diffusion_attribution.
  attribution.baselines.baseline_scores`, float32, the ``trak`` section's projection kind, seed and
  relative damping sweep), at the best damping of the sweep ("*") and at the damping chosen on
  held-out subsets.

The configured value is always among those computed; each value's loss LDS comes with its
paired difference against it (:mod:`diffusion_attribution.evaluation.budget`), and the paper's
statement that the projection dimension matters is decided by
:func:`~diffusion_attribution.evaluation.claims.projection_dimension`. Only the first
``measure.num_queries`` samples (those with ground truth) are scored. The ``evaluate`` stage puts
the effects into the protocol table (:func:`~diffusion_attribution.evaluation.protocol.protocol_effects`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor, nn

from diffusion_attribution.attribution.baselines import baseline_scores
from diffusion_attribution.attribution.influence import attribute
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.core.config import Config
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import DiffusionLoss, SquareNorm
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.evaluation import claims
from diffusion_attribution.evaluation.budget import (
    BudgetPoint,
    budget_lds,
    budget_metrics,
    extremes_difference,
)
from diffusion_attribution.pipeline.attributed import attributed_model
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace, write_json

NOTEBOOK = "08b_protocol.ipynb"
INPUTS = ("outputs/data", "outputs/train", "outputs/sample", "outputs/measure")
OUTS = ("outputs/protocol",)
PERSIST: tuple[str, ...] = ()
FIGURES = ("protocol_effects.png",)
METRICS = ("metrics/protocol.json",)

#: The methods of the projection-dimension part: (score key method, label in the claim).
TRAK_METHODS = (("trak", "TRAK*"), ("d-trak", "D-TRAK*"))


def kfac_by_fit_draws(
    model: nn.Module,
    schedule: NoiseSchedule,
    train_images: Tensor,
    queries: Tensor,
    fit_draws: Sequence[int],
    *,
    fit_seed: int,
    fit_batch_size: int,
    precision: str,
    damping: float,
    compression: str,
    train_draws: int,
    query_draws: int,
    seed: int,
    batch_size: int,
    progress: bool = False,
    params: Sequence[nn.Parameter] | None = None,
) -> tuple[dict[int, Tensor], dict[str, float]]:
    """K-FAC influence scores (Q, N) of the loss, one matrix per number of fit draws: K-FAC of
    the MC Fisher, expand (:func:`~diffusion_attribution.curvature.fit.fit_kfac`), fitted with
    ``n`` of the loss' seeded per-example (t, eps) draws (seed ``fit_seed``, as the
    ``curvature`` stage draws them) for each n in ``fit_draws``; the scores of all fits in one
    :func:`~diffusion_attribution.attribution.influence.attribute` call (``train_draws`` /
    ``query_draws`` draws, seed ``seed``). Returns the scores on the CPU and the seconds of
    each fit and of the scoring. ``params``: the attributed parameters (default: every
    Linear / Conv2d weight)."""
    params = list(params) if params is not None else kfac_parameters(model)
    device = params[0].device
    loss = DiffusionLoss(schedule)
    ids = torch.arange(len(train_images))
    curvatures, seconds = {}, {}
    for n in fit_draws:
        start = time.perf_counter()
        d = loss.draw(train_images, ids, n, fit_seed)
        curvatures[f"mc_expand@{n}"] = fit_kfac(
            model, params, schedule, train_images.to(device), d["t"].to(device),
            d["eps"].to(device), fisher="mc", kfac="expand", batch_size=fit_batch_size,
            mc_seed=fit_seed, precision=precision,
        )  # fmt: skip
        seconds[f"K-FAC fit, {n} draws"] = time.perf_counter() - start
        if progress:
            print(
                f"K-FAC fit with {n} draws per example ({n * len(train_images)} rows): "
                f"{seconds[f'K-FAC fit, {n} draws']:.1f} s",
                flush=True,
            )
    specs = {n: ScoreKey("kfac", "loss", f"mc_expand@{n}", damping, compression) for n in fit_draws}
    start = time.perf_counter()
    scores, _ = attribute(
        model, params, train_images, queries, {"loss": loss}, curvatures, list(specs.values()),
        train_measurement=loss, train_draws=train_draws, query_draws=query_draws, seed=seed,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    seconds["K-FAC influence scores (all fits)"] = time.perf_counter() - start
    return {n: scores[key].cpu() for n, key in specs.items()}, seconds


def trak_by_projection_dim(
    model: nn.Module,
    schedule: NoiseSchedule,
    train_images: Tensor,
    queries: Tensor,
    dims: Sequence[int],
    *,
    projection_seed: int,
    projection: str,
    relative_dampings: Sequence[float],
    train_draws: int,
    query_draws: int,
    seed: int,
    batch_size: int,
    progress: bool = False,
    params: Sequence[nn.Parameter] | None = None,
) -> tuple[dict[int, ScoreSet], dict[str, float]]:
    """TRAK (loss) and D-TRAK (square norm) scores (Q, N) in float32 over the damping sweep
    ``relative_dampings`` at each projection dimension k in ``dims``
    (:func:`~diffusion_attribution.attribution.baselines.baseline_scores` with
    ``Projector(P, k, seed=projection_seed, kind=projection)``, as the ``baselines`` stage
    projects). Returns one :class:`ScoreSet` per k (on the CPU, meta: ``projection_dim`` and
    the mean eigenvalues) and the seconds of each k. ``params`` as for
    :func:`kfac_by_fit_draws`."""
    params = list(params) if params is not None else kfac_parameters(model)
    measurements = {"loss": DiffusionLoss(schedule), "square_norm": SquareNorm(schedule)}
    num_params = sum(p.numel() for p in params)
    sets, seconds = {}, {}
    for k in dims:
        start = time.perf_counter()
        found = baseline_scores(
            model, params, train_images, queries, measurements,
            Projector(num_params, k, seed=projection_seed, kind=projection), relative_dampings,
            query_measurements=["loss"], train_draws=train_draws, query_draws=query_draws,
            seed=seed, precisions=("float32",), das=False, feature_module=None,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        kept = {key: s.cpu() for key, s in found.items() if key.method in dict(TRAK_METHODS)}
        eig = {m: found.meta["mean_eigenvalue"][m] for m in dict(TRAK_METHODS)}
        sets[k] = ScoreSet(kept, {"projection_dim": k, "mean_eigenvalue": eig})
        seconds[f"TRAK and D-TRAK, k = {k}"] = time.perf_counter() - start
        if progress:
            print(f"TRAK and D-TRAK at k = {k}: {seconds[f'TRAK and D-TRAK, k = {k}']:.1f} s")
    return sets, seconds


def trak_sweeps(
    sets: dict[int, ScoreSet], relative_dampings: Sequence[float]
) -> dict[str, dict[int, dict[float, Tensor]]]:
    """Method -> k -> relative damping (the configured value it was computed from) -> scores."""
    out: dict[str, dict[int, dict[float, Tensor]]] = {m: {} for m, _ in TRAK_METHODS}
    for k, scores in sets.items():
        for key, s in scores.items():
            rel = scores.relative_damping(key)
            nearest = min(relative_dampings, key=lambda r, rel=rel: abs(math.log(rel / r)))
            out[key.method].setdefault(k, {})[nearest] = s
    return out


def _skipped(configured: int, key: str) -> dict:
    return {"skipped": True, "configured": configured, "why": f"protocol.{key} is empty"}


def protocol(
    kfac: dict[int, Tensor] | None,
    trak: dict[str, dict[int, dict[float, Tensor]]] | None,
    measured: Tensor,
    masks: Tensor,
    *,
    fit_draws: int,
    projection_dim: int,
    damping: float,
) -> StageResult:
    """The loss LDS of every score matrix, the paired differences, the claim and the summary
    (no files: the pure part of :func:`run`). ``kfac``: fit draws -> (Q_s, N) scores, or
    ``None`` when skipped; ``trak``: method -> k -> relative damping -> scores, or ``None``;
    ``measured`` (Q, M, K) the loss on the retrained models, ``masks`` (M, N); ``fit_draws``
    and ``projection_dim``: this run's configured values (keys of the inputs); ``damping``
    K-FAC's."""
    Q, M, K = measured.shape
    metrics: dict = {"num_queries": Q, "num_subsets": M, "num_seeds": K}
    points: dict[str, dict[int, BudgetPoint]] = {}
    if kfac is None:
        metrics["fit_draws"] = _skipped(fit_draws, "fit_draws")
    else:
        points["kfac"] = budget_lds(
            {n: {damping: s} for n, s in kfac.items()}, measured, masks, fit_draws
        )
        kfac_metrics = budget_metrics(points["kfac"])
        metrics["fit_draws"] = {
            "skipped": False,
            "configured": fit_draws,
            "values": sorted(kfac),
            "kfac": kfac_metrics,
        }
    if trak is None:
        metrics["projection_dims"] = _skipped(projection_dim, "projection_dims")
    else:
        metrics["projection_dims"] = {
            "skipped": False,
            "configured": projection_dim,
            "values": sorted(trak["trak"]),
        }
        for method, _ in TRAK_METHODS:
            points[method] = budget_lds(trak[method], measured, masks, projection_dim)
            metrics["projection_dims"][method] = budget_metrics(points[method])
    found = []
    if trak is not None and len(points["trak"]) >= 2:
        extremes = {label: extremes_difference(points[m]) for m, label in TRAK_METHODS}
        # the claim's comparison in the metrics too: every number of its evidence is one
        metrics["projection_dims"]["largest_minus_smallest"] = {
            label: {"mean": round(d.mean, 5), "stderr": round(d.stderr, 5)}
            for label, d in extremes.items()
        }
        found.append(
            claims.projection_dimension(
                {label: {k: p.best for k, p in points[m].items()} for m, label in TRAK_METHODS},
                extremes,
            )
        )
    metrics["claims"] = found
    return StageResult(
        metrics=metrics,
        tables={name: points_table(p) for name, p in points.items()},
        data={"points": points, "configured": (fit_draws, projection_dim), "why": _why(metrics)},
        summary=summary(points, fit_draws, projection_dim, found, _why(metrics)),
    )


def _why(metrics: dict) -> dict[str, str]:
    return {k: metrics[k]["why"] for k in ("fit_draws", "projection_dims") if metrics[k]["skipped"]}


def points_table(points: dict[int, BudgetPoint]) -> pd.DataFrame:
    """One row per value: the LDS at the best damping of the sweep, its standard error, that
    damping, the paired difference against the configured value with its standard error and,
    where there is one, the same at the damping chosen on held-out subsets."""
    rows = {}
    for v, p in points.items():
        row = {
            "LDS": round(p.best.mean, 4),
            "s.e.": round(p.best.stderr, 4),
            "damping": f"{p.damping:g}",
            "minus this run's": round(p.difference.mean, 4),
            "s.e. (paired)": round(p.difference.stderr, 4),
        }
        if p.heldout is not None:
            row |= {
                "held-out LDS": round(p.heldout.mean, 4),
                "minus this run's (held-out)": round(p.heldout_difference.mean, 4),
                "s.e. (paired) ": round(p.heldout_difference.stderr, 4),
            }
        rows[v] = row
    return pd.DataFrame(rows).T


def _line(points: dict[int, BudgetPoint], configured: int, unit: str) -> str:
    return ", ".join(
        f"{p.best.mean:.3f} ± {p.best.stderr:.3f} at {unit}{v}"
        + ("" if v == configured else f" ({p.difference.mean:+.3f} ± {p.difference.stderr:.3f})")
        for v, p in points.items()
    )


def summary(
    points: dict[str, dict[int, BudgetPoint]],
    fit_draws: int,
    projection_dim: int,
    found: list[dict],
    why: dict[str, str],
) -> str:
    """The stage's prose with this run's numbers (paired differences against the configured
    value in brackets)."""
    lines = ["**This run.** Loss LDS; paired differences against this run's setting in brackets."]
    if "kfac" in points:
        lines.append(
            f"*K-FAC fit draws* (this run: {fit_draws}): K-FAC influence "
            f"{_line(points['kfac'], fit_draws, '')} draws per example."
        )
    else:
        lines.append(f"*K-FAC fit draws:* not measured ({why['fit_draws']}).")
    if "trak" in points:
        lines.append(
            f"*TRAK projection dimension* (this run: k = {projection_dim}): "
            + "; ".join(
                f"{label} {_line(points[m], projection_dim, 'k = ')}" for m, label in TRAK_METHODS
            )
            + "."
        )
        for c in found:
            lines.append(
                f"The paper's statement ({c['figure']}): {c['claim']}: **{c['verdict']}**."
            )
    else:
        lines.append(f"*TRAK projection dimension:* not measured ({why['projection_dims']}).")
    return "\n\n".join(lines)


def run(config: Config, ws: Workspace) -> StageResult:
    """Compute, save and evaluate the scores of both parts; the figure's data."""
    pcfg, ccfg, icfg, tcfg = config.protocol, config.curvature, config.influence, config.trak
    ws.set_threads()
    gt = torch.load(ws.path(ws.GROUND_TRUTH), weights_only=True)
    measured, masks = gt["subsets"]["loss"], gt["masks"]
    Q = measured.shape[0]
    ds = ImageDataset.load(ws.path(ws.TRAIN_SET))
    net, params = attributed_model(ws)
    queries = torch.load(ws.path(ws.SAMPLES), weights_only=True)["images"][:Q]
    schedule = schedule_of(config.diffusion)
    folder = ws.folder("outputs/protocol")
    for old in folder.glob("*.pt"):  # this stage's own files of an earlier run
        old.unlink()
    index: dict = {}
    seconds: dict[str, float] = {}
    kfac = trak = None
    shared = dict(
        train_draws=icfg.train_draws, query_draws=icfg.query_draws, seed=icfg.seed,
        batch_size=icfg.batch_size, progress=True, params=params,
    )  # fmt: skip
    if pcfg.fit_draws:
        draws = sorted({*pcfg.fit_draws, ccfg.num_draws})
        print(f"K-FAC at {draws} fit draws per example; {Q} samples x {len(ds)} training images")
        kfac, s = kfac_by_fit_draws(
            net, schedule, ds.images, queries, draws, fit_seed=ccfg.seed,
            fit_batch_size=ccfg.batch_size, precision=ccfg.precision, damping=icfg.damping,
            compression=icfg.compression, **shared,
        )  # fmt: skip
        seconds |= s
        for n, scores in kfac.items():
            key = ScoreKey("kfac", "loss", "mc_expand", icfg.damping, icfg.compression)
            name = f"kfac_fit_draws_{n}.pt"
            ScoreSet({key: scores}, {"fit_draws": n}).save(folder / name)
            index.setdefault("fit_draws", {})[str(n)] = name
    if pcfg.projection_dims:
        dims = sorted({*pcfg.projection_dims, tcfg.projection_dim})
        print(f"TRAK and D-TRAK at k = {dims}")
        sets, s = trak_by_projection_dim(
            net, schedule, ds.images, queries, dims, projection_seed=tcfg.seed,
            projection=tcfg.projection, relative_dampings=tcfg.relative_dampings, **shared,
        )  # fmt: skip
        seconds |= s
        for k, scores in sets.items():
            name = f"trak_projection_dim_{k}.pt"
            scores.save(folder / name)
            index.setdefault("projection_dims", {})[str(k)] = name
        trak = trak_sweeps(sets, tcfg.relative_dampings)
    write_json(folder / "index.json", index)  # the files written (none when both are skipped)
    result = protocol(
        kfac, trak, measured, masks, fit_draws=ccfg.num_draws,
        projection_dim=tcfg.projection_dim, damping=icfg.damping,
    )  # fmt: skip
    result.metrics["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    ws.write_metrics("protocol", result.metrics)
    result.tables["seconds"] = pd.Series(result.metrics["seconds"], dtype=float)
    return result


def fig_effects(result: StageResult) -> plt.Figure:
    """Left: K-FAC influence's loss LDS against the fit's draws per example; right: TRAK* and
    D-TRAK* against the projection dimension (error bars: standard error over samples; the
    run's configured value dashed)."""
    points, (draws, dim) = result.data["points"], result.data["configured"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    panels = (
        (axes[0], [("kfac", "K-FAC influence (MC, expand)", "o")], draws, "fit_draws",
         "(t, eps) draws per training example in the K-FAC fit", "K-FAC: draws of the fit"),
        (axes[1], [("trak", "TRAK* (best damping)", "o"), ("d-trak", "D-TRAK* (best damping)", "s")],
         dim, "projection_dims", "TRAK projection dimension k", "TRAK / D-TRAK: projection dimension"),
    )  # fmt: skip
    for ax, methods, configured, part, xlabel, title in panels:
        drawn = [m for m in methods if m[0] in points]
        for method, label, marker in drawn:
            p = points[method]
            ax.errorbar(
                list(p), [q.best.mean for q in p.values()], yerr=[q.best.stderr for q in p.values()],
                marker=marker, capsize=3, label=label,
            )  # fmt: skip
        if drawn:
            ax.axvline(configured, color="gray", ls="--", lw=0.8, label=f"this run: {configured}")
            ax.set_xscale("log")
            ticks = sorted({v for m in drawn for v in points[m[0]]})
            ax.minorticks_off()
            ax.set_xticks(ticks, [str(v) for v in ticks])  # the values tried, written out
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"not measured\n({result.data['why'][part]})", ha="center",
                    va="center", transform=ax.transAxes)  # fmt: skip
        ax.set(xlabel=xlabel, title=title)
    axes[0].set_ylabel("LDS, loss measurement")
    fig.suptitle("Effect of two budget settings on this run's loss LDS (mean ± s.e. over samples)")
    fig.tight_layout()
    return fig
