"""The paper's evaluation protocol (App. G.2-G.6) and every way a run departs from it.

:data:`PAPER` holds the paper's CIFAR-2 settings; :func:`deviations` puts them beside a
config's in one table (setting, paper, this run, why, measured effect), which the evaluation
notebook shows and the README copies. Effects are only quoted where this run measures them
(:func:`budget_effects`: fewer seeds, fewer subsets, on the same models; :func:`protocol_effects`:
the K-FAC fit's draws and TRAK's projection dimension, from the ``protocol`` stage's metrics);
the others say what would measure them.

Where a value is not in the paper's text but in its authors' code (:data:`AUTHORS_CODE`, read
in the public code index), the row says so and names the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import pandas as pd
import torch
from pydantic import BaseModel

from diffusion_attribution.core.sections import epoch_matched_steps
from diffusion_attribution.evaluation.lds import lds, paired_difference, predicted_changes

#: The paper's authors' code, where a value of the protocol is set that the paper's text does not
#: state (files of that repository, read in the public code index).
AUTHORS_CODE = "BrunoKM/diffusion-influence"

#: The paper's CIFAR-2 protocol (App. G): values as the paper states them, or, where its text
#: does not, as its authors' code sets them (the row names the file).
PAPER = {
    "dataset": "CIFAR-2 (5000 images, 32x32x3)",
    "model": "Ho et al. (2020) U-Net, 35.7 M parameters",
    "full_steps": 32000,
    "subset_steps": 16000,
    "epochs": 800,
    "num_subsets": 100,
    "num_seeds": 5,
    "num_queries": 200,
    "measurement_draws": f"5000 (not in the paper's text: {AUTHORS_CODE}, README.md, "
    "num_samples_for_measurement=5000 for scripts/compute_measure_function.py)",
    "gradient_draws": f"125-250 per example (not in the paper's text: {AUTHORS_CODE}, "
    "scripts/configs/compute_influence_ekfac_cifar2.yaml, num_samples_for_loss_scoring: 125 x "
    "num_loss_batch_aggregations: 2)",
    "fit_draws": f"125-250 per example (not in the paper's text: {AUTHORS_CODE}, "
    "scripts/configs/compute_influence_ekfac_cifar2.yaml, kfac.num_samples_for_loss: 125, "
    "'half of 250' for EK-FAC's two passes)",
    "projection_dim": 32768,
    "counterfactual_samples": 5,
    "counterfactual_fractions": "2%, 10%",
    "damping": 1e-8,
    "trak_precision": "float32",
    # the training recipe: "the training procedure outlined in Ho et al. (2020)" (App. G.5),
    # their CIFAR-10 values; the authors' CIFAR-2 code differs where the row says
    "dropout": 0.1,
    "lr": 2e-4,
    "ema_decay": 0.9999,
    "batch_size": 128,
    "warmup_steps": 5000,
}

#: Setting names of the rows whose effect the ``protocol`` stage measures
#: (:func:`protocol_effects`).
FIT_DRAWS, PROJECTION_DIM = "(t, eps) draws per example, K-FAC fit", "TRAK projection dimension"
#: The row of the empirical Fisher's form, whose effect the ``evaluate`` stage measures (Fig. 4).
EMPIRICAL_FISHER = "empirical Fisher (eq. 11)"


def epochs(steps: int, batch_size: int, num_examples: int) -> float:
    """Passes over ``num_examples`` images in ``steps`` steps of ``batch_size`` (capped at the
    data size, as training caps it)."""
    return steps * min(batch_size, num_examples) / num_examples


def _same(ours: object, paper: object, why: str) -> str:
    return "as the paper" if ours == paper else why


def recipe_rows(config: SimpleNamespace) -> list[tuple[str, str, str, str]]:
    """The training recipe against Ho et al. (2020), which App. G.5 follows (``model`` and
    ``train`` sections), and the authors' CIFAR-2 values where they differ."""
    t = config.train
    cifar2 = f"{AUTHORS_CODE}, scripts/configs/cifar2_ddpm.yaml"
    horizon = 1 / (1 - t.ema_decay) if t.ema_decay < 1 else float("inf")
    short = f"{t.steps} steps instead of {PAPER['full_steps']}"
    return [
        (
            "dropout",
            f"{PAPER['dropout']} (Ho et al.; authors' code: 0.1, {AUTHORS_CODE}, "
            "scripts/model_configs/unet_cifar2.json)",
            str(config.model.dropout),
            _same(config.model.dropout, PAPER["dropout"], "tiny U-Net, short training"),
        ),
        (
            "learning rate",
            f"{PAPER['lr']:g} (Ho et al.; authors' code: 1e-4, {cifar2}), cosine schedule",
            f"{t.lr:g}, warm-up then cosine",
            _same(t.lr, PAPER["lr"], f"{short}: larger steps"),
        ),
        (
            "EMA decay",
            f"{PAPER['ema_decay']} (Ho et al.; authors' code: 0.999 with EMA warm-up, {cifar2})",
            f"{t.ema_decay} (averages over about {horizon:.0f} steps)",
            _same(
                t.ema_decay,
                PAPER["ema_decay"],
                f"{short}: the average must be shorter than the run",
            ),
        ),
        (
            "batch size",
            f"{PAPER['batch_size']} (Ho et al.; authors' code: 128, {cifar2})",
            str(t.batch_size),
            _same(t.batch_size, PAPER["batch_size"], "two-core CPU budget of the default run"),
        ),
        (
            "warm-up",
            f"{PAPER['warmup_steps']} steps (Ho et al.; authors' code: 10% of the steps, {cifar2})",
            f"{t.warmup_steps} steps ({100 * t.warmup_steps / t.steps:.0f}% of {t.steps})",
            _same(
                t.warmup_steps,
                PAPER["warmup_steps"],
                f"{short}: a fraction of them, as the authors' code does",
            ),
        ),
    ]


