"""K-FAC influence accuracy per unit of compute: EK-FAC, (t, eps) draws per gradient, and
variance-reduced draws, scored by the loss LDS on the pipeline's own retrained models.

Run after the default pipeline (``dvc repro``) has written ``outputs/`` (trained model,
samples, ``mc_expand`` curvature, retrain masks and ground-truth measurements):

    .venv/bin/python benchmarks/bench_kfac_draws.py                   # the default sweep
    .venv/bin/python benchmarks/bench_kfac_draws.py --settings reference both-64 both-256
    .venv/bin/python benchmarks/bench_kfac_draws.py --smoke           # tiny self-made workspace

Every setting computes K-FAC influence for the diffusion-loss measurement exactly as the
``influence`` stage does (MC Fisher, expand, the configured damping and compression, seeds
``influence.seed`` for training and ``influence.seed + 1`` for query draws), for the queries
that have ground truth (the first ``measure.num_queries`` samples), and differs from the
reference in one lever only:

* ``reference``: 256 train / 256 query draws, plain i.i.d. draws, K-FAC (``mc_expand`` of the
  ``curvature`` stage). With the default profile these are the ``influence`` stage's scores.
* ``ekfac-256``: EK-FAC (eigenvalue-corrected, George et al. 2018) fitted on the curvature
  stage's rows (``curvature.num_draws`` draws, ``curvature.seed``); it shares its gradient
  pass with the reference.
* ``draws-S``, S in {32, 64, 128, 512} (``draws-256`` is the reference): S draws per
  training and query gradient.
* ``stratified-S``, ``antithetic-S``, ``both-S`` for S in {64, 256}: the draws of
  :mod:`diffusion_attribution.diffusion.draws` (stratified timesteps, antithetic noise pairs, both).

The table gives the LDS (mean over queries, its standard error), the paired difference with
the reference and with plain draws at the same S (mean over the same queries +- stderr, via
``lds.paired_difference``: the error bar for "A beats B"), the gradient rows computed
(training examples x train draws + queries x query draws) and the seconds of the setting's
pass (gradients + preconditioning + scoring; a pass shared by two settings is marked).

Cost. Score matrices are cached per setting under ``.cache/bench_kfac_draws/`` (relative to
``--root``), keyed by the setting, the damping / compression / seeds, the bytes of the
inputs (training set, model, samples, curvature) and the code that computes scores, so
an interrupted sweep resumes and a re-run only recomputes the LDS; cached rows say so and
keep the seconds of the run that computed them.

Run time. The default sweep computes 759,328 gradient rows in 11 passes (1,952 draws per
example for 357 training examples and 32 queries). Measured on a synthetic workspace of the
default profile's sizes (digits-2, 357 examples, base-16 U-Net with random weights: the cost
does not depend on the weights, the LDS there is meaningless) with ``--threads 2`` on this
kind of machine (2 cores): passes that had the CPU to themselves ran at about 6,000 rows/s
(256/256 draws: 17 s per pass; 64/64: 4.4 s), i.e. about 2.5 minutes for the whole sweep
plus a 7.5 s EK-FAC fit; with other pipeline runs competing for the two cores the same sweep
took 9.3 minutes (and one pass 5x longer than its neighbours), so read the seconds and rows/s
columns of one run together, and rerun with ``--recompute`` on a quiet machine for timings.
``--smoke`` (64 examples, 8x8 smoke U-Net, 8 subsets x 2 seeds) builds its workspace in
about a minute and sweeps in about 20 s. No run on real pipeline outputs had been made when
this was written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from diffusion_attribution.attribution.scores import ScoreSet
from diffusion_attribution.core.config import Config, dump_config, load_config
from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint
from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.diffusion.draws import DrawScheme
from diffusion_attribution.diffusion.training import load_checked_model
from diffusion_attribution.evaluation import lds as lds_module
from diffusion_attribution.evaluation.lds import (
    LDSResult,
    lds,
    paired_difference,
    predicted_changes,
)
from diffusion_attribution.pipeline.workspace import Workspace


def load_dataset(ws: Workspace) -> ImageDataset:
    return ImageDataset.load(ws.path(ws.TRAIN_SET))


def load_output(ws: Workspace, rel: str) -> dict:
    return torch.load(ws.path(rel), weights_only=True)


CURVATURE = "mc_expand"  # the paper's K-FAC variant, the only one swept here


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: draws per gradient, draw scheme, curvature."""

    train_draws: int
    query_draws: int
    stratified: bool = False
    antithetic: bool = False
    ekfac: bool = False

    @property
    def scheme(self) -> DrawScheme:
        return DrawScheme(self.stratified, self.antithetic)

    @property
    def pass_key(self) -> tuple:
        """Settings with the same key share their gradient pass (they differ in curvature)."""
        return (self.train_draws, self.query_draws, self.stratified, self.antithetic)

    def plain(self) -> Setting:
        """The same draw counts with plain draws and K-FAC: the within-S comparison."""
        return replace(self, stratified=False, antithetic=False, ekfac=False)


