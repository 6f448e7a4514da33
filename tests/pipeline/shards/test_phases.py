"""Shards of a range, of the training set by ``DA_SHARD_EXAMPLES``, and the cache folder that
moves the folders of other fingerprints aside."""

import pytest

from diffusion_attribution.pipeline.shards.phases import blocks, cache_folder, training_shards
from diffusion_attribution.pipeline.workspace import Workspace


def test_blocks():
    assert blocks(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert blocks(10, 0) == [range(10)]
    with pytest.raises(ValueError, match="nothing to split"):
        blocks(0, 3)


def test_training_shards_follow_the_environment(monkeypatch):
    monkeypatch.delenv("DA_SHARD_EXAMPLES", raising=False)
    assert training_shards(10) == [range(10)]
    monkeypatch.setenv("DA_SHARD_EXAMPLES", "4")
    assert training_shards(10) == [range(0, 4), range(4, 8), range(8, 10)]


def test_cache_folder_moves_other_fingerprints_aside(tmp_path):
    ws = Workspace(tmp_path, device="cpu", threads=1)
    first = cache_folder(ws, "influence", "aaaa")
    (first / "scores_0.pt").write_bytes(b"x")
    assert cache_folder(ws, "influence", "aaaa") == first and (first / "scores_0.pt").exists()
    second = cache_folder(ws, "influence", "bbbb")
    assert [p.name for p in (tmp_path / ".cache" / "influence").iterdir()] == [second.name]
    stale = list((tmp_path / ".cache" / "stale" / "influence").rglob("scores_0.pt"))
    assert len(stale) == 1 and stale[0].read_bytes() == b"x"
