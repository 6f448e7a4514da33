"""precision="float16" is traker 0.3.2's BasicScoreComputer pipeline (Fig. 18, App. G.3.1).

traker's score computer is driven here as its TRAKer drives it (float16 features on the CPU,
get_xtx -> get_x_xtx_inv -> stored features -> get_scores into a float32 accumulator of shape
(N, Q)); one model and Q_j = 1 (no out-to-loss term), so finalize_scores changes nothing. The
library's float16 scores are traker's scores times c (the mean |entry| of traker's float32
inverse, by which traker divides it): on the CPU every intermediate is bit-identical, so the
measured relative error and rank disagreement are exactly 0.
"""

import logging

import pytest
import torch
from scipy.stats import spearmanr

from diffusion_attribution.attribution import trak
from diffusion_attribution.attribution.trak import (
    mean_eigenvalue,
    trak_lambda,
    trak_scores,
    trak_scores_sweep,
)

score_computers = pytest.importorskip(
    "trak.score_computers",
    reason="traker==0.3.2 (the dev extra) is the reference these tests compare with",
)

N, Q, P = 50, 7, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: more OpenMP threads only contend


def features(n, k, q_count, seed, lo=0.0, hi=-2.0, query_scale=5.0):
    """Gaussian features whose directions have magnitudes 10^lo .. 10^hi (a decaying gradient
    spectrum of O(1) features, as the tiny U-Net's: mean eigenvalue ~0.2, queries ~10x larger)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(lo, hi, k)
    q = torch.randn(q_count, k, generator=g) * scale * query_scale
    phi = torch.randn(n, k, generator=g) * scale
    return q, phi


def traker_run(q, phi, lambda_reg, dtype):
    """traker's own pipeline: (scores (N, Q) float32, X^T X, finalised features)."""
    sc = score_computers.BasicScoreComputer(
        dtype=dtype,
        device=torch.device("cpu"),
        lambda_reg=lambda_reg,
        logging_level=logging.WARNING,
    )
    grads = phi.to(dtype)  # TRAKer stores projected gradients in its dtype
    xtx = sc.get_xtx(grads)
    finalised = sc.get_x_xtx_inv(grads, xtx).to(dtype).cpu()  # finalize_features
    acc = torch.zeros(phi.shape[0], q.shape[0])  # finalize_scores' float32 accumulator
    sc.get_scores(finalised, q.to(dtype), accumulator=acc)
    return acc, xtx, finalised


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def min_spearman(a, b):
    """The worst per-query Spearman correlation of two (Q, N) score matrices."""
    return min(
        spearmanr(x, y)[0] for x, y in zip(a.double().numpy(), b.double().numpy(), strict=True)
    )