def measurement_rows(config: SimpleNamespace) -> list[tuple[str, str, str, str]]:
    """What the paper's text leaves to its code: the ELBO's reverse-process variance, the draws
    per l_t and the counterfactual's seed (``diffusion``, ``measure``, ``train`` sections)."""
    variance = config.diffusion.variance
    return [
        (
            "reverse-process variance (ELBO)",
            "not in the paper's text; authors' code: fixed_large (sigma_t^2 = beta_t) for the "
            f"ELBO whatever the sampler uses ({AUTHORS_CODE}, diffusion_influence/diffusion/"
            "elbo.py), fixed_small for sampling (scripts/configs/cifar2_ddpm.yaml)",
            f"{variance}, for the ELBO and for sampling",
            "as the authors' ELBO" if variance == "fixed_large" else "explicit choice",
        ),
        (
            "draws per l_t",
            "not in the paper's text; authors' code: num_samples_for_measurement for every "
            f"measurement, l_t included ({AUTHORS_CODE}, scripts/compute_measure_function.py, "
            "LOSS_AT_TIME; 5000 in its README's commands)",
            str(config.measure.timestep_draws),
            "two-core CPU budget of the default run",
        ),
        (
            "counterfactual seed",
            "not in the paper's text (App. G.6: the full model's procedure and steps); authors' "
            f"README.md ({AUTHORS_CODE}): each model retrained with seed=$IDX, not the full "
            "model's seed 0, and measured with seed 711 against the full model's seed-0 "
            "measurement",
            f"the full model's seed {config.train.seed} for every model, measured with the "
            "ground truth's draws (measure.seed) against the full model itself",
            "common random numbers: the change reflects the removed data, not another seed",
        ),
    ]


