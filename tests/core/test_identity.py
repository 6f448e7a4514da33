"""Identities by meaning (comments and docstrings rename nothing, code does), stale results
moved aside."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from diffusion_attribution.core.identity import (
    code_digest,
    fingerprint,
    move_aside,
    normalized_source,
    source_digest,
)
from diffusion_attribution.core.sections import TrainConfig

MODULE = '''
"""A module docstring."""

import math

#: an attribute documented by a comment
SCALE = 2.0


def f(x):
    """Scaled cosine."""
    # a comment
    return SCALE * math.cos(x)


class C:
    """A class."""

    def g(self, y):
        """A method."""
        return f(y) + 1
'''


def load(tmp_path: Path, name: str, text: str, monkeypatch):
    """Import ``text`` as module ``name`` (registered, so inspect finds its classes)."""
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_source_digest_ignores_comments_docstrings_and_layout() -> None:
    base = source_digest(MODULE)
    same = [
        MODULE.replace('"""Scaled cosine."""', '"""Another text, over\n    two lines."""'),
        MODULE.replace("    # a comment\n", "    # another comment\n    # and more\n"),
        MODULE.replace('"""A module docstring."""', ""),
        MODULE.replace("return SCALE * math.cos(x)", "return (SCALE\n            * math.cos(x))"),
        MODULE.replace('"""A method."""', "'''A method, in other quotes.'''"),
        MODULE.replace("SCALE = 2.0", "SCALE = 2.00  # trailing comment"),
    ]
    for text in same:
        assert text != MODULE and source_digest(text) == base
    changed = [
        MODULE.replace("SCALE = 2.0", "SCALE = 3.0"),
        MODULE.replace("math.cos(x)", "math.sin(x)"),
        MODULE.replace("return f(y) + 1", "return f(y) - 1"),
        MODULE.replace('"""Scaled cosine."""', 'x = "Scaled cosine."'),
    ]
    for text in changed:
        assert source_digest(text) != base
    # a function left with only a docstring is a `pass`
    assert normalized_source('def h():\n    """Doc."""\n') == "def h():\n    pass"


def test_code_digest_of_modules_functions_and_methods(tmp_path: Path, monkeypatch) -> None:
    a = load(tmp_path, "mod_a", MODULE, monkeypatch)
    doc = MODULE.replace('"""A method."""', '"""Edited."""').replace("# a comment", "# edited")
    b = load(tmp_path, "mod_b", doc, monkeypatch)
    c = load(tmp_path, "mod_c", MODULE.replace("return f(y) + 1", "return f(y) + 2"), monkeypatch)
    assert code_digest(a) == code_digest(b) != code_digest(c)
    assert code_digest(a.C.g) == code_digest(b.C.g) != code_digest(c.C.g)  # indented source
    assert code_digest(a.C) == code_digest(b.C) != code_digest(c.C)
    assert code_digest(a.f) == code_digest(c.f)  # only g changed
    assert code_digest(a.f, a.C) != code_digest(a.C, a.f)  # order counts
    # the file on disk is read at each call: an edited comment keeps the digest
    before = code_digest(a)
    (tmp_path / "mod_a.py").write_text(MODULE.replace("# a comment", "# a longer comment"))
    assert code_digest(a) == before


def test_fingerprint_of_parts() -> None:
    x = torch.arange(6.0)
    base = fingerprint("a", x, TrainConfig(), (1, 2), 3)
    assert base == fingerprint("a", x.clone(), TrainConfig(), (1, 2), 3) and len(base) == 16
    for other in [
        fingerprint("b", x, TrainConfig(), (1, 2), 3),
        fingerprint("a", x.reshape(2, 3), TrainConfig(), (1, 2), 3),  # shape counts
        fingerprint("a", x.double(), TrainConfig(), (1, 2), 3),  # dtype counts
        fingerprint("a", x, TrainConfig(steps=3000), (1, 2), 3),
        fingerprint("a", x, TrainConfig(), (1, 2, 3)),  # parts do not run together
        fingerprint(x, "a", TrainConfig(), (1, 2), 3),
    ]:
        assert other != base


def test_move_aside_never_deletes(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "m.pt", tmp_path / "y" / "m.pt"
    for i, f in enumerate((a, b)):
        f.parent.mkdir()
        f.write_bytes(b"model %d" % i)
    assert move_aside([], tmp_path / "stale") == [] and not (tmp_path / "stale").exists()
    moved = move_aside([a, b], tmp_path / "stale")
    assert [src for src, _ in moved] == [a, b] and not a.exists() and not b.exists()
    (folder,) = (tmp_path / "stale").iterdir()  # one UTC-timestamped folder per call
    assert folder.name.endswith("Z")
    assert sorted(dst.name for _, dst in moved) == ["m.pt", "m.pt.1"]  # a clash gets a suffix
    assert {dst.read_bytes() for _, dst in moved} == {b"model 0", b"model 1"}
