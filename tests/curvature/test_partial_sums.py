"""Factor and correction sums (:mod:`diffusion_attribution.curvature.partial_sums`): additive
over shards of examples, saved as plain tensors, normalised into the K-FAC / EK-FAC of the whole
set, and refusing to add what does not belong together.

All checks in float64 on ``TINY_4X4`` (``net`` and ``data`` of ``tests/curvature/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.hooks import correction_sums, factor_sums
from diffusion_attribution.curvature.partial_sums import (
    CorrectionSums,
    FactorSums,
    apply_corrections,
    combine,
    to_kfac,
)
from diffusion_attribution.diffusion.unet import kfac_parameters
from tests.curvature.oracles import SCHEDULE, N, S, assert_blocks_equal, rel_fro

pytestmark = pytest.mark.usefixtures("one_thread")


SHARDS = [(0, 2), (2, 3), (3, 5)]


def _shard_sums(net, params, data, tmp_path, **kw) -> FactorSums:
    x0, t, eps = data
    parts = []
    for i, (a, b) in enumerate(SHARDS):
        s = factor_sums(
            net, params, SCHEDULE, x0[a:b], t[a:b], eps[a:b], example_offset=a, batch_size=3, **kw
        )
        path = tmp_path / f"sums{i}.pt"
        s.save(path)
        torch.load(path, weights_only=True)  # plain tensors and containers only
        parts.append(FactorSums.load(path))
    return combine(parts[::-1])  # order does not matter


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_shards_combine_to_the_whole_fit(net, data, tmp_path, fisher, kfac):
    params = kfac_parameters(net)
    kw = dict(fisher=fisher, kfac=kfac, mc_seed=4, mc_samples=2 if fisher == "mc" else 1)
    combined = _shard_sums(net, params, data, tmp_path, **kw)
    whole = factor_sums(net, params, SCHEDULE, *data, batch_size=8, **kw)
    assert combined.num_rows == whole.num_rows == N * S
    assert combined.examples == whole.examples == [(0, N)]
    for sep in (True, False):
        a = to_kfac(combined, separate_weight_and_bias=sep)
        b = to_kfac(whole, separate_weight_and_bias=sep)
        assert_blocks_equal(a, b, tol=1e-12)
    ref = fit_kfac(net, params, SCHEDULE, *data, batch_size=5, **kw)  # another batching
    assert_blocks_equal(to_kfac(combined), ref, tol=1e-12)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_ekfac_two_pass_shards(net, data, tmp_path, fisher, separate):
    params = kfac_parameters(net)
    x0, t, eps = data
    kw = dict(fisher=fisher, mc_seed=9)
    basis = to_kfac(
        _shard_sums(net, params, data, tmp_path, **kw), separate_weight_and_bias=separate
    )
    parts = []
    for i, (a, b) in enumerate(SHARDS):
        c = correction_sums(
            net, params, SCHEDULE, x0[a:b], t[a:b], eps[a:b], basis, example_offset=a, batch_size=3
        )
        c.save(tmp_path / f"corr{i}.pt")
        parts.append(CorrectionSums.load(tmp_path / f"corr{i}.pt"))
    sharded = apply_corrections(basis, combine(parts))
    whole = fit_kfac(
        net, params, SCHEDULE, *data, ekfac=True, separate_weight_and_bias=separate, **kw
    )
    assert sharded.meta["ekfac"]
    assert_blocks_equal(sharded, whole, tol=1e-12)
    # the EK-FAC eigenvalues are the diagonal of the per-row gradient second moment in the basis
    # (not the Kronecker products g_i a_j): they differ from the basis' own
    assert rel_fro(sharded.eigenvalues(), basis.eigenvalues()) > 1e-3
    with pytest.raises(ValueError, match="examples"):
        apply_corrections(basis, combine(parts[:2]))
    other = to_kfac(factor_sums(net, params, SCHEDULE, *data, fisher="empirical", kfac="reduce"))
    with pytest.raises(ValueError, match="eigenbases"):
        apply_corrections(other, combine(parts))


def test_combine_refuses_overlaps_and_mixed_settings(net, data):
    params = kfac_parameters(net)
    x0, t, eps = data
    a = factor_sums(net, params, SCHEDULE, x0[:3], t[:3], eps[:3])
    b = factor_sums(net, params, SCHEDULE, x0[2:], t[2:], eps[2:], example_offset=2)
    with pytest.raises(ValueError, match="overlap"):
        a + b
    c = factor_sums(net, params, SCHEDULE, x0[3:], t[3:], eps[3:], example_offset=3, kfac="reduce")
    with pytest.raises(ValueError, match="different settings"):
        a + c
    d = factor_sums(net, params, SCHEDULE, x0[3:], t[3:], eps[3:], example_offset=3, mc_seed=1)
    with pytest.raises(ValueError, match="different settings"):
        a + d
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    with pytest.raises(ValueError, match="not a"):
        FactorSums.from_state_dict({"format": "x"})