REFERENCE = Setting(256, 256)
SETTINGS: dict[str, Setting] = {
    "reference": REFERENCE,
    "ekfac-256": replace(REFERENCE, ekfac=True),
    **{f"draws-{s}": Setting(s, s) for s in (32, 64, 128, 512)},
    **{
        f"{label}-{s}": Setting(s, s, stratified=st, antithetic=an)
        for s in (64, 256)
        for label, st, an in (
            ("stratified", True, False),
            ("antithetic", False, True),
            ("both", True, True),
        )
    },
}
ALIASES = {"draws-256": "reference"}


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


def inputs_fingerprint(ws: Workspace, config: Config) -> str:
    """What the score matrices depend on besides the setting: input files and code."""
    from diffusion_attribution.attribution import influence
    from diffusion_attribution.curvature import kfac as curvature
    from diffusion_attribution.curvature import kronecker
    from diffusion_attribution.diffusion import ddpm, draws, gradients, measurements, unet

    files = [ws.TRAIN_SET, ws.MODEL, ws.SAMPLES, ws.CURVATURE.format(variant=CURVATURE)]
    code = code_digest(curvature, ddpm, draws, gradients, influence, kronecker, measurements, unet)
    return fingerprint(
        *(file_digest(ws.path(f)) for f in files),
        code,
        config.diffusion,
        config.curvature,
        config.influence.damping,
        config.influence.compression,
        config.influence.seed,
    )


def ekfac_curvature(ws: Workspace, config: Config, cache: Path, fp: str):
    """EK-FAC (MC Fisher, expand) on the curvature stage's rows, fitted once and cached."""
    from diffusion_attribution.curvature.fit import fit_kfac
    from diffusion_attribution.curvature.kfac import KFAC
    from diffusion_attribution.diffusion.measurements import DiffusionLoss
    from diffusion_attribution.diffusion.unet import kfac_parameters
    from diffusion_attribution.pipeline.schedule import schedule_of

    path = cache / f"ekfac-{fp}.pt"
    if path.exists():
        return KFAC.load(path), None
    ccfg, ds, net = (
        config.curvature,
        load_dataset(ws),
        load_checked_model(ws.path(ws.MODEL), device=ws.device),
    )
    schedule = schedule_of(config.diffusion)
    d = DiffusionLoss(schedule).draw(ds.images, torch.arange(len(ds)), ccfg.num_draws, ccfg.seed)
    fisher, kfac = CURVATURE.split("_")
    K = fit_kfac(
        net,
        kfac_parameters(net),
        schedule,
        ds.images.to(ws.device),
        d["t"].to(ws.device),
        d["eps"].to(ws.device),
        fisher=fisher,
        kfac=kfac,
        batch_size=ccfg.batch_size,
        mc_seed=ccfg.seed,
        ekfac=True,
    )
    K.save(path)
    return K, K.meta["fit_seconds"]


def cache_path(cache: Path, setting: Setting, fp: str) -> Path:
    s = setting
    scheme = s.scheme.label.replace("+", "-")
    name = f"{s.train_draws}t-{s.query_draws}q-{scheme}-{'ekfac' if s.ekfac else 'kfac'}"
    return cache / f"{name}-{fingerprint(asdict(s), fp)}.pt"


