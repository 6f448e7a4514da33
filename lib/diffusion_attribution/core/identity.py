"""Identities of expensive results: named by what determines them, never deleted.

A retrained model, a resumable checkpoint or a cached measurement is named (or keyed) by a
fingerprint of what determines it: its settings, its data and the code that computes it. The
code enters as :func:`code_digest` -- the *meaning* of the source, not its bytes:

- the source of each module, class or function is parsed with :mod:`ast`, its docstrings and
  every other bare string statement (a no-op) are dropped and it is printed back with
  :func:`ast.unparse`; comments, blank lines, line breaks, quote styles and redundant
  parentheses vanish on the way. So editing a comment or a docstring, or reformatting, keeps
  every name; changing code renames.

What an identity covers: the settings and data passed as parts, and the code of the objects
passed to :func:`code_digest` (for a module: all of it, including functions that do not
compute the result, such as its naming).

What it does not cover, so that a result keeps its name when
- code that is not passed changes (e.g. ``config.py`` or ``io.py``; a changed config default
  still renames, as it changes the config's dump);
- a library such as torch changes its numerics on an upgrade;
- code reads its own docstrings at run time (``__doc__``), since they are dropped.

What renames although the result would not change: semantically neutral edits of the code
(renaming a local variable, reordering functions, adding a function to a hashed module), and a
Python upgrade that prints the same tree differently through :func:`ast.unparse`. Renaming is
the safe error: the result is recomputed, and the old one is moved aside by
:func:`move_aside`, never deleted.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel

#: Versions the scheme: part of every :func:`fingerprint`, so a change of the scheme renames.
SCHEME = "identity-v1"


def strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop every bare string statement (docstrings of modules, classes and functions, and
    the no-op strings documenting attributes) from ``tree``, in place; a body left empty gets
    a ``pass``. Returns ``tree``."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [
                s
                for s in body
                if not (
                    isinstance(s, ast.Expr)
                    and isinstance(s.value, ast.Constant)
                    and isinstance(s.value.value, str)
                )
            ]
            if len(kept) != len(body):
                setattr(node, field, kept or ([] if field != "body" else [ast.Pass()]))
    return tree


def parse_source(text: str) -> ast.Module:
    """Parse ``text``: a module, or the indented source of a method (as
    :func:`inspect.getsource` gives it)."""
    if text[:1] in (" ", "\t"):  # an indented block: parse it as the body of an ``if``
        return ast.Module(body=ast.parse("if 1:\n" + text).body[0].body, type_ignores=[])
    return ast.parse(text)


@functools.lru_cache(maxsize=256)
def normalized_source(text: str) -> str:
    """``text`` without comments, docstrings and formatting: parsed, stripped of docstrings
    (:func:`strip_docstrings`) and printed back with :func:`ast.unparse`."""
    return ast.unparse(strip_docstrings(parse_source(text)))


def source_digest(text: str) -> str:
    """SHA-256 (hex) of :func:`normalized_source` of ``text``."""
    return hashlib.sha256(normalized_source(text).encode()).hexdigest()


def code_digest(*objs: object) -> str:
    """SHA-256 (hex) of the normalized source (:func:`normalized_source`) of each module,
    class or function in ``objs``, in order. The source is read as :func:`inspect.getsource`
    reads it: from the file on disk, at the time of the call."""
    h = hashlib.sha256(SCHEME.encode())
    for obj in objs:
        digest = source_digest(inspect.getsource(obj))
        h.update(f"\0{digest}".encode())
    return h.hexdigest()


def fingerprint(*parts: object) -> str:
    """Short stable hash (16 hex digits) of ``parts``, in order: a tensor by its dtype, shape
    and bytes, a pydantic model by its class name and ``model_dump_json()``, ``bytes`` as
    they are, anything else by its ``repr`` (so pass plain values: strings, numbers, tuples,
    a :func:`code_digest`)."""
    h = hashlib.sha256(SCHEME.encode())
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            head = f"tensor:{t.dtype}:{tuple(t.shape)}"
            data = t.flatten().view(torch.uint8).numpy().tobytes()
        elif isinstance(p, BaseModel):
            head, data = f"model:{type(p).__qualname__}", p.model_dump_json().encode()
        elif isinstance(p, bytes):
            head, data = "bytes", p
        else:
            head, data = "repr", repr(p).encode()
        h.update(f"\0{head}:{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def move_aside(paths: Iterable[str | Path], stale_dir: str | Path) -> list[tuple[Path, Path]]:
    """Move ``paths`` (results that no longer match their identity) into a new folder
    ``stale_dir/<UTC timestamp>/``, never deleting anything; returns ``(from, to)`` pairs.

    ``stale_dir`` should lie outside every DVC-tracked output (the pipeline uses
    ``.cache/stale/<stage>``, git-ignored). Two files of the same name get suffixes.
    Nothing is created when ``paths`` is empty.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = Path(stale_dir) / stamp
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in paths:
        dest, n = folder / p.name, 0
        while dest.exists():
            n += 1
            dest = folder / f"{p.name}.{n}"
        shutil.move(p, dest)
        moved.append((p, dest))
    return moved