def assert_bitwise(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


CASES = {  # (lo, hi) of the feature magnitudes, damping relative to the mean eigenvalue
    "small damping": (0.0, -2.0, 1e-3),
    "larger damping": (0.0, -2.0, 1.0),
    "wide spectrum": (0.5, -3.5, 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float16_is_trakers_pipeline_bit_for_bit(case):
    lo, hi, relative = CASES[case]
    q, phi = features(N, P, Q, seed=0, lo=lo, hi=hi)
    damping = relative * mean_eigenvalue(phi)
    lam = trak_lambda(damping, N)
    acc, xtx, finalised = traker_run(q, phi, lam, torch.float16)
    # the intermediates: X^T X (float16) and the features Phi M (float16)
    ours_xtx = trak._traker_xtx(phi.half())
    assert ours_xtx.dtype == torch.float16
    assert_bitwise(ours_xtx, xtx)
    ours_features, c = trak._traker_features(phi.half(), ours_xtx, lam)
    assert_bitwise(ours_features, finalised)
    # c is the mean |entry| of (X^T X + lambda I)^{-1}, the damping added in float16 to
    # traker's X^T X (checked with a float64 inverse; measured rel. <= 1e-7)
    reg = (xtx + torch.diag(torch.full((P,), lam).half())).double()
    assert float(c) == pytest.approx(float(torch.linalg.inv(reg).abs().mean()), rel=1e-5)
    # the public scores: traker's matrix, transposed, times c; so relative error 0, Spearman 1
    s16 = trak_scores(q, phi, damping, precision="float16")
    assert s16.shape == (Q, N) and s16.dtype == torch.float32
    expected = (acc.double() * c.double()).float().T
    assert_bitwise(s16, expected)
    assert rel_err(s16, expected) == 0.0 and min_spearman(s16, acc.T) == pytest.approx(1.0)
    # traker's accumulator holds float16 values, so finalize_scores' float16 store is lossless
    assert torch.equal(acc.half().float(), acc)
    # and in the module's convention (1/N) phi_q^T (F + damping I)^{-1} phi_j, i.e. close to
    # float64 scores on this well-conditioned case (measured rel. 9e-4..1e-3, Spearman >= 0.9999)
    s64 = trak_scores(q, phi, damping, precision="float64")
    assert rel_err(s16, s64) < 5e-3 and min_spearman(s16, s64) > 0.999


def test_float16_sums_xtx_in_blocks_of_20000_rows_like_traker():
    """Beyond traker's 20 000-row blocks the float16 X^T X is a float16 sum of block products."""
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(trak.TRAKER_BLOCK_ROWS + 50, 4, generator=g) * 0.5
    q = torch.randn(3, 4, generator=g)
    lam = trak_lambda(0.1, len(phi))
    acc, xtx, finalised = traker_run(q, phi, lam, torch.float16)
    ours = trak._traker_xtx(phi.half())
    assert_bitwise(ours, xtx)
    one_block = (phi.half().T @ phi.half()).float()
    assert not torch.equal(ours.float(), one_block)  # the blocking is visible in float16
    assert_bitwise(trak._traker_features(phi.half(), ours, lam)[0], finalised)


def test_sweep_and_shared_features_equal_single_calls():
    """One damping sweep, and several query sets sharing X^T X and the features, give exactly
    the single-damping, single-query scores."""
    q, phi = features(N, P, Q, seed=2)
    q2 = q[:3] * 0.5
    eig = mean_eigenvalue(phi)
    dampings = [1e-4 * eig, 1e-2 * eig, eig, 100 * eig]
    sweep = trak_scores_sweep(q, phi, dampings, precision="float16")
    assert list(sweep) == dampings
    both = trak.trak_scores_sweeps([q, q2], phi, dampings, N, "float16")
    for d in dampings:
        single = trak_scores(q, phi, d, precision="float16")
        assert_bitwise(sweep[d], single)
        assert_bitwise(both[0][d], single)
        assert_bitwise(both[1][d], trak_scores(q2, phi, d, precision="float16"))


def test_float16_pipeline_degrades_an_ill_conditioned_case():
    """N < k and a small damping (X^T X nearly singular): traker's float16 X^T X, damping and
    rescaled inverse change the scores a lot, where rounding only the features to float16 (this
    module's emulation before) changed them by 3e-4. The paper's Fig. 18 degradation."""
    n, k = 12, 48
    q, phi = features(n, k, Q, seed=1, lo=0.0, hi=-1.0)
    damping = 1e-3 * mean_eigenvalue(phi)
    s16 = trak_scores(q, phi, damping, precision="float16")
    s32 = trak_scores(q, phi, damping, precision="float32")
    acc, _, _ = traker_run(q, phi, trak_lambda(damping, n), torch.float16)
    assert min_spearman(s16, acc.T) == pytest.approx(1.0)  # still traker's scores
    rounded_only = trak_scores(q.half(), phi.half(), damping, precision="float64")
    assert rel_err(rounded_only, s32) < 2e-3  # measured 2.5e-4
    assert min_spearman(rounded_only, s32) > 0.999  # measured 1.0000
    assert rel_err(s16, s32) > 0.2  # measured 0.66
    assert min_spearman(s16, s32) < 0.9  # measured 0.65
    # a larger damping conditions X^T X + lambda I and the agreement comes back
    big = 10 * mean_eigenvalue(phi)
    s16b = trak_scores(q, phi, big, precision="float16")
    assert min_spearman(s16b, trak_scores(q, phi, big)) > 0.999


def test_float16_small_features_underflow():
    """Features of 1e-3 .. 1e-5 (X^T X entries near float16's subnormal range): float16 differs
    from float32 even with N > k (measured rel. 0.10, Spearman 0.989)."""
    q, phi = features(N, P, Q, seed=1)
    q, phi = q * 3e-3, phi * 3e-3
    damping = 1e-3 * mean_eigenvalue(phi)
    s16 = trak_scores(q, phi, damping, precision="float16")
    s32 = trak_scores(q, phi, damping, precision="float32")
    acc, _, _ = traker_run(q, phi, trak_lambda(damping, N), torch.float16)
    assert min_spearman(s16, acc.T) == pytest.approx(1.0)
    assert rel_err(s16, s32) > 0.03 and min_spearman(s16, s32) < 0.995


def test_float32_path_agrees_with_traker_float32():
    """traker at dtype float32 (use_half_precision=False): float32 X^T X and explicit float32
    inverse; the library's float32 path (float64 Cholesky) agrees up to traker's constant c
    (measured rel. <= 4e-7 after rescaling by the best constant, Spearman 1.0000)."""
    for case in CASES.values():
        lo, hi, relative = case
        q, phi = features(N, P, Q, seed=0, lo=lo, hi=hi)
        damping = relative * mean_eigenvalue(phi)
        s32 = trak_scores(q, phi, damping)
        acc, xtx, _ = traker_run(q, phi, trak_lambda(damping, N), torch.float32)
        assert xtx.dtype == torch.float32
        t = acc.T.double()
        c = float((s32.double() * t).sum() / (t * t).sum())  # traker's scores are ours / c
        assert c > 0
        assert rel_err(c * t, s32) < 1e-5
        assert min_spearman(s32, acc.T) > 0.99999


def test_non_finite_float16_scores_do_not_crash():
    """Where traker's float16 pipeline breaks down the scores are inf/NaN; nothing raises."""
    q, phi = features(N, P, Q, seed=3)
    eig = mean_eigenvalue(phi)
    # X^T X entries above 65504 are inf in float16: a few of them give inf scores, more of
    # them all-NaN scores, in traker and here alike (same positions)
    for scale, kind in ((60, torch.isinf), (100, torch.isnan)):
        big_q, big_phi = q * scale, phi * scale
        damping = eig * scale**2  # the same relative damping
        acc, xtx, _ = traker_run(big_q, big_phi, trak_lambda(damping, N), torch.float16)
        assert torch.isinf(xtx).any() and kind(acc).any()
        s = trak_scores(big_q, big_phi, damping, precision="float16")
        assert_bitwise(kind(s), kind(acc.T))
        assert_bitwise(torch.isfinite(s), torch.isfinite(acc.T))
    assert torch.isnan(s).all()
    # an exactly singular float16 X^T X + lambda I (a zero feature, a damping that rounds to 0):
    # traker raises; here those scores are NaN and the rest of the sweep is unaffected
    phi0 = phi.clone()
    phi0[:, 3] = 0
    tiny = 1e-12  # N * tiny rounds to 0 in float16
    with pytest.raises(torch.linalg.LinAlgError):
        traker_run(q, phi0, trak_lambda(tiny, N), torch.float16)
    sweep = trak_scores_sweep(q, phi0, [tiny, eig], precision="float16")
    assert torch.isnan(sweep[tiny]).all()
    assert torch.isfinite(sweep[eig]).all()
    acc, _, _ = traker_run(q, phi0, trak_lambda(eig, N), torch.float16)
    assert min_spearman(sweep[eig], acc.T) == pytest.approx(1.0)
    # features that do not fit float16 at all are refused up front (traker would store inf)
    with pytest.raises(FloatingPointError):
        trak_scores(q, phi * 1e6, 1.0, precision="float16")
