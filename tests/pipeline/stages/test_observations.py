"""`observations.observations` on the hand-made scores and ground truth of
:mod:`tests.pipeline.stages.world`, and its upper-triangle count by hand."""

import pandas as pd
import pytest

from diffusion_attribution.pipeline.stages.evaluate import evaluate
from diffusion_attribution.pipeline.stages.observations import observations, upper_beats_diagonal
from tests.pipeline.stages.world import TIMESTEPS, VARIANTS


def test_observations_counts_and_claims(world):
    scores, measured, reference, masks = world
    table = evaluate(
        scores, measured, masks, variants=VARIANTS, damping=1e-8, compression="int8"
    ).tables["lds"]
    r = observations(
        scores,
        table,
        measured,
        reference,
        masks,
        variant="mc_expand",
        damping=1e-8,
        compression="int8",
        timesteps=TIMESTEPS,
    )
    assert list(r.tables["fig11"].index) == ["l_t=10", "l_t=100"]
    assert r.metrics["fig11_upper_beats_diagonal"] == len(upper_beats_diagonal(r.tables["fig11"]))
    k = len(r.tables["fig11"])  # l_t of k timesteps: k (k - 1) / 2 pairs t < t'
    assert r.metrics["upper_pairs"] == k * (k - 1) // 2
    assert r.metrics["fig05"]["theta_full"] == pytest.approx(0.0, abs=1e-9)
    ids = [c["id"] for c in r.claims]
    assert ids == ["observation1", "observation2"]
    # predicted and actual changes come from the same true scores: they agree in sign as often
    obs2 = r.metrics["observation2"]["loss"]
    assert abs(obs2["predicted_increase"] - obs2["actual_increase"]) < 0.2
    # ... so the gap's interval does not lie above 0 and the observation is not confirmed
    assert r.metrics["observation2_loss"]["gap"]["low"] <= 0
    assert not r.claims[1]["verdict"].startswith("holds")


def test_upper_beats_diagonal_hand_worked():
    m = pd.DataFrame(
        [[0.5, 0.6, 0.4], [0.0, 0.3, 0.2], [0.0, 0.0, 0.9]], index=list("abc"), columns=list("abc")
    )
    assert upper_beats_diagonal(m) == [("a", "b")]
