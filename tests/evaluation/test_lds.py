"""LDS (eq. 13) on hand-worked examples, seed reproducibility, the LDS upper bound and removal sets."""

import math

import pytest
import torch

from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.evaluation.lds import (
    class_share,
    heldout_damping,
    lds,
    lds_table,
    lds_upper_bound,
    paired_difference,
    predicted_changes,
    proxy_sign,
    random_removal_sets,
    retraining_proxy,
    retraining_scores,
    same_class_share,
    seed_reproducibility,
    spearman_brown,
    subset_masks,
    top_removal_sets,
)


def test_subset_masks_exact_size_seeded():
    a = subset_masks(10, 6, 0.5, seed=3)
    assert a.shape == (6, 10) and torch.all(a.sum(1) == 5)
    assert torch.equal(a, subset_masks(10, 6, 0.5, seed=3))
    assert not torch.equal(a, subset_masks(10, 6, 0.5, seed=4))
    assert len({tuple(r.tolist()) for r in a}) > 1
    with pytest.raises(ValueError, match="fraction"):
        subset_masks(10, 6, 1.0)


def test_predicted_change_is_sum_over_removed_examples():
    scores = torch.tensor([[1.0, 2.0, 4.0]])
    masks = torch.tensor([[True, False, True], [False, False, True]])  # kept
    torch.testing.assert_close(
        predicted_changes(scores, masks), torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    )


def test_lds_hand_worked():
    # ranks of the measurements: [1, 3, 2, 4]; d = [0, -1, 1, 0]; rho = 1 - 6 * 2 / (4 * 15) = 0.8
    predicted = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    measured = torch.tensor([[10.0, 30.0, 20.0, 40.0], [10.0, 30.0, 20.0, 40.0]])
    r = lds(predicted, measured)
    torch.testing.assert_close(r.per_query, torch.tensor([0.8, -0.8], dtype=torch.float64))
    assert r.mean == pytest.approx(0.0)
    assert r.stderr == pytest.approx(math.sqrt(2 * 0.8**2) / math.sqrt(2))  # std(ddof=1) / sqrt(Q)
    # seeds are averaged before the rank correlation: (Q, M, K)
    seeds = torch.stack([measured - 1, measured + 1], dim=-1)
    assert lds(predicted, seeds).per_query[0] == pytest.approx(0.8)


def test_constant_query_is_nan_and_left_out():
    r = lds(
        torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]),
        torch.tensor([[5.0, 5.0, 5.0], [1.0, 2.0, 3.0]]),
    )
    assert math.isnan(r.per_query[0]) and r.mean == pytest.approx(1.0)


def test_seed_reproducibility():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(3, 20, 1, generator=g)
    noisy = signal + 0.1 * torch.randn(3, 20, 4, generator=g)
    pure_noise = torch.randn(3, 20, 4, generator=g)
    assert seed_reproducibility(noisy).mean > 0.9
    assert abs(seed_reproducibility(pure_noise).mean) < 0.3
    with pytest.raises(ValueError):
        seed_reproducibility(noisy[:, :, :1])


def test_spearman_brown_hand_worked():
    # r = 0.5 between two seeds: the mean of 3 seeds has reliability 1.5 / 2 = 0.75
    assert float(spearman_brown(0.5, 3)) == pytest.approx(0.75)
    assert float(spearman_brown(1.0, 5)) == pytest.approx(1.0)
    assert float(spearman_brown(-0.2, 3)) == 0.0
    assert float(spearman_brown(0.3, 1)) == pytest.approx(0.3)