# ------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------


def compute_pass(
    ws: Workspace, config: Config, queries, settings: list[Setting], curvatures: dict
) -> dict[Setting, dict]:
    """One :func:`attribute` call for settings that share their draws: {setting: entry}."""
    from diffusion_attribution.attribution.influence import attribute
    from diffusion_attribution.attribution.scores import ScoreKey
    from diffusion_attribution.diffusion.measurements import DiffusionLoss
    from diffusion_attribution.diffusion.unet import kfac_parameters
    from diffusion_attribution.pipeline.schedule import schedule_of

    icfg, ds, net = (
        config.influence,
        load_dataset(ws),
        load_checked_model(ws.path(ws.MODEL), device=ws.device),
    )
    first = settings[0]
    loss = first.scheme.wrap(DiffusionLoss(schedule_of(config.diffusion)))
    keys = {
        s: ScoreKey(
            "kfac",
            "loss",
            CURVATURE + ("_ekfac" if s.ekfac else ""),
            icfg.damping,
            icfg.compression,
        )
        for s in settings
    }
    used = {k.curvature: curvatures[s.ekfac] for s, k in keys.items()}
    start = time.perf_counter()
    scores, timings = attribute(
        net,
        kfac_parameters(net),
        ds.images,
        queries,
        {"loss": loss},
        used,
        list(dict.fromkeys(keys.values())),
        train_measurement=loss,
        train_draws=first.train_draws,
        query_draws=first.query_draws,
        seed=icfg.seed,
        batch_size=icfg.batch_size,
    )
    seconds = time.perf_counter() - start
    rows = len(ds) * first.train_draws + len(queries) * first.query_draws
    names = [("ekfac" if s.ekfac else "kfac") for s in settings]
    return {
        s: {
            "scores": scores[keys[s]].float(),
            "rows": rows,
            "seconds": seconds,
            "gradient_seconds": timings.gradients,
            "shared": len(settings) > 1,
            "pass": names,
            "setting": asdict(s),
        }
        for s in settings
    }


