"""The protocol table: the paper's settings beside a config's, with measured effects."""

from pathlib import Path

import torch

from diffusion_attribution.core.config import Config, load_config
from diffusion_attribution.evaluation.lds import subset_masks
from diffusion_attribution.evaluation.protocol import (
    AUTHORS_CODE,
    FIT_DRAWS,
    PAPER,
    PROJECTION_DIM,
    budget_effects,
    deviations,
    protocol_effects,
)

ROOT = Path(__file__).resolve().parents[2]


def sections(c: Config) -> dict:
    names = (
        "data", "model", "diffusion", "train", "curvature", "retrain", "measure",
        "counterfactual", "influence", "trak",
    )  # fmt: skip
    return {n: getattr(c, n) for n in names}


def test_default_is_epoch_matched_and_names_every_budget_deviation():
    c = Config()
    t = deviations(sections(c), num_train=357, effects={"seeds K": "measured"})
    assert t.loc["subset models", "why"] == "as the paper"
    assert "NOT epoch-matched" not in t.loc["subset models", "this run"]
    assert t.loc["seeds K", "paper (CIFAR-2)"] == str(PAPER["num_seeds"])
    assert t.loc["seeds K", "this run"] == str(c.retrain.num_seeds)
    assert t.loc["seeds K", "measured effect"] == "measured"
    assert t.loc["counterfactual", "why"] == "as the paper"  # 5 samples, full steps
    assert "full model's" in t.loc["counterfactual", "this run"]
    # an explicit override shows up as one
    raw = c.model_dump(mode="json")
    raw["retrain"].update(steps=200, epoch_matched=False)
    off = deviations(sections(Config.model_validate(raw)), num_train=357)
    assert "NOT epoch-matched" in off.loc["subset models", "this run"]
    assert off.loc["subset models", "why"] == "explicit override"


def test_budget_effects_on_known_ground_truth():
    g = torch.Generator().manual_seed(0)
    Q, N, M, K = 10, 30, 12, 3
    masks = subset_masks(N, M, 0.5, seed=0)
    scores = torch.randn(Q, N, generator=g, dtype=torch.float64)
    clean = (scores @ (~masks).double().T)[:, :, None]
    measured = clean + 0.3 * torch.randn(Q, M, K, generator=g, dtype=torch.float64)
    e = budget_effects(scores, measured, masks)
    assert set(e) == {"seeds K", "subsets M", "generated samples (LDS)"}
    assert "with K = 3" in e["seeds K"] and "with K = 2" in e["seeds K"]
    assert f"M = {M // 2}" in e["subsets M"]
    assert "budget_effects" not in e  # plain strings, one per setting
    # two seeds only: no K - 1 line (one seed would make no mean)
    assert "seeds K" not in budget_effects(scores, measured[:, :, :2], masks)


def point(lds: float, diff: float, heldout: bool = False) -> dict:
    row = {"lds": lds, "stderr": 0.02, "damping": 1.0,
           "difference_vs_configured": {"mean": diff, "stderr": 0.005}}  # fmt: skip
    if heldout:
        row["heldout"] = {"lds": lds - 0.01, "stderr": 0.02, "chosen": [1.0, 10.0],
                          "difference_vs_configured": {"mean": diff, "stderr": 0.006}}  # fmt: skip
    return row


#: metrics/protocol.json as the protocol stage writes it (hand-made numbers).
PROTOCOL_METRICS = {
    "fit_draws": {
        "skipped": False,
        "configured": 8,
        "kfac": {"8": point(0.41, 0.0), "32": point(0.415, 0.005), "128": point(0.42, 0.01)},
    },
    "projection_dims": {
        "skipped": False,
        "configured": 2048,
        "trak": {"2048": point(0.3, 0.0, True), "32768": point(0.34, 0.04, True)},
        "d-trak": {"2048": point(0.32, 0.0, True), "32768": point(0.35, 0.03, True)},
    },
}


def test_protocol_effects_quote_every_value_with_its_paired_difference():
    e = protocol_effects(PROTOCOL_METRICS)
    assert set(e) == {FIT_DRAWS, PROJECTION_DIM}
    fit = e[FIT_DRAWS]
    assert "0.410 ± 0.020 at 8, 0.415 ± 0.020 at 32 (+0.005 ± 0.005)" in fit
    assert "128 (+0.010 ± 0.005) draws" in fit and "this run's 8" in fit
    proj = e[PROJECTION_DIM]
    assert "TRAK* 0.300 ± 0.020 at k = 2048, 0.340 ± 0.020 at k = 32768 (+0.040 ± 0.005)" in proj
    assert "D-TRAK* 0.320 ± 0.020 at k = 2048" in proj
    assert "TRAK at the held-out damping 0.290 ± 0.020 at k = 2048" in proj
    assert "(+0.030 ± 0.006)" in proj  # D-TRAK's held-out difference
    # skipped parts say so; absent parts give no entry; no metrics, no effects
    skipped = {
        "fit_draws": {"skipped": True, "configured": 8, "why": "protocol.fit_draws is empty"}
    }
    assert protocol_effects(skipped) == {
        FIT_DRAWS: "not measured in this run (protocol.fit_draws is empty)"
    }
    assert protocol_effects({}) == {}


def test_deviations_rows_beyond_the_budget():
    c = Config()
    t = deviations(sections(c), num_train=357, protocol_metrics=PROTOCOL_METRICS)
    assert t.loc[FIT_DRAWS, "this run"] == str(c.curvature.num_draws)
    assert "125-250" in t.loc[FIT_DRAWS, "paper (CIFAR-2)"]
    assert "compute_influence_ekfac_cifar2.yaml" in t.loc[FIT_DRAWS, "paper (CIFAR-2)"]
    assert t.loc[FIT_DRAWS, "measured effect"] == protocol_effects(PROTOCOL_METRICS)[FIT_DRAWS]
    assert t.loc[PROJECTION_DIM, "measured effect"].startswith("loss LDS, TRAK*")
    # values the paper's text does not give name the authors' file
    for setting in ("measurement draws per sample", "(t, eps) draws per gradient", "draws per l_t"):
        assert "not in the paper's text" in t.loc[setting, "paper (CIFAR-2)"], setting
        assert AUTHORS_CODE in t.loc[setting, "paper (CIFAR-2)"], setting
    assert "5000" in t.loc["measurement draws per sample", "paper (CIFAR-2)"]
    assert t.loc["draws per l_t", "this run"] == str(c.measure.timestep_draws)
    assert t.loc["reverse-process variance (ELBO)", "why"] == "as the authors' ELBO"
    assert "seed=$IDX" in t.loc["counterfactual seed", "paper (CIFAR-2)"]
    assert str(c.train.seed) in t.loc["counterfactual seed", "this run"]
    # the recipe against Ho et al.: the default departs, a paper-scale profile does not
    recipe = ("dropout", "learning rate", "EMA decay", "batch size", "warm-up")
    assert all(t.loc[r, "why"] != "as the paper" for r in recipe)
    assert t.loc["EMA decay", "this run"].startswith(
        f"{c.train.ema_decay} (averages over about 200"
    )
    cifar2 = load_config(ROOT / "configs" / "cifar2.yaml")
    t2 = deviations(sections(cifar2), num_train=5000)
    assert all(t2.loc[r, "why"] == "as the paper" for r in recipe), t2.loc[list(recipe), "why"]
    assert t2.loc[FIT_DRAWS, "measured effect"] == ""
