"""Claims: the verdict rule on hand-worked differences, collection and the table."""

import json

import pytest

from diffusion_attribution.claims import (
    claim,
    collect,
    to_markdown,
    verdict,
    verdict_all,
    verdict_matches,
)


def test_verdict_rule():
    assert verdict(0.11, 0.05) == "holds"
    assert verdict(-0.11, 0.05) == "does not hold"
    assert verdict(0.09, 0.05).startswith("inconclusive")
    assert verdict(0.0, 0.0).startswith("inconclusive")
    assert verdict(0.09, 0.05, z=1) == "holds"


def test_collect_and_table(tmp_path):
    a = claim("a", "A beats B", "Fig. 2a", "0.40 vs 0.30", "holds")
    b = claim("b", "C | D", "Fig. 4", "x", "inconclusive (few samples)")
    (tmp_path / "one.json").write_text(json.dumps({"claims": [a], "other": 1}))
    (tmp_path / "two.json").write_text(json.dumps({"claims": [b]}))
    (tmp_path / "none.json").write_text(json.dumps({"x": 1}))
    got = collect([tmp_path / "one.json", tmp_path / "none.json", tmp_path / "two.json"])
    assert [c["id"] for c in got] == ["a", "b"]
    table = to_markdown(got).splitlines()
    assert table[2] == "| A beats B | Fig. 2a | 0.40 vs 0.30 | **holds** |"
    assert table[3].startswith("| C / D |")  # a pipe would break the table
    with pytest.raises(ValueError, match="twice"):
        collect([tmp_path / "one.json", tmp_path / "one.json"])
    with pytest.raises(ValueError, match="verdict"):
        claim("c", "x", "y", "z", "probably")


def test_verdict_all_and_matches():
    assert verdict_all([(0.3, 0.1), (0.5, 0.1)]) == "holds"
    assert verdict_all([(0.3, 0.1), (-0.3, 0.1)]).startswith("does not hold (1 of 2")
    assert verdict_all([(0.3, 0.1), (0.1, 0.1)]).startswith("inconclusive (1 of 2")
    with pytest.raises(ValueError):
        verdict_all([])
    assert verdict_matches(-0.006, 0.027) == "holds"  # -0.06 > -0.1
    assert verdict_matches(-0.2, 0.05) == "does not hold"
    assert verdict_matches(-0.05, 0.04).startswith("inconclusive")  # -0.13 < -0.1, not < -0.08