def run_sweep(
    ws: Workspace, config: Config, names: list[str], cache: Path, recompute: bool = False
) -> tuple[pd.DataFrame, dict]:
    """Scores for every named setting (cached), their LDS and the paired differences."""
    from diffusion_attribution.curvature.kfac import KFAC

    gt = load_output(ws, ws.GROUND_TRUTH)
    measured, masks = gt["subsets"]["loss"], gt["masks"]
    Q = measured.shape[0]
    queries = load_output(ws, ws.SAMPLES)["images"][:Q]
    fp = inputs_fingerprint(ws, config)
    wanted = {n: SETTINGS[n] for n in names}
    needed = {"reference": REFERENCE, **wanted}  # paired differences are against it
    for s in list(needed.values()):  # and against plain draws at the same S
        if (s.stratified or s.antithetic or s.ekfac) and s.plain() not in needed.values():
            name = next((n for n, v in SETTINGS.items() if v == s.plain()), None)
            needed[name or f"plain-{s.train_draws}/{s.query_draws}"] = s.plain()

    entries, todo = {}, {}
    for s in dict.fromkeys(needed.values()):
        path = cache_path(cache, s, fp)
        if path.exists() and not recompute:
            entries[s] = {**torch.load(path, weights_only=True), "cached": True}
        else:
            todo.setdefault(s.pass_key, []).append(s)
    info: dict = {"fingerprint": fp, "ekfac_fit_seconds": None}
    curvatures = {False: KFAC.load(ws.path(ws.CURVATURE.format(variant=CURVATURE)))}
    if any(s.ekfac for group in todo.values() for s in group):
        curvatures[True], info["ekfac_fit_seconds"] = ekfac_curvature(ws, config, cache, fp)
    total_rows = sum(
        len(load_dataset(ws)) * g[0].train_draws + Q * g[0].query_draws for g in todo.values()
    )
    print(
        f"{len(todo)} gradient passes to compute ({total_rows:,} gradient rows), "
        f"{len(entries)} settings cached in {cache}",
        flush=True,
    )
    computed = 0.0
    for group in todo.values():
        label = ", ".join(n for n, s in needed.items() if s in group)
        print(f"  computing {label} ...", end=" ", flush=True)
        for s, entry in compute_pass(ws, config, queries, group, curvatures).items():
            atomic_save(entry, cache_path(cache, s, fp))
            entries[s] = {**entry, "cached": False}
        computed += entry["seconds"]
        print(f"{entry['seconds']:.1f} s", flush=True)

    results = {s: lds(predicted_changes(e["scores"], masks), measured) for s, e in entries.items()}
    ref = results[REFERENCE]
    ref_seconds = entries[REFERENCE]["seconds"]
    table = []
    for name, s in needed.items():
        e, r = entries[s], results[s]
        vs_ref = paired_difference(r.per_query, ref.per_query)
        plain = s.plain()
        vs_plain = paired_difference(r.per_query, results[plain].per_query) if plain != s else None
        table.append(
            {
                "setting": name,
                "train/query draws": f"{s.train_draws}/{s.query_draws}",
                "draws": s.scheme.label,
                "curvature": "EK-FAC" if s.ekfac else "K-FAC",
                "LDS": r.mean,
                "stderr": r.stderr,
                "vs reference": _pm(vs_ref) if s != REFERENCE else "-",
                "vs plain same S": _pm(vs_plain) if vs_plain is not None else "-",
                "gradient rows": e["rows"],
                "seconds": e["seconds"],
                "x reference time": e["seconds"] / ref_seconds,
                "rows/s": e["rows"] / e["gradient_seconds"],
                "note": ("shared pass " if e["shared"] else "") + ("cached" if e["cached"] else ""),
            }
        )
    info.update(
        queries=Q,
        subsets=measured.shape[1],
        seeds=measured.shape[2],
        train=len(load_dataset(ws)),
        bounds=retraining_bounds(measured),
        reference_scores=entries[REFERENCE]["scores"],
        computed_seconds=computed,
    )
    return pd.DataFrame(table).set_index("setting"), info


def retraining_bounds(measured) -> dict[str, LDSResult]:
    """What exact retraining reaches, by whichever of the library's functions exist (their
    names changed: the seed reproducibility, formerly the "retraining ceiling", and the LDS
    upper bound)."""
    if measured.shape[2] < 2:
        return {}
    out = {}
    for label, name in (
        ("LDS upper bound", "lds_upper_bound"),
        ("seed reproducibility", "seed_reproducibility"),
        ("retraining ceiling", "retraining_ceiling"),
    ):
        fn = getattr(lds_module, name, None)
        if fn is not None:
            out[label] = fn(measured)
    return out


def _pm(r: LDSResult) -> str:
    return f"{r.mean:+.4f} +- {r.stderr:.4f}"


def check_against_pipeline(ws: Workspace, config: Config, reference_scores) -> str | None:
    """The reference is the influence stage's main loss matrix when the profile uses 256/256
    draws: say how well they agree (they should be equal up to float round-off)."""
    from diffusion_attribution.attribution.scores import ScoreKey

    icfg = config.influence
    path = ws.path(ws.INFLUENCE_SCORES)
    if not path.exists() or (icfg.train_draws, icfg.query_draws) != (256, 256):
        return None
    key = ScoreKey("kfac", "loss", CURVATURE, icfg.damping, icfg.compression)
    stored = ScoreSet.load(path)
    if key not in stored:
        return None
    s = stored[key][: len(reference_scores)]
    rel = float((s - reference_scores).abs().max() / s.abs().max().clamp_min(1e-30))
    return f"reference vs the influence stage's {key.label}: max relative difference {rel:.2e}"


# ------------------------------------------------------------------------------------------
# --smoke: a tiny workspace made in seconds
# ------------------------------------------------------------------------------------------


