"""The exact 1-D response function (Fig. 5) against finite differences and brute force."""

import numpy as np
import pytest

from diffusion_attribution.evaluation.response import (
    extended_loss,
    influence_slope,
    loss,
    optimum,
    response_curve,
)

X = np.array([-2.0, -1.5, 1.5, 2.0])  # two clusters: removing x_3 is far from linear


def test_optimum_is_the_minimiser_and_eps_one_removes_the_example():
    grid = np.linspace(-3, 5, 200001)
    for eps in (0.0, 0.5, 1.0):
        theta = optimum(X, 3, eps)
        assert abs(theta - grid[np.argmin(extended_loss(X, 3, eps, grid))]) < 1e-4
    # eps = 1 is the model trained without x_4: the minimiser of the other four losses
    without = np.delete(X, 3)
    assert optimum(X, 3, 1.0) == pytest.approx(optimum(without, 0, 0.0), abs=1e-10)


def test_slope_matches_finite_differences():
    for j in range(len(X)):
        h = 1e-6
        fd = (optimum(X, j, h) - optimum(X, j, -h)) / (2 * h)
        assert influence_slope(X, j) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_tangent_touches_the_curve_and_misses_at_removal():
    eps = np.array([0.0, 1e-4, 1.0])
    exact, linear = response_curve(X, 3, eps)
    assert exact[0] == pytest.approx(linear[0])
    assert abs(exact[1] - linear[1]) < 1e-7  # second order in eps
    assert abs(exact[2] - linear[2]) > 0.1  # removal is far from linear here


def test_loss_is_log_cosh():
    assert loss(np.array([0.0]), 2.0) == pytest.approx(np.log(np.cosh(2.0)))
    with pytest.raises(IndexError):
        optimum(X, 5, 0.0)
    with pytest.raises(ValueError, match="eps"):
        optimum(X, 0, 1.5)
