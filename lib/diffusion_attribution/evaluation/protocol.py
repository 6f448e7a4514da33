"""The paper's evaluation protocol (App. G.2-G.6) and every way a run departs from it.

:data:`PAPER` holds the paper's CIFAR-2 settings; :func:`deviations` puts them beside a
config's in one table (setting, paper, this run, why, measured effect), which the evaluation
notebook shows and the README copies. Effects are only quoted where this run measures them
(:func:`budget_effects`: fewer seeds, fewer subsets, on the same models); the others say what
would measure them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import pandas as pd
import torch
from pydantic import BaseModel

from diffusion_attribution.core.sections import epoch_matched_steps
from diffusion_attribution.evaluation.lds import lds, paired_difference, predicted_changes

#: The paper's CIFAR-2 protocol (App. G): values as the paper states them.
PAPER = {
    "dataset": "CIFAR-2 (5000 images, 32x32x3)",
    "model": "Ho et al. (2020) U-Net, 35.7 M parameters",
    "full_steps": 32000,
    "subset_steps": 16000,
    "epochs": 800,
    "num_subsets": 100,
    "num_seeds": 5,
    "num_queries": 200,
    "measurement_draws": 5000,
    "gradient_draws": "125-250 per example",
    "projection_dim": 32768,
    "counterfactual_samples": 5,
    "counterfactual_fractions": "2%, 10%",
    "damping": 1e-8,
    "trak_precision": "float32",
}


def epochs(steps: int, batch_size: int, num_examples: int) -> float:
    """Passes over ``num_examples`` images in ``steps`` steps of ``batch_size`` (capped at the
    data size, as training caps it)."""
    return steps * min(batch_size, num_examples) / num_examples


def deviations(
    sections: Mapping[str, BaseModel], num_train: int, effects: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per protocol setting: the paper's value, this run's, why they differ, and the
    measured effect where ``effects`` (by setting name, e.g. from :func:`budget_effects`) has
    one. ``sections``: the config sections ``data``, ``model``, ``train``, ``retrain``,
    ``measure``, ``counterfactual``, ``influence`` and ``trak`` by name; ``num_train`` the size
    of this run's training set."""
    config = SimpleNamespace(**sections)
    t, r, m, cf = config.train, config.retrain, config.measure, config.counterfactual
    effects = effects or {}
    n_sub = round(r.fraction * num_train)
    matched = r.steps == epoch_matched_steps(t.steps, r.fraction)
    budget = "two-core CPU budget of the default run"
    rows = [
        ("training set", PAPER["dataset"], f"{config.data.dataset} ({num_train} images)", budget),
        (
            "model",
            PAPER["model"],
            f"U-Net, base {config.model.base_channels} channels, "
            f"multipliers {list(config.model.channel_mults)}",
            budget,
        ),
        (
            "full model",
            f"{PAPER['full_steps']} steps ({PAPER['epochs']} epochs)",
            f"{t.steps} steps ({epochs(t.steps, t.batch_size, num_train):.0f} epochs)",
            budget,
        ),
        (
            "subset models",
            f"{PAPER['subset_steps']} steps: the full model's epochs",
            f"{r.steps} steps ({epochs(r.steps, t.batch_size, n_sub):.0f} epochs)"
            + ("" if matched else ": NOT epoch-matched (retrain.epoch_matched: false)"),
            "as the paper" if matched else "explicit override",
        ),
        ("subsets M", PAPER["num_subsets"], r.num_subsets, budget),
        ("seeds K", PAPER["num_seeds"], r.num_seeds, budget),
        (
            "seed design",
            "not stated",
            f"shared seeds {r.seeds[0]}..{r.seeds[-1]}, disjoint from the full model's; "
            f"{r.independent_subsets} independent-seed models as a check",
            "common random numbers make a small M go further",
        ),
        ("generated samples (LDS)", PAPER["num_queries"], m.num_queries, budget),
        ("measurement draws per sample", PAPER["measurement_draws"], m.draws, budget),
        (
            "(t, eps) draws per gradient",
            PAPER["gradient_draws"],
            f"{config.influence.train_draws} train, {config.influence.query_draws} query",
            "as the paper",
        ),
        ("TRAK projection dimension", PAPER["projection_dim"], config.trak.projection_dim, budget),
        (
            "counterfactual",
            f"{PAPER['counterfactual_samples']} samples, {PAPER['counterfactual_fractions']} "
            "removed, full model's steps",
            f"{cf.num_queries} samples, "
            + ", ".join(f"{f:.0%}" for f in cf.fractions)
            + f" removed, {t.steps} steps (the full model's)",
            "as the paper" if cf.num_queries >= PAPER["counterfactual_samples"] else budget,
        ),
        ("K-FAC damping", PAPER["damping"], config.influence.damping, "as the paper"),
        (
            "TRAK precision",
            PAPER["trak_precision"],
            "float32 (and traker's float16 pipeline for Fig. 18)",
            "as the paper",
        ),
    ]
    table = pd.DataFrame(rows, columns=["setting", "paper (CIFAR-2)", "this run", "why"])
    table["measured effect"] = [effects.get(s, "") for s in table.setting]
    return table.astype(str).set_index("setting")


def budget_effects(
    scores: torch.Tensor, measured: torch.Tensor, masks: torch.Tensor
) -> dict[str, str]:
    """What fewer seeds and fewer subsets do to one method's LDS on the same models:
    ``scores`` (Q, N) of the method for the loss, ``measured`` (Q, M, K) the loss on the
    subset models, ``masks`` (M, N). K - 1 seeds: the LDS against the mean of the first K - 1
    seeds, as a paired difference with the K-seed LDS (what one more seed would add is of the
    same sign, smaller); M / 2 subsets: the LDS and its standard error on the first half."""
    Q, M, K = measured.shape
    pred = predicted_changes(scores[:Q], masks)
    full = lds(pred, measured)
    out = {}
    if K > 2:
        fewer = lds(pred, measured[:, :, : K - 1])
        d = paired_difference(fewer.per_query, full.per_query)
        out["seeds K"] = (
            f"K-FAC LDS {full.mean:.3f} with K = {K}, {fewer.mean:.3f} with K = {K - 1} "
            f"(difference {d.mean:+.3f} ± {d.stderr:.3f})"
        )
    half = lds(pred[:, : M // 2], measured[:, : M // 2])
    out["subsets M"] = (
        f"K-FAC LDS {full.mean:.3f} ± {full.stderr:.3f} with M = {M}, "
        f"{half.mean:.3f} ± {half.stderr:.3f} with M = {M // 2}"
    )
    out["generated samples (LDS)"] = (
        f"standard error {full.stderr:.3f} over {Q} samples; 200 would give about "
        f"{full.stderr * (Q / 200) ** 0.5:.3f}"
    )
    return out
