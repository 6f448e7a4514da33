"""K-FAC in float32 (``precision="float32"``) against float64, and the decomposition streamed
layer by layer to a folder (:func:`~diffusion_attribution.curvature.partial_sums.to_kfac`).

The tolerance the paper-scale profiles rely on (``curvature.precision: float32``), measured by
``benchmarks/bench_eigh_precision.py`` on the digits U-Net (here) and on the Ho U-Net at
widths 32 and 64 (the benchmark: relative error 0.5% / 1.5% at damping 1e-8, below 4e-4 from
1e-6 on; minimum per-query Spearman 0.9995 or more):

- damping >= 1e-6: scores within 1e-3 relative (Frobenius) error, Spearman >= 0.9999 per query;
- damping 1e-8 (the profiles' default, 2e-6 of the mean eigenvalue on digits): within 1e-2,
  Spearman >= 0.999, the same top-10 training examples.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffusion_attribution.curvature.hooks import correction_sums, factor_sums
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.curvature.partial_sums import apply_corrections, to_kfac
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.unet import kfac_parameters
from tests.curvature.oracles import SCHEDULE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "bench_eigh_precision", ROOT / "benchmarks" / "bench_eigh_precision.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_float32_scores_agree_with_float64_on_the_digits_unet(digits_unet):
    bench = _benchmark()
    x = bench.digits_images(68)
    schedule = NoiseSchedule.linear(1000)
    result = bench.compare(digits_unet, schedule, x[:64], x[64:], draws=4, score_draws=8)
    assert result["float32_bytes"] * 2 == result["float64_bytes"]
    for damping, row in result["dampings"].items():
        if damping >= 1e-6:
            assert row["relative_error"] < 1e-3, (damping, row)
            assert row["min_spearman"] >= 0.9999, (damping, row)
        else:
            assert row["relative_error"] < 1e-2, (damping, row)
            assert row["min_spearman"] >= 0.999, (damping, row)
            assert row["min_top10_overlap"] == 1.0, (damping, row)


def test_float32_kfac_is_float32_throughout_and_inverts_itself(net, data, tmp_path):
    params = kfac_parameters(net)
    sums = factor_sums(net, params, SCHEDULE, *data)
    K = to_kfac(sums, precision="float32")
    assert K.dtype == torch.float32
    assert {v.dtype for b in K.blocks for v in b.tensors().values() if v is not None} == {
        torch.float32
    }
    V = torch.randn(
        3, K.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    back = K.matvec(K.inverse_apply(V, 1e-2), 1e-2)
    assert back.dtype == torch.float64
    assert float((back - V).norm() / V.norm()) < 1e-4
    K64 = to_kfac(sums)
    rel = (K.to_dense().double() - K64.to_dense()).norm() / K64.to_dense().norm()
    assert float(rel) < 1e-5
    # EK-FAC on float32 eigenbases stays float32 and close to EK-FAC on float64 ones
    E32, E64 = (
        apply_corrections(k, correction_sums(net, params, SCHEDULE, *data, k)) for k in (K, K64)
    )
    assert E32.dtype == torch.float32
    rel = (E32.to_dense().double() - E64.to_dense()).norm() / E64.to_dense().norm()
    assert float(rel) < 1e-5
    K.save(tmp_path / "k.pt")
    assert KFAC.load(tmp_path / "k.pt").dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        to_kfac(sums, precision="float16")


def identical(a: KFAC, b: KFAC) -> bool:
    """Every block of ``a`` and ``b`` equal bit for bit."""
    return len(a.blocks) == len(b.blocks) and all(
        (x is None and y is None) or torch.equal(x, y)
        for p, q in zip(a.blocks, b.blocks, strict=True)
        for x, y in zip(p.tensors().values(), q.tensors().values(), strict=True)
    )


def test_decomposition_streams_to_a_folder_and_resumes(net, data, tmp_path):
    params = kfac_parameters(net)
    sums = factor_sums(net, params, SCHEDULE, *data)
    whole = to_kfac(sums)
    folder = tmp_path / "eigh"
    streamed = to_kfac(sums, folder=folder)
    assert identical(streamed, whole)
    files = sorted(folder.glob("layer_*.pt"))
    assert len(files) == len(sums.layers)
    # decomposed afresh or read back from the layer files: the same bytes when saved
    to_kfac(sums).save(tmp_path / "fresh.pt")
    to_kfac(sums, folder=folder).save(tmp_path / "read.pt")
    assert (tmp_path / "fresh.pt").read_bytes() == (tmp_path / "read.pt").read_bytes()
    # an interrupted run: half the layers done; the rest is decomposed, the done ones are read
    for f in files[len(files) // 2 :]:
        f.unlink()
    done = {f: f.stat().st_mtime_ns for f in files[: len(files) // 2]}
    resumed = to_kfac(sums, folder=folder, release=True)
    assert identical(resumed, whole)
    assert all(f.stat().st_mtime_ns == t for f, t in done.items())
    assert len(list(folder.glob("layer_*.pt"))) == len(files)
    # release: the sums were freed layer by layer
    assert all(sums.G[name] is None and sums.A[name] is None for name in sums.layers)
    # other settings (here the bias mode) never read these files
    joint = to_kfac(
        factor_sums(net, params, SCHEDULE, *data), folder=folder, separate_weight_and_bias=False
    )
    assert len(list(folder.glob("layer_*.pt"))) == 2 * len(files)
    assert len(joint.blocks) < len(whole.blocks)