def deviations(
    sections: Mapping[str, BaseModel],
    num_train: int,
    effects: dict[str, str] | None = None,
    protocol_metrics: Mapping | None = None,
) -> pd.DataFrame:
    """One row per protocol setting: the paper's value, this run's, why they differ, and the
    measured effect where ``effects`` (by setting name, e.g. from :func:`budget_effects` and
    :func:`protocol_effects`) has one. ``sections``: the config sections ``data``, ``model``,
    ``diffusion``, ``train``, ``curvature``, ``retrain``, ``measure``, ``counterfactual``,
    ``influence`` and ``trak`` by name; ``num_train`` the size of this run's training set;
    ``protocol_metrics``: the ``protocol`` stage's metrics, when it ran, whose
    :func:`protocol_effects` are added to ``effects``."""
    config = SimpleNamespace(**sections)
    t, r, m, cf = config.train, config.retrain, config.measure, config.counterfactual
    effects = {**(effects or {}), **protocol_effects(protocol_metrics or {})}
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
        (FIT_DRAWS, PAPER["fit_draws"], config.curvature.num_draws, budget),
        (
            EMPIRICAL_FISHER,
            "eq. 11: the outer product of each example's gradient of its loss (its draws' mean); "
            f"authors' code ({AUTHORS_CODE}): each (t, eps) draw's gradient, as TRAK's code",
            "per draw for Fig. 4's claim (the authors' code)"
            + (
                "; per example (eq. 11 as written) beside it, variant example_expand"
                if any(v.startswith("example_") for v in config.curvature.variants)
                else ""
            ),
            "the claim is tested as the authors ran it; eq. 11 as written is measured beside it",
        ),
        (PROJECTION_DIM, PAPER["projection_dim"], config.trak.projection_dim, budget),
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
        *recipe_rows(config),
        *measurement_rows(config),
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


def _series(rows: Mapping[str, Mapping], configured: int, unit: str, heldout: bool = False) -> str:
    """Each value's LDS (best of sweep, or held-out) with its paired difference against the
    configured value's: ``0.412 ± 0.021 at 8 draws, 0.415 ± 0.020 at 32 (+0.003 ± 0.002)``."""
    parts = []
    for value in sorted(rows, key=int):
        r = rows[value]["heldout"] if heldout else rows[value]
        d = r["difference_vs_configured"]
        text = f"{r['lds']:.3f} ± {r['stderr']:.3f} at {unit}{value}"
        parts.append(
            text if int(value) == configured else f"{text} ({d['mean']:+.3f} ± {d['stderr']:.3f})"
        )
    return ", ".join(parts)


def _skipped(part: Mapping) -> str:
    return f"not measured in this run ({part.get('why', 'skipped')})"


def protocol_effects(metrics: Mapping) -> dict[str, str]:
    """The measured effects of the ``protocol`` stage's metrics (``metrics/protocol.json``) as
    the protocol table's "measured effect" strings, by setting name (:data:`FIT_DRAWS`,
    :data:`PROJECTION_DIM`): the loss LDS at each value tried, with its paired difference
    against the run's configured value in brackets (same samples); for TRAK and D-TRAK at the
    best damping of the sweep ("*") and at the damping chosen on held-out subsets. A part the
    stage skipped says so; a part the metrics lack gives no entry."""
    out = {}
    fit = metrics.get("fit_draws")
    if fit is not None:
        out[FIT_DRAWS] = (
            _skipped(fit)
            if fit.get("skipped")
            else f"K-FAC loss LDS {_series(fit['kfac'], fit['configured'], '', False)} draws "
            f"(difference against this run's {fit['configured']} in brackets)"
        )
    proj = metrics.get("projection_dims")
    if proj is not None:
        if proj.get("skipped"):
            out[PROJECTION_DIM] = _skipped(proj)
        else:
            k = proj["configured"]
            parts = []
            for method, label in (("trak", "TRAK"), ("d-trak", "D-TRAK")):
                rows = proj.get(method)
                if not rows:
                    continue
                parts.append(f"{label}* {_series(rows, k, 'k = ')}")
                if all("heldout" in r for r in rows.values()):
                    parts.append(
                        f"{label} at the held-out damping {_series(rows, k, 'k = ', True)}"
                    )
            out[PROJECTION_DIM] = (
                "loss LDS, "
                + "; ".join(parts)
                + f" (difference against this run's k = {k} in brackets)"
            )
    return out
