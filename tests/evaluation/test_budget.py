"""A budget setting's LDS on a known ground truth (evaluation/budget.py), and the rule of the
projection-dimension claim (claims.projection_dimension) holding, failing and inconclusive."""

import pytest
import torch

from diffusion_attribution.evaluation.budget import (
    best_of_sweep,
    budget_lds,
    budget_metrics,
    extremes_difference,
)
from diffusion_attribution.evaluation.claims import projection_dimension
from diffusion_attribution.evaluation.findings import PAPER_FINDINGS
from diffusion_attribution.evaluation.lds import LDSResult, lds, predicted_changes, subset_masks

Q, N, M, K = 16, 40, 12, 3


@pytest.fixture(scope="module")
def truth():
    """True scores, subsets and the loss measured as their sum over the removed examples plus
    seed noise; ``noisy(level)`` gives scores that are the truth plus noise of that level."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(Q, N, generator=g, dtype=torch.float64)
    masks = subset_masks(N, M, 0.5, seed=1)
    clean = (true @ (~masks).double().T)[:, :, None]
    measured = clean + 0.5 * torch.randn(Q, M, K, generator=g, dtype=torch.float64)

    def noisy(level: float) -> torch.Tensor:
        return (true + level * torch.randn(Q, N, generator=g, dtype=torch.float64)).float()

    return true, masks, measured, noisy


def test_best_of_sweep_picks_the_best_damping(truth):
    _, masks, measured, noisy = truth
    sweep = {1e-3: noisy(30.0), 1.0: noisy(0.2), 10.0: noisy(3.0)}
    damping, r = best_of_sweep(sweep, measured, masks)
    assert damping == 1.0
    assert r.mean == lds(predicted_changes(sweep[1.0], masks), measured).mean
    nan = torch.full((Q, N), 1.0)  # constant scores: every per-query LDS is NaN
    assert best_of_sweep({0.5: nan, 2.0: noisy(1.0)}, measured, masks)[0] == 2.0
    with pytest.raises(ValueError, match="no damping"):
        best_of_sweep({}, measured, masks)


def test_budget_lds_orders_values_and_pairs_them_with_the_configured_one(truth):
    _, masks, measured, noisy = truth
    # a larger value of the setting: less noise in the scores
    sweeps = {
        v: {1e-2: noisy(30.0), 1.0: noisy(level), 100.0: noisy(4 * level)}
        for v, level in ((64, 3.0), (256, 1.0), (1024, 0.2))
    }
    points = budget_lds(sweeps, measured, masks, configured=256)
    assert list(points) == [64, 256, 1024]
    assert points[64].best.mean < points[256].best.mean < points[1024].best.mean
    assert all(p.damping == 1.0 for p in points.values())
    ref = points[256]
    assert ref.difference.mean == 0.0 and ref.heldout_difference.mean == 0.0
    for v in (64, 1024):
        p = points[v]
        assert p.difference.mean == pytest.approx(p.best.mean - ref.best.mean)
        assert p.heldout is not None and len(p.chosen) == 2
        assert p.heldout_difference.mean == pytest.approx(p.heldout.mean - ref.heldout.mean)
    assert points[1024].difference.mean > 2 * points[1024].difference.stderr
    d = extremes_difference(points)
    assert d.mean == pytest.approx(points[1024].best.mean - points[64].best.mean)
    m = budget_metrics(points)
    assert set(m) == {"64", "256", "1024"}
    assert set(m["64"]) == {"lds", "stderr", "damping", "difference_vs_configured", "heldout"}
    assert set(m["64"]["heldout"]) == {"lds", "stderr", "chosen", "difference_vs_configured"}
    assert m["1024"]["lds"] == round(points[1024].best.mean, 5)


def test_budget_lds_without_a_choice_has_no_heldout(truth):
    _, masks, measured, noisy = truth
    one = {8: {1e-8: noisy(1.0)}, 32: {1e-8: noisy(0.5)}}  # K-FAC: its one damping
    points = budget_lds(one, measured, masks, configured=8)
    assert all(p.heldout is None and p.chosen is None for p in points.values())
    assert "heldout" not in budget_metrics(points)["32"]
    # fewer than 4 subsets: no two folds to choose a damping on
    sweep = {8: {1.0: noisy(1.0), 10.0: noisy(2.0)}}
    few = budget_lds(sweep, measured[:, :3], masks[:3], configured=8)
    assert few[8].heldout is None
    with pytest.raises(ValueError, match="configured value 16"):
        budget_lds(one, measured, masks, configured=16)
    with pytest.raises(ValueError, match="two values"):
        extremes_difference({8: points[8]})


def r(mean: float, stderr: float = 0.01) -> LDSResult:
    return LDSResult(mean, stderr, torch.tensor([]))


LDS_BY_DIM = {
    "TRAK*": {2048: r(0.30), 8192: r(0.33), 32768: r(0.35)},
    "D-TRAK*": {2048: r(0.32), 8192: r(0.34), 32768: r(0.36)},
}


def test_projection_dimension_claim_rule():
    row = projection_dimension(LDS_BY_DIM, {"TRAK*": r(0.05), "D-TRAK*": r(0.04)})
    assert row["id"] == "projection_dimension" and row["figure"] == "App. G.3.1"
    assert row["verdict"] == "holds"
    assert row["paper"] == PAPER_FINDINGS["projection_dimension"]
    assert "TRAK* 0.300 (k = 2048), 0.330 (k = 8192), 0.350 (k = 32768)" in row["evidence"]
    assert "D-TRAK* 0.320 (k = 2048)" in row["evidence"]
    assert "k = 32768 - k = 2048" in row["evidence"] and "+0.050 ± 0.010" in row["evidence"]
    # one method significantly worse at the larger k: does not hold
    bad = projection_dimension(LDS_BY_DIM, {"TRAK*": r(0.05), "D-TRAK*": r(-0.04)})
    assert bad["verdict"].startswith("does not hold")
    # one within 2 standard errors, none reversed: inconclusive
    flat = projection_dimension(LDS_BY_DIM, {"TRAK*": r(0.05), "D-TRAK*": r(0.015)})
    assert flat["verdict"].startswith("inconclusive")


def test_projection_dimension_claim_needs_two_dimensions():
    with pytest.raises(ValueError, match="two projection"):
        projection_dimension({"TRAK*": {2048: r(0.3)}}, {"TRAK*": r(0.0)})
    with pytest.raises(ValueError, match="no comparison"):
        projection_dimension(LDS_BY_DIM, {})
