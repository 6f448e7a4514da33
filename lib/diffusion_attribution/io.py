"""Atomic writes: every file the library saves goes through :func:`atomic_save`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, flushed to disk, then
    renamed over ``path`` (``os.replace``), so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
