"""LDS (eq. 13) on hand-worked examples, the retraining ceiling and removal sets."""

import math

import pytest
import torch

from diffusion_attribution.lds import (
    lds,
    predicted_changes,
    retraining_ceiling,
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


def test_retraining_ceiling():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(3, 20, 1, generator=g)
    noisy = signal + 0.1 * torch.randn(3, 20, 4, generator=g)
    pure_noise = torch.randn(3, 20, 4, generator=g)
    assert retraining_ceiling(noisy).mean > 0.9
    assert abs(retraining_ceiling(pure_noise).mean) < 0.3
    with pytest.raises(ValueError):
        retraining_ceiling(noisy[:, :, :1])


def test_top_removal_sets():
    scores = torch.tensor([[0.1, 0.5, -1.0, 0.3], [2.0, -2.0, 0.0, 1.0]])
    assert top_removal_sets(scores, 0.5).tolist() == [[1, 3], [0, 3]]
    assert top_removal_sets(scores, 0.1).shape == (2, 1)
