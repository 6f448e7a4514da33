"""Score keys mean the same for every method; one lookup rule for keys and LDS-table rows."""

import pandas as pd
import pytest
import torch

from diffusion_attribution.attribution.scores import (
    KEY_FIELDS,
    ScoreKey,
    ScoreSet,
    matches,
    rows,
    select,
)
from diffusion_attribution.core.io import NonFiniteError


def test_key_fields_and_label():
    k = ScoreKey("kfac", "loss", "mc_expand", 1e-8, "int8")
    assert (k.method, k.measurement, k.curvature, k.damping, k.compression, k.precision) == (
        "kfac",
        "loss",
        "mc_expand",
        1e-8,
        "int8",
        "float32",
    )
    assert k.label == "kfac/mc_expand/loss/damping=1e-08/int8"
    assert ScoreKey("pixel", "none").label == "pixel/none"
    assert ScoreKey("trak", "elbo", "projected_empirical", 0.5, precision="float16").label == (
        "trak/projected_empirical/elbo/damping=0.5/float16"
    )
    assert isinstance(ScoreKey("kfac", "loss", damping=1).damping, float)
    with pytest.raises(ValueError, match="ScoreKey.method"):
        ScoreKey("kfak", "loss")


def test_matches_keys_and_rows_with_damping_tolerance():
    k = ScoreKey("trak", "loss", "projected_empirical", 0.1)
    assert matches(k, method="trak", damping=0.1 * (1 + 1e-9))
    assert not matches(k, damping=0.1 * (1 + 1e-3))
    assert not matches(k, precision="float16")
    assert matches({f: getattr(k, f) for f in KEY_FIELDS}, method="trak", measurement="loss")
    with pytest.raises(ValueError, match="unknown score key field"):
        matches(k, variant="trak")


def test_score_set_find_one_union_and_round_trip(tmp_path):
    a = ScoreSet(
        {ScoreKey("kfac", "loss", "mc", d): torch.full((2, 3), d) for d in (1e-8, 1e-4)},
        {"note": 1},
    )
    b = ScoreSet(
        {ScoreKey("trak", "loss", "projected_empirical", 2.0): torch.ones(2, 3)},
        {"mean_eigenvalue": {"trak": 4.0}},
    )
    both = a | b
    assert len(both) == 3 and both.meta == {"note": 1, "mean_eigenvalue": {"trak": 4.0}}
    assert set(both.find(method="kfac")) == set(a)
    key, s = both.one(method="kfac", damping=1e-4)
    assert key.damping == 1e-4 and torch.equal(s, torch.full((2, 3), 1e-4))
    with pytest.raises(KeyError, match="2 score matrices match"):
        both.one(method="kfac")
    with pytest.raises(KeyError, match="0 score matrices"):
        both.one(method="d-trak")
    with pytest.raises(ValueError, match="in both sets"):
        a | a
    assert both.relative_damping(ScoreKey("trak", "loss", "projected_empirical", 2.0)) == 0.5
    assert both.relative_damping(ScoreKey("kfac", "loss", "mc", 1e-8)) != both.relative_damping(
        ScoreKey("kfac", "loss", "mc", 1e-8)
    )  # NaN: no eigenvalue recorded for K-FAC
    both.save(tmp_path / "s.pt")
    back = ScoreSet.load(tmp_path / "s.pt")
    assert list(back) == list(both) and back.meta == both.meta
    assert all(torch.equal(back[k], both[k]) for k in both)
    torch.save({"scores": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a score file"):
        ScoreSet.load(tmp_path / "other.pt")


def test_select_fixed_damping_or_best_of_sweep():
    table = pd.DataFrame(
        {
            "method": ["trak"] * 3 + ["kfac"],
            "measurement": ["loss"] * 4,
            "curvature": ["projected_empirical"] * 3 + ["mc_expand"],
            "target": ["loss"] * 4,
            "compression": ["none"] * 3 + ["int8"],
            "precision": ["float32", "float32", "float16", "float32"],
            "damping": [1e-3, 1e-1, 1e-1, 1e-8],
            "lds": [0.2, 0.5, 0.6, 0.4],
        }
    )
    assert select(table, "loss", method="trak", precision="float32").damping == 1e-1
    assert select(table, "loss", method="trak").precision == "float16"  # best over all
    assert select(table, "loss", method="trak", damping=1e-3 * (1 + 1e-9)).lds == 0.2
    assert select(table, "loss", method="kfac", damping=1e-8).lds == 0.4
    assert select(table, "elbo", method="kfac") is None
    assert len(rows(table, "loss", method="trak")) == 3 and len(rows(table, None)) == 4
    with pytest.raises(ValueError, match="unknown score key field"):
        select(table, "loss", variant="trak")


def test_save_refuses_non_finite_scores_but_float16(tmp_path):
    """A NaN in a float32 score matrix is refused (named); traker's float16 pipeline may
    overflow to Inf by design (Fig. 18) and is saved as it is."""
    bad = torch.zeros(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="trak/loss"):
        ScoreSet({ScoreKey("trak", "loss"): bad}).save(tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()
    inf = torch.full((2, 3), float("-inf"))
    ScoreSet({ScoreKey("trak", "loss", precision="float16"): inf}).save(tmp_path / "b.pt")
    back = ScoreSet.load(tmp_path / "b.pt")
    assert torch.equal(back[ScoreKey("trak", "loss", precision="float16")], inf)