@pytest.mark.parametrize("noise", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("K", [2, 3, 5])
def test_upper_bound_holds_for_the_expectation(noise: float, K: int):
    """Measurements = a known expectation + seed noise. The expectation itself is the best
    any method can predict; its LDS against the K-seed mean must not exceed the bound by more
    than 2 standard errors, and the bound must be tight (not a trivial 1), while the seed
    reproducibility is *below* the expectation's LDS (so it is no ceiling)."""
    g = torch.Generator().manual_seed(K * 10 + int(noise * 10))
    Q, M = 64, 40
    expectation = torch.randn(Q, M, 1, generator=g, dtype=torch.float64)
    measured = expectation + noise * torch.randn(Q, M, K, generator=g, dtype=torch.float64)
    best = lds(expectation[..., 0], measured)
    bound = lds_upper_bound(measured)
    diff = paired_difference(best.per_query, bound.per_query)
    assert best.mean <= bound.mean + 2 * diff.stderr, (best, bound, diff)
    assert abs(best.mean - bound.mean) < 0.05, (best, bound)  # tight, not vacuous
    assert seed_reproducibility(measured).mean < best.mean
    # Pearson theory, corr(T, Y) = sqrt(K / (K + noise^2)) for unit-variance T, up to the
    # rank transform and the finite number of subsets
    assert bound.mean == pytest.approx((K / (K + noise**2)) ** 0.5, abs=0.1)


def test_top_removal_sets():
    scores = torch.tensor([[0.1, 0.5, -1.0, 0.3], [2.0, -2.0, 0.0, 1.0]])
    assert top_removal_sets(scores, 0.5).tolist() == [[1, 3], [0, 3]]
    assert top_removal_sets(scores, 0.1).shape == (2, 1)


def test_random_removal_sets():
    sets = random_removal_sets(50, 0.1, 3, seed=0)
    assert sets.shape == (3, 5)
    for row in sets:
        assert len(set(row.tolist())) == 5 and 0 <= int(row.min()) and int(row.max()) < 50
    assert torch.equal(sets, random_removal_sets(50, 0.1, 3, seed=0))
    assert not torch.equal(sets, random_removal_sets(50, 0.1, 3, seed=1))


def test_proxy_sign():
    assert proxy_sign("loss", "loss") == 1
    assert proxy_sign("elbo", "elbo") == 1
    assert proxy_sign("l_t=10", "l_t=500") == 1  # Fig. 11
    assert proxy_sign("square_norm", "loss") == 1  # D-TRAK
    assert proxy_sign("none", "loss") == 1  # pixel similarity
    assert proxy_sign("journey", "loss") == 1 and proxy_sign("journey", "elbo") == -1
    # a lower loss is a higher likelihood: "(m. loss)" enters with a minus sign
    assert proxy_sign("loss", "elbo") == -1
    assert proxy_sign("square_norm", "trajectory") == -1
    assert proxy_sign("elbo", "loss") is None
    assert proxy_sign("l_t=10", "loss") is None


def test_lds_table_hand_worked():
    # 1 query, 3 training examples, 4 subsets. Removed sets: {2}, {1}, {0}, {0, 1}.
    masks = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    scores = {
        ScoreKey("kfac", "loss", "k", 1e-8): torch.tensor([[1.0, 2.0, 4.0], [9.0, 9.0, 9.0]]),
        ScoreKey("kfac", "elbo", "k", 1e-8): torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]]),
    }
    # predicted loss changes: [4, 2, 1, 3] -> ranks [4, 2, 1, 3]
    measured = {
        "loss": torch.tensor([[40.0, 20.0, 10.0, 30.0]]),  # same order: rho = 1
        "elbo": torch.tensor([[-40.0, -20.0, -10.0, -30.0]]),  # reversed order
    }
    rows = {(r["measurement"], r["target"]): r for r in lds_table(scores, measured, masks)}
    assert set(rows) == {("loss", "loss"), ("loss", "elbo"), ("elbo", "elbo")}
    assert rows[("loss", "loss")]["lds"] == pytest.approx(1.0)
    # the loss predicts the ELBO with a minus sign: a perfect ranking again
    assert rows[("loss", "elbo")]["sign"] == -1
    assert rows[("loss", "elbo")]["lds"] == pytest.approx(1.0)
    # ELBO scores taken at face value rank the ELBO in reverse here
    assert rows[("elbo", "elbo")]["lds"] == pytest.approx(-1.0)
    assert rows[("loss", "loss")]["per_query"].shape == (1,)  # only the measured queries


def test_paired_difference_hand_worked():
    a = torch.tensor([0.5, 0.6, 0.7, float("nan")])
    b = torch.tensor([0.4, 0.4, 0.4, 0.1])
    r = paired_difference(a, b)
    # differences 0.1, 0.2, 0.3: mean 0.2, std (ddof=1) 0.1, stderr 0.1 / sqrt(3)
    assert r.mean == pytest.approx(0.2)
    assert r.stderr == pytest.approx(0.1 / math.sqrt(3))
    with pytest.raises(ValueError, match="shapes"):
        paired_difference(a, b[:2])


def test_retraining_proxy_hand_worked():
    # 1 query, 4 subsets, 2 seeds. Target mean of the other seed vs the proxy of this seed.
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    proxy = torch.tensor([[[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]]])
    # seed 0's proxy is reversed (rho = -1), seed 1's is in order (rho = +1): mean 0
    assert retraining_proxy(proxy, target).mean == pytest.approx(0.0)
    assert retraining_proxy(target, target).mean == pytest.approx(1.0)
    assert seed_reproducibility(target).mean == pytest.approx(1.0)
    with pytest.raises(ValueError):
        retraining_proxy(proxy[:, :3], target)


def test_heldout_damping_never_uses_the_evaluation_fold():
    g = torch.Generator().manual_seed(0)
    n, m, q = 30, 8, 5
    masks = subset_masks(n, m, 0.5, seed=1)
    true = torch.randn(q, n, generator=g)
    measured = predicted_changes(true, masks)  # (Q, M): a perfect attribution exists
    noise = torch.randn(q, n, generator=g)
    # "good" is perfect on fold 0 only in the sense that both folds rank it best; "bad" is noise
    scores = {1e-3: true, 1.0: noise}
    r = heldout_damping(scores, measured, masks)
    assert r.chosen == (1e-3, 1e-3)
    assert r.heldout.mean == pytest.approx(1.0) and r.best_of_sweep.mean == pytest.approx(1.0)

    # a damping that is perfect on fold 1 and anti-perfect on fold 0: choosing on fold 0 avoids
    # it for fold 1, so the held-out LDS is below the best-of-sweep one
    flip = torch.cat([-measured[:, : m // 2], measured[:, m // 2 :]], 1)
    r2 = heldout_damping({1e-3: true, 1.0: noise}, flip, masks)
    assert r2.chosen[1] == 1e-3 and r2.chosen[0] != 1e-3
    assert r2.heldout.mean < r2.best_of_sweep.mean
    with pytest.raises(ValueError, match="4 subsets"):
        heldout_damping(scores, measured[:, :3], masks[:3])


def test_same_class_share_counts_the_top_fraction_by_hand():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    train = torch.tensor([0, 0, 1, 1, 1])
    classes = torch.tensor([0, 0])
    # top 40% = 2 examples: query 0 -> ids 0, 1 (both class 0); query 1 -> ids 4, 3 (none)
    share = same_class_share(scores, classes, train, 0.4)
    torch.testing.assert_close(share, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        class_share(classes, train), torch.tensor([0.4, 0.4], dtype=torch.float64)
    )


def test_retraining_scores_are_the_difference_in_means_by_hand():
    # 4 subsets of 3 examples; example 2 is in every subset (scores 0)
    masks = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    measured = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    # example 0: without it {2, 6} -> 4, with it {1, 3} -> 2: +2; example 1: {1, 6} 3.5 - {2, 3} 2.5
    expected = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(retraining_scores(masks, measured), expected)
