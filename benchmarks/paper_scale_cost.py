"""Device-hours per stage of the paper-scale profiles, derived from measured throughput.

Reads one ``gpu_paper_scale.json`` (``benchmarks/gpu_paper_scale.py``, run on a GPU or, with
``--device cpu``, on a CPU) and the profiles' counts (``configs/cifar2.yaml``,
``configs/cifar10.yaml``), and prints for every stage the hours on the device that measured
the throughput, divided by ``--speedup`` (1 when the JSON comes from the GPU to estimate; an
assumed device ratio when it comes from a CPU), with the formula that gave each number.

    python benchmarks/gpu_paper_scale.py --device cpu --threads 2 --budget 600 --out /tmp/gps
    python benchmarks/paper_scale_cost.py /tmp/gps/gpu_paper_scale.json --speedup 140

Throughput used (all from the JSON): ``train.images_per_second`` (AdamW steps at batch 128),
``sample.probe_seconds_per_step`` (one denoising step of a 200-image batch; also the forward
rate of the measurements), ``gradients.rows_per_second`` (per-example gradients, one row per
(example, draw)), ``kfac_fit`` (rows per second of the factor pass, and the fixed cost of the
eigendecompositions), ``projection`` (seconds per gradient at k = 32768).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"CIFAR-2": "configs/cifar2.yaml", "CIFAR-10": "configs/cifar10.yaml"}


def rates(bench: dict) -> dict[str, float]:
    """Seconds per unit of work, read from a ``gpu_paper_scale.json``."""
    sec = bench["sections"]
    kfit = sec["kfac_fit"]
    fits = [f for f in kfit["fits"] if "seconds" in f]
    if kfit.get("rows_per_second"):
        fit_row, fixed = 1 / kfit["rows_per_second"], kfit["fixed_seconds"]
    else:  # one fit only: its whole time counted per row (an upper bound), no fixed part
        fit_row, fixed = fits[0]["seconds"] / fits[0]["rows"], 0.0
    proj = sec["projection"]
    proj_s = proj.get("seconds", proj.get("probe_seconds") * proj["dim"] / proj["probe_dim"])
    return {
        "train_image": 1 / sec["train"]["images_per_second"],
        "forward_image": sec["sample"]["probe_seconds_per_step"] / sec["sample"]["batch_size"],
        "gradient_row": 1 / sec["gradients"]["rows_per_second"],
        "fit_row": fit_row,
        "eigh": fixed,
        "projection_gradient": proj_s / proj["batch_size"],
    }


def stage_seconds(cfg: dict, r: dict[str, float], num_train: int) -> dict[str, tuple[float, str]]:
    """``{stage: (device seconds, formula)}`` for one profile ``cfg`` (a parsed params file)."""
    tr, sm, cu, inf = cfg["train"], cfg["sample"], cfg["curvature"], cfg["influence"]
    trak, re_, me, cf = cfg["trak"], cfg["retrain"], cfg["measure"], cfg["counterfactual"]
    T = cfg["diffusion"]["num_timesteps"]
    pairs = {v.removeprefix("ekfac_") for v in cu["variants"]}
    ek = sum(v.startswith("ekfac_") for v in cu["variants"])
    fit_rows = num_train * cu["num_draws"]
    n_meas = len(inf["ablation_measurements"]) + len(inf["timesteps"])
    subset_steps = re_["steps"]
    ref_steps = round(subset_steps / re_["fraction"])  # the references' epochs match
    models = re_["num_subsets"] * re_["num_seeds"] + re_["independent_subsets"]
    removals = cf["num_queries"] * len(cf["fractions"]) * (len(cf["methods"]) - 1) + len(
        cf["fractions"]
    )
    meas_rows = me["num_queries"] * (3 * me["draws"] + len(inf["timesteps"]) * me["timestep_draws"])
    out = {
        "train": (
            tr["steps"] * tr["batch_size"] * r["train_image"],
            f"{tr['steps']} steps x {tr['batch_size']} images x train s/image",
        ),
        "sample": (
            math.ceil(sm["num_samples"] / sm["batch_size"])
            * T
            * sm["batch_size"]
            * r["forward_image"],
            f"{sm['num_samples']} samples x {T} steps x forward s/image",
        ),
        "curvature": (
            (len(pairs) + ek) * fit_rows * r["fit_row"] + len(pairs) * r["eigh"],
            f"{len(pairs) + ek} passes x {num_train} x {cu['num_draws']} rows x fit s/row "
            f"+ {len(pairs)} x eigh",
        ),
        "influence (one query block)": (
            num_train * inf["train_draws"] * r["gradient_row"]
            + sm["num_samples"] * inf["query_draws"] * n_meas * r["gradient_row"],
            f"({num_train} x {inf['train_draws']} training + {sm['num_samples']} x "
            f"{inf['query_draws']} x {n_meas} query) rows x gradient s/row",
        ),
        "baselines (TRAK, D-TRAK)": (
            2 * num_train * (inf["train_draws"] * r["gradient_row"] + r["projection_gradient"]),
            f"2 x {num_train} x ({inf['train_draws']} rows x gradient s/row + projection at "
            f"k = {trak['projection_dim']})",
        ),
        "retrain": (
            (models * subset_steps + re_["num_seeds"] * ref_steps)
            * tr["batch_size"]
            * r["train_image"],
            f"({models} models x {subset_steps} steps + {re_['num_seeds']} references x "
            f"{ref_steps} steps) x {tr['batch_size']} images x train s/image",
        ),
        "measure": (
            (models + re_["num_seeds"] + 1) * meas_rows * r["forward_image"],
            f"{models + re_['num_seeds'] + 1} models x {me['num_queries']} samples x (3 x {me['draws']} + "
            f"{len(inf['timesteps'])} x {me['timestep_draws']}) forward rows",
        ),
        "counterfactual": (
            removals * (tr["steps"] * tr["batch_size"] * r["train_image"])
            + removals * me["draws"] * r["forward_image"],
            f"{removals} models x {tr['steps']} steps x {tr['batch_size']} images x train "
            "s/image (+ measuring)",
        ),
    }
    return out


def num_train_of(cfg: dict) -> int:
    data = cfg["data"]
    return data["cifar2_size"] if data["dataset"] == "cifar2" else 50_000


def hours(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(bench: dict, speedup: float) -> str:
    r = rates(bench)
    costs = {}
    for name, path in PROFILES.items():
        cfg = yaml.safe_load((ROOT / path).read_text())
        costs[name] = stage_seconds(cfg, r, num_train_of(cfg))
    device = bench["device_name"] + f" ({bench['device']}, {bench['threads']} threads)"
    lines = [
        f"Hours per stage: at the rates measured on {device} (`benchmarks/gpu_paper_scale.py "
        f"--probe`), and on one GPU assumed {speedup:g}x faster (`benchmarks/paper_scale_cost.py "
        f"--speedup {speedup:g}`):",
        "",
        "| stage | CIFAR-2, measured device | CIFAR-2, GPU | CIFAR-10, GPU | derived as (CIFAR-2 counts) |",
        "|---|---|---|---|---|",
    ]
    totals = {"here": 0.0, **dict.fromkeys(PROFILES, 0.0)}
    for stage, (seconds, formula) in costs["CIFAR-2"].items():
        gpu = {p: costs[p][stage][0] / 3600 / speedup for p in PROFILES}
        totals["here"] += seconds / 3600
        for p in PROFILES:
            totals[p] += gpu[p]
        lines.append(
            f"| {stage} | {hours(seconds / 3600)} | {hours(gpu['CIFAR-2'])} | "
            f"{hours(gpu['CIFAR-10'])} | {formula} |"
        )
    lines.append(
        f"| **total** | **{hours(totals['here'])}** | **{hours(totals['CIFAR-2'])}** | "
        f"**{hours(totals['CIFAR-10'])}** | |"
    )
    lines += ["", "Seconds per unit measured: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "json", type=Path, nargs="+", help="gpu_paper_scale.json files (later sections override)"
    )
    ap.add_argument(
        "--speedup", type=float, default=1.0, help="assumed GPU / measured-device ratio"
    )
    args = ap.parse_args()
    bench = json.loads(args.json[0].read_text())
    for path in args.json[1:]:
        bench["sections"].update(
            (k, v)
            for k, v in json.loads(path.read_text())["sections"].items()
            if v.get("status") == "ok"
        )
    print(table(bench, args.speedup))


if __name__ == "__main__":
    main()
