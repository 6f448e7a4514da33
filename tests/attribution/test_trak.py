"""TRAK / D-TRAK scores from projected features (the projector itself: test_projection.py; the
baselines driver: test_baselines.py; the similarity baselines: test_similarity.py)."""

import pytest
import torch

from diffusion_attribution.attribution import baselines, projection, similarity, trak
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.attribution.trak import trak_lambda, trak_scores, trak_scores_sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: more OpenMP threads only contend


def explicit_scores(q, phi, damping):
    """(1/N) q (phi^T phi / N + damping I)^{-1} phi^T with an explicit float64 inverse."""
    q, phi = q.double(), phi.double()
    n, k = phi.shape
    inv = torch.linalg.inv(phi.T @ phi / n + damping * torch.eye(k, dtype=torch.float64))
    return q @ inv @ phi.T / n


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ------------------------------------------------------------------ scores


@pytest.mark.parametrize("n", [12, 50])  # N < k (Gram-matrix solve) and N > k (F solve)
def test_identity_projection_gives_explicit_scores(n):
    p, q_count, damping = 30, 4, 1e-2
    g = torch.Generator().manual_seed(2)
    train = torch.randn(n, p, generator=g, dtype=torch.float64)
    query = torch.randn(q_count, p, generator=g, dtype=torch.float64)
    ident = Projector.identity(p)
    phi, q = ident.project(train), ident.project(query)
    expected = explicit_scores(query, train, damping)
    got = trak_scores(q, phi, damping, n, precision="float64")
    assert got.shape == (q_count, n) and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-6
    assert rel_err(trak_scores(q, phi, damping, n), expected) < 1e-5  # float32 storage
    # TRAK's unnormalised lambda: q (phi^T phi + N lambda I)^{-1} phi^T is the same matrix
    lam = trak_lambda(damping, n)
    trak_style = query @ torch.linalg.inv(train.T @ train + lam * torch.eye(p, dtype=torch.float64))
    assert rel_err(got, trak_style @ train.T) < 1e-6


def test_float16_degrades_float32_does_not():
    """A wide dynamic range of the features and a small damping: float16 storage changes the
    scores measurably (App. G.3.1, Fig. 18), float32 storage does not."""
    n, k, q_count = 300, 48, 6  # N > k: every direction of F counts, however small
    g = torch.Generator().manual_seed(3)
    col_scale = torch.logspace(-7, 1, k, dtype=torch.float64)  # per-direction magnitudes
    phi = torch.randn(n, k, generator=g, dtype=torch.float64) * col_scale
    q = torch.randn(q_count, k, generator=g, dtype=torch.float64) * col_scale
    damping = 1e-14
    exact = explicit_scores(q, phi, damping)
    s64 = trak_scores(q, phi, damping, precision="float64")
    s32 = trak_scores(q, phi, damping, precision="float32")
    s16 = trak_scores(q, phi, damping, precision="float16")
    assert rel_err(s64, exact) < 1e-5
    assert rel_err(s32, s64) < 1e-4
    assert rel_err(s16, s64) > 1e-2  # measured: 3e-2
    with pytest.raises(FloatingPointError):
        trak_scores(q, phi * 1e6, 1.0, precision="float16")


@pytest.mark.parametrize("n", [10, 40])
def test_damping_sweep_equals_separate_calls(n):
    k = 24
    g = torch.Generator().manual_seed(4)
    phi = torch.randn(n, k, generator=g)
    q = torch.randn(5, k, generator=g)
    dampings = [1e-4, 1e-2, 1.0, 100.0]
    sweep = trak_scores_sweep(q, phi, dampings, n)
    assert list(sweep) == dampings
    for d in dampings:
        assert rel_err(sweep[d], trak_scores(q, phi, d, n)) < 1e-5
        assert rel_err(sweep[d], explicit_scores(q, phi, d)) < 1e-5


def test_scores_stay_on_the_features_device():
    """Kernels and solves run where the features are (here torch.device("cpu") explicitly; on
    a GPU the same code keeps them there)."""
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(6)
    phi, q = torch.randn(9, 6, generator=g).to(cpu), torch.randn(2, 6, generator=g).to(cpu)
    for precision in ("float64", "float32", "float16"):
        assert trak_scores(q, phi, 0.5, precision=precision).device == cpu
        sweep = trak_scores_sweep(q, phi, [0.1, 1.0], precision=precision)
        assert all(s.device == cpu for s in sweep.values())
    assert trak_scores(q, phi[:4], 0.5).device == cpu  # N < k: the Gram-matrix solve


def test_bad_arguments():
    phi, q = torch.randn(5, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="damping"):
        trak_scores(q, phi, 0.0)
    with pytest.raises(ValueError, match="num_train"):
        trak_scores(q, phi, 1.0, num_train=6)
    with pytest.raises(ValueError, match="precision"):
        trak_scores(q, phi, 1.0, precision="bfloat16")


def test_trak_exports_only_its_own_names():
    """The projector, the similarity baselines and the baselines driver are imported from the
    modules that define them: ``trak`` re-exports none of them."""
    for name in ("BLOCK_ROWS", "Projector", "featurize"):
        assert name in projection.__all__ and name not in trak.__all__
    for name in ("pixel_similarity", "gradient_dot", "gradient_cosine"):
        assert name in similarity.__all__ and not hasattr(trak, name)
    assert "baseline_scores" in baselines.__all__ and not hasattr(trak, "baseline_scores")
    assert not hasattr(trak, "BLOCK_ROWS")
    assert not hasattr(trak, "trak_attribute")
