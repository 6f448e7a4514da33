"""The curvlinops backend (:mod:`diffusion_attribution.curvature.curvlinops_backend`): reading
an operator's factors into a K-FAC."""

from __future__ import annotations

import pytest

from diffusion_attribution.curvature.curvlinops_backend import build_operator, kfac_from_operator
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.diffusion.unet import kfac_parameters
from tests.curvature.oracles import SCHEDULE, ConvAttnEps, assert_close, draws, make

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("ekfac", [False, True])
def test_from_operator_reuses_computed_factors(ekfac):
    """curvlinops adds to existing factors on a second ``compute_kronecker_factors``; an
    operator whose factors already exist (here via its determinism check) is not refitted."""
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(2, 2, shape=(1, 4, 4))
    kw = dict(fisher="mc", ekfac=ekfac)
    op = build_operator(model, params, SCHEDULE, x0, t, eps, check_deterministic=True, **kw)
    K = kfac_from_operator(op, params)
    ref = fit_kfac(model, params, SCHEDULE, x0, t, eps, backend="curvlinops", **kw)
    assert_close(K.to_dense(), ref.to_dense(), rtol=1e-9)
