"""The response function of Fig. 5 and App. A on a problem small enough to solve exactly.

A scalar parameter theta is fitted to scalar data x_1..x_N with the smooth, convex,
non-quadratic loss l(x, theta) = log cosh(theta - x). Down-weighting example j by eps gives the
extended objective of Fig. 5,

    L(theta, eps) = (1/N) sum_n l(x_n, theta) - (eps/N) l(x_j, theta),

whose minimiser theta*(eps) is the *response function*: eps = 0 is the model trained on all
data, eps = 1 the model trained without x_j. The implicit function theorem (App. A.1) gives its
slope at eps = 0,

    d theta*/d eps = H^{-1} (1/N) l'(x_j, theta*),   H = d^2 L / d theta^2 at (theta*, 0),

and the influence-function prediction for removing x_j is the linear extrapolation
theta*(0) + d theta*/d eps (eq. 6 with the measurement theta itself). Everything is float64 and
exact up to the root finder's tolerance, so the gap between the curve and its tangent at eps = 1 is the
linearisation error, nothing else.
"""

from __future__ import annotations

import numpy as np


def loss(x: np.ndarray, theta: float | np.ndarray) -> np.ndarray:
    """l(x, theta) = log cosh(theta - x), elementwise (numerically stable)."""
    d = np.subtract.outer(np.atleast_1d(theta), x)
    return (np.logaddexp(d, -d) - np.log(2.0)).squeeze()


def _grad(x: np.ndarray, theta: float) -> np.ndarray:
    return np.tanh(theta - x)


def _hess(x: np.ndarray, theta: float) -> np.ndarray:
    return 1.0 / np.cosh(theta - x) ** 2


def _weights(n: int, j: int, eps: float) -> np.ndarray:
    if not 0 <= j < n:
        raise IndexError(f"example {j} out of range for {n} data points")
    w = np.full(n, 1.0 / n)
    w[j] -= eps / n
    return w


def extended_loss(x: np.ndarray, j: int, eps: float, theta: float | np.ndarray) -> np.ndarray:
    """L(theta, eps) of the module docstring at one or many theta."""
    x = np.asarray(x, dtype=np.float64)
    return np.atleast_2d(loss(x, theta)) @ _weights(len(x), j, eps)


def optimum(x: np.ndarray, j: int, eps: float, *, tol: float = 1e-14) -> float:
    """theta*(eps): the root of dL/dtheta = sum_n w_n tanh(theta - x_n), which increases in
    theta for eps <= 1 (all weights w_n >= 0; eps < 0 up-weights x_j), found by Brent's method
    inside the data's range."""
    from scipy.optimize import brentq  # slow to import; only this solve needs it

    x = np.asarray(x, dtype=np.float64)
    if eps > 1.0:
        raise ValueError(f"eps must be <= 1 (1 removes x_j), got {eps}")
    w = _weights(len(x), j, eps)
    return float(brentq(lambda t: float(w @ _grad(x, t)), x.min() - 1.0, x.max() + 1.0, xtol=tol))


def influence_slope(x: np.ndarray, j: int) -> float:
    """d theta*/d eps at eps = 0 (implicit function theorem, App. A.1)."""
    x = np.asarray(x, dtype=np.float64)
    theta = optimum(x, j, 0.0)
    h = float(np.mean(_hess(x, theta)))
    return float(_grad(x[j : j + 1], theta)[0]) / (len(x) * h)


def response_curve(x: np.ndarray, j: int, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """theta*(eps) exactly and as the influence-function tangent at eps = 0, for each eps."""
    exact = np.array([optimum(x, j, float(e)) for e in eps])
    return exact, optimum(x, j, 0.0) + influence_slope(x, j) * np.asarray(eps, dtype=np.float64)
