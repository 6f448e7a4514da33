"""Ground-truth measurements: chunking does not change a value, every model sees the same
draws, and the per-model cache resumes without recomputing and never serves stale values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_attribution.core import identity
from diffusion_attribution.core.sections import ModelConfig
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, sample
from diffusion_attribution.diffusion.training import build_model, save_model
from diffusion_attribution.evaluation import ground_truth as gt
from diffusion_attribution.evaluation.ground_truth import (
    ground_truth_measurements,
    measure,
    measure_models,
    stack,
)

MODEL = ModelConfig(
    base_channels=4, channel_mults=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=2
)
T = 20


@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.linear(T, 1e-3, 0.2)
    torch.manual_seed(0)
    model = build_model(MODEL, (1, 8, 8)).eval()
    out = sample(model, schedule, 3, (1, 8, 8), seed=0, record_trajectory=True)
    measurements = ground_truth_measurements(schedule, "fixed_large", 17, [5, 15])
    draws = {"loss": 6, "elbo": 6, "trajectory": 5, "l_t=5": 3, "l_t=15": 3}
    return schedule, model, out, measurements, draws


def test_measure_matches_direct_call_whatever_the_chunking(setup):
    schedule, model, out, measurements, draws = setup
    queries, traj = out.x0, out.trajectory
    values = measure(
        model, measurements, queries, draws, seed=4, trajectories=traj, batch_size=1024
    )
    # the direct measurement on all draws at once
    ids = torch.arange(len(queries))
    with torch.no_grad():
        for name, m in measurements.items():
            d = m.draw(queries, ids, draws[name], 4, trajectories=traj)
            torch.testing.assert_close(values[name], m(model, queries, d).double())
    # one query and 2 draws per forward pass: same values
    tiny = measure(model, measurements, queries, draws, seed=4, trajectories=traj, batch_size=2)
    for name in measurements:
        torch.testing.assert_close(tiny[name], values[name], rtol=1e-5, atol=1e-4)
    other = measure(model, measurements, queries, draws, seed=5, trajectories=traj)
    assert not torch.equal(other["loss"], values["loss"])


def test_measure_models_caches_and_resumes(setup, tmp_path: Path, monkeypatch):
    schedule, model, out, measurements, draws = setup
    paths = {}
    for k in range(3):
        torch.manual_seed(k)
        path = tmp_path / f"m{k}.pt"
        save_model(path, build_model(MODEL, (1, 8, 8)), MODEL, (1, 8, 8))
        paths[f"m{k}"] = path
    cache, stale = tmp_path / "cache", tmp_path / "stale"
    kw = dict(trajectories=out.trajectory, workers=1, progress=False, stale_dir=stale)
    first = measure_models(paths, measurements, out.x0, draws, 4, cache, **kw)
    assert list(first) == ["m0", "m1", "m2"]
    stamps = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    assert len(stamps) == 3

    # a rerun measures nothing: the worker is never called
    def boom(*args, **kwargs):
        raise AssertionError("a cached model was measured again")

    monkeypatch.setattr(gt, "measure", boom)
    again = measure_models(paths, measurements, out.x0, draws, 4, cache, **kw)
    for label in paths:
        for name in measurements:
            assert torch.equal(again[label][name], first[label][name])
    monkeypatch.undo()

    # a changed model file or other settings are measured again, never served from the cache;
    # the superseded entry is moved aside, not overwritten
    torch.manual_seed(9)
    save_model(paths["m1"], build_model(MODEL, (1, 8, 8)), MODEL, (1, 8, 8))
    changed = measure_models(paths, measurements, out.x0, draws, 4, cache, **kw)
    assert not torch.equal(changed["m1"]["loss"], first["m1"]["loss"])
    assert torch.equal(changed["m0"]["loss"], first["m0"]["loss"])
    (old_m1,) = stale.glob("*/m1.pt")
    assert torch.equal(torch.load(old_m1, weights_only=True)["values"]["loss"], first["m1"]["loss"])
    reseeded = measure_models(paths, measurements, out.x0, draws, 5, cache, **kw)
    assert not torch.equal(reseeded["m0"]["loss"], first["m0"]["loss"])
    assert len(list(stale.glob("*/*.pt"))) == 4  # m1 once, then every model for the new seed

    # pruning moves cache entries of models no longer asked for aside
    measure_models({"m0": paths["m0"]}, measurements, out.x0, draws, 5, cache, prune=True, **kw)
    assert sorted(f.name for f in cache.iterdir()) == ["m0.pt"]
    assert len(list(stale.glob("*/*.pt"))) == 6
    with pytest.raises(TypeError, match="stale_dir"):  # no default: nothing is lost by accident
        measure_models(paths, measurements, out.x0, draws, 5, cache, prune=True)

    # the same values from worker processes
    parallel = measure_models(
        paths,
        measurements,
        out.x0,
        draws,
        4,
        tmp_path / "c2",
        trajectories=out.trajectory,
        workers=2,
        progress=False,
        stale_dir=stale,
    )
    for label in paths:
        torch.testing.assert_close(parallel[label]["elbo"], changed[label]["elbo"])
    with pytest.raises(FileNotFoundError, match="m9"):
        measure_models(
            {"m9": tmp_path / "nope.pt"}, measurements, out.x0, draws, 4, cache, stale_dir=stale
        )


def test_cache_key_ignores_comments_not_code(setup, tmp_path: Path, monkeypatch):
    """The key covers the measurement code by meaning: a docstring edit keeps it."""
    schedule, model, out, measurements, draws = setup
    path = tmp_path / "m.pt"
    save_model(path, model, MODEL, (1, 8, 8))
    settings = gt.cache_settings(measurements, out.x0, draws, 4, out.trajectory)
    key = gt.cache_key(settings, path)
    assert key == gt.cache_key(dict(settings), path) and len(key) == 16
    assert gt.cache_key({**settings, "seed": 5}, path) != key
    real = identity.inspect.getsource

    def edited(obj, replace: tuple[str, str]) -> str:
        text = real(obj)
        return text.replace(*replace) if obj is gt.measure else text

    monkeypatch.setattr(
        identity.inspect,
        "getsource",
        lambda o: edited(o, ('"""Every measurement of every query', '"""Edited.')),
    )
    assert gt.cache_key(settings, path) == key
    monkeypatch.setattr(
        identity.inspect, "getsource", lambda o: edited(o, ("per = max(1,", "per = max(2,"))
    )
    assert gt.cache_key(settings, path) != key


def test_stack_layout():
    results = {
        f"s{i}k{k}": {"loss": torch.tensor([10.0 * i + k, 100.0 + 10 * i + k])}
        for i in range(3)
        for k in range(2)
    }
    grid = [[f"s{i}k{k}" for k in range(2)] for i in range(3)]
    m = stack(results, grid)["loss"]
    assert m.shape == (2, 3, 2)  # (Q, M, K)
    assert m[1, 2, 1] == 121.0 and m[0, 1, 0] == 10.0
