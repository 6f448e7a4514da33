"""The protocol table: the paper's settings beside a config's, with measured effects."""

import torch

from diffusion_attribution.core.config import Config
from diffusion_attribution.evaluation.lds import subset_masks
from diffusion_attribution.evaluation.protocol import PAPER, budget_effects, deviations


def sections(c: Config) -> dict:
    names = ("data", "model", "train", "retrain", "measure", "counterfactual", "influence", "trak")
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