#: The smoke profile's model, schedule and curvature rows (configs/smoke.yaml) and what the
#: benchmark reads of ``influence``; every other section keeps the schema's defaults.
SMOKE_SECTIONS = {
    "model": {"base_channels": 8, "norm_groups": 4},
    "diffusion": {"num_timesteps": 100, "beta_start": 0.001, "beta_end": 0.2},
    "train": {"steps": 300, "batch_size": 32, "lr": 0.003, "warmup_steps": 10, "ema_decay": 0.9},
    "curvature": {"num_draws": 2},
    "influence": {"batch_size": 32, "timesteps": (5, 50)},
}
SMOKE_SUBSETS, SMOKE_SEEDS, SMOKE_RETRAIN_STEPS = 8, 2, 100


def smoke_config() -> Config:
    """The default config with :data:`SMOKE_SECTIONS` replaced, each section validated on its
    own (the cross-section rules of other profiles' sections, e.g. for retraining, are not
    the benchmark's business)."""
    base = Config()
    return base.model_copy(
        update={
            name: type(getattr(base, name))(**values) for name, values in SMOKE_SECTIONS.items()
        }
    )


def build_smoke_workspace(root: Path, threads: int) -> None:
    """A workspace in the pipeline's layout with the smoke profile's model and schedule:
    64 digits-2 images, 8 generated queries, 8 random halves x 2 shared seeds retrained for
    100 steps and measured with 64 common draws. Made once (``root/READY`` records the
    recipe; a changed recipe rebuilds it)."""
    from diffusion_attribution.curvature.fit import fit_kfac
    from diffusion_attribution.diffusion.datasets import load_digits
    from diffusion_attribution.diffusion.ddpm import sample
    from diffusion_attribution.diffusion.likelihood import quantize
    from diffusion_attribution.diffusion.measurements import DiffusionLoss
    from diffusion_attribution.diffusion.training import build_model, save_model, train_ddpm
    from diffusion_attribution.diffusion.unet import kfac_parameters
    from diffusion_attribution.evaluation.ground_truth import measure
    from diffusion_attribution.evaluation.lds import subset_masks
    from diffusion_attribution.pipeline.schedule import schedule_of

    recipe = repr((SMOKE_SECTIONS, SMOKE_SUBSETS, SMOKE_SEEDS, SMOKE_RETRAIN_STEPS))
    ready = root / "READY"
    if ready.exists() and ready.read_text().splitlines()[0] == recipe:
        return
    torch.set_num_threads(threads)
    start = time.perf_counter()
    config = smoke_config()
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(dump_config(config))  # for reference: not read back
    ws = Workspace(root, device="cpu", threads=threads)
    ds = load_digits(config.data.digits_classes).subset(torch.arange(64))
    ds.save(ws.out(ws.TRAIN_SET))
    schedule = schedule_of(config.diffusion)
    shape = tuple(ds.images.shape[1:])
    train_cfg = config.train
    full = train_ddpm(lambda: build_model(config.model, shape), ds.images, schedule, train_cfg)
    net = full.ema_model.eval()
    save_model(ws.out(ws.MODEL), net, config.model, shape)
    res = sample(net, schedule, 8, shape, seed=config.sample.seed, record_trajectory=True)
    images = quantize(res.x0.clamp(-1, 1), pixel_levels(load_dataset(ws).name))
    atomic_save({"images": images, "trajectory": res.trajectory}, ws.out(ws.SAMPLES))
    ccfg = config.curvature
    d = DiffusionLoss(schedule).draw(ds.images, torch.arange(len(ds)), ccfg.num_draws, ccfg.seed)
    K = fit_kfac(net, kfac_parameters(net), schedule, ds.images, d["t"], d["eps"], mc_seed=2)
    K.save(ws.out(ws.CURVATURE.format(variant=CURVATURE)))
    masks = subset_masks(len(ds), SMOKE_SUBSETS, 0.5, seed=5)
    loss = {"loss": DiffusionLoss(schedule)}
    measured = torch.zeros(len(images), len(masks), SMOKE_SEEDS, dtype=torch.float64)
    for k in range(SMOKE_SEEDS):  # shared seeds: seed k fixes the init and the batch/noise stream
        cfg_k = train_cfg.model_copy(update={"steps": SMOKE_RETRAIN_STEPS, "seed": 100 + k})
        for i, mask in enumerate(masks):
            sub = train_ddpm(
                lambda: build_model(config.model, shape),
                ds.images[mask],
                schedule,
                cfg_k,
                progress=False,
            ).ema_model
            measured[:, i, k] = measure(sub, loss, images, {"loss": 64}, config.measure.seed)[
                "loss"
            ]
    atomic_save(
        {"subsets": {"loss": measured}, "masks": masks, "num_draws": {"loss": 64}},
        ws.out(ws.GROUND_TRUTH),
    )
    ready.write_text(f"{recipe}\nbuilt in {time.perf_counter() - start:.0f} s\n")
    print(f"smoke workspace built in {time.perf_counter() - start:.0f} s: {root}")


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [*SETTINGS, *ALIASES]
    p.add_argument("--settings", nargs="+", choices=names, default=list(SETTINGS), metavar="S")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default DA_THREADS)")
    p.add_argument("--root", type=Path, default=Path("."), help="workspace root (outputs/ in it)")
    p.add_argument("--params", type=Path, default=None, help="default: ROOT/params.yaml")
    p.add_argument("--cache", type=Path, default=None, help="default: ROOT/.cache/bench_kfac_draws")
    p.add_argument("--recompute", action="store_true", help="ignore cached score matrices")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="run on a tiny self-made workspace under .cache/bench_kfac_draws/smoke",
    )
    args = p.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    if args.smoke:
        args.root = repo / ".cache" / "bench_kfac_draws" / "smoke"
        build_smoke_workspace(args.root, args.threads or 2)
    root = args.root.resolve()
    config = smoke_config() if args.smoke else load_config(args.params or root / "params.yaml")
    ws = Workspace(root, threads=args.threads)
    ws.set_threads()
    missing = [
        f
        for f in (
            ws.TRAIN_SET,
            ws.MODEL,
            ws.SAMPLES,
            ws.CURVATURE.format(variant=CURVATURE),
            ws.GROUND_TRUTH,
        )
        if not ws.path(f).exists()
    ]
    if missing:
        sys.exit(
            f"missing pipeline outputs under {root}: {', '.join(missing)}\n"
            "run the pipeline first (dvc repro), or try --smoke"
        )
    cache = (args.cache or root / ".cache" / "bench_kfac_draws").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    selected = list(dict.fromkeys(ALIASES.get(n, n) for n in args.settings))
    start = time.perf_counter()
    table, info = run_sweep(ws, config, selected, cache, recompute=args.recompute)
    wall = time.perf_counter() - start

    print(
        f"\nloss LDS of K-FAC influence ({CURVATURE}, damping {config.influence.damping:g}, "
        f"{config.influence.compression} queries): {info['queries']} queries x "
        f"{info['train']} training examples, {info['subsets']} subsets x {info['seeds']} seeds"
        f"; {ws.threads} threads"
    )
    if info["bounds"]:
        print("exact retraining: " + "; ".join(f"{k} {v}" for k, v in info["bounds"].items()))
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(
            table.to_string(
                formatters={
                    "LDS": "{:.4f}".format,
                    "stderr": "{:.4f}".format,
                    "seconds": "{:.1f}".format,
                    "x reference time": "{:.2f}".format,
                    "rows/s": "{:,.0f}".format,
                    "gradient rows": "{:,}".format,
                }
            )
        )
    if info["ekfac_fit_seconds"] is not None:
        print(f"EK-FAC fit (not in 'seconds'): {info['ekfac_fit_seconds']:.1f} s")
    agreement = check_against_pipeline(ws, config, info["reference_scores"])
    if agreement:
        print(agreement)
    print(
        f"computed in this run: {info['computed_seconds']:.1f} s of score passes; "
        f"wall time {wall:.1f} s (inputs fingerprint {info['fingerprint']})"
    )
    if args.json:
        args.json.write_text(json.dumps(table.reset_index().to_dict(orient="records"), indent=2))


if __name__ == "__main__":
    main()
