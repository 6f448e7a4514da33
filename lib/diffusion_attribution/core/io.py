"""Files the library writes and reads back: atomic writes, guarded reads, finite values.

- :func:`atomic_save` / :func:`atomic_write_text` / :func:`atomic_write_bytes`: every file the library saves is written to
  a temporary file in the same directory, flushed to disk, then renamed over its path, so a
  crash or a full disk (``OSError`` ``ENOSPC``) never leaves a half-written file and never
  touches the previous version of it.
- :func:`load`: ``torch.load(weights_only=True)`` of a file written by :func:`atomic_save`,
  after checking it: a missing, empty, truncated or bit-flipped file (the CRC-32 of every
  member of torch's zip container is verified, which ``torch.load`` itself does not do) and a
  file that holds a pickle of anything but tensors and plain values each raise
  :class:`CorruptFileError` naming the file and what is wrong. Nothing is ever unpickled
  beyond what ``weights_only=True`` allows.
- :func:`remove_partial_writes`: the temporary files of writes whose process was killed.
- :func:`check_finite`: raises :class:`NonFiniteError` naming where (a function and a file),
  the key (a layer, a measurement) and the index and value of the first NaN or Inf.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


class CorruptFileError(ValueError):
    """A file that cannot be what the library wrote; the message names it and the fault."""


class NonFiniteError(FloatingPointError):
    """A NaN or Inf where a finite value is needed; the message names where, the key, the
    index and the value."""


def atomic_save(obj: object, path: str | os.PathLike, *, finite: bool = True) -> None:
    """``torch.save`` to a temporary file in the same directory, flushed to disk, then
    renamed over ``path`` (``os.replace``), so a crash never leaves a half-written file.

    With ``finite`` (default) every floating-point tensor in ``obj`` must be finite, or
    :class:`NonFiniteError` names the file, the entry (e.g. a layer's weight of a model or
    a training checkpoint), the index and the value, and nothing is written: a training run
    whose loss diverged stops at its next checkpoint, and a NaN never becomes a result.
    (Python floats, e.g. an undefined standard error in metadata, are not checked.)"""
    if finite:
        check_finite(_tensors(obj), f"atomic_save({path})")
    _atomic_write(path, lambda f: torch.save(obj, f))


def _tensors(obj: object) -> object:
    """``obj`` with its Python floats dropped (what :func:`atomic_save` checks)."""
    if isinstance(obj, Mapping):
        return {k: _tensors(v) for k, v in obj.items() if not isinstance(v, float)}
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj if not isinstance(v, float)]
    return None if isinstance(obj, float) else obj


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """``text`` (UTF-8) written to ``path`` as :func:`atomic_save` writes."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """``data`` written to ``path`` as :func:`atomic_save` writes."""
    _atomic_write(path, lambda f: f.write(data))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of a written file: what ``open`` would give (``mkstemp`` alone gives 0600).
_MODE = 0o666 & ~_umask()


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: How :func:`_atomic_write` names its temporary files: ``.<name>.<random>.tmp``.
PARTIAL = ".*.tmp"


def remove_partial_writes(folder: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files that writes under ``folder`` left when their process was
    killed (SIGKILL skips the clean-up of :func:`_atomic_write`), last modified more than
    ``older_than_s`` seconds ago; returns them. The pipeline calls it for a stage's resumable
    outputs and caches before the stage runs (DVC runs one stage of a repository at a time);
    with SLURM jobs that may outlive a killed driver it passes an age, so a live job's write
    is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_s
    found = sorted(p for p in folder.rglob(PARTIAL) if p.is_file() and p.stat().st_mtime <= cutoff)
    for p in found:
        p.unlink(missing_ok=True)
    return found


def verify(path: str | os.PathLike, what: str = "file") -> Path:
    """Check that ``path`` is a complete, unaltered file of ``torch.save``: it exists, is a zip
    container whose members all match their CRC-32. Raises :class:`CorruptFileError` (or
    ``FileNotFoundError``) naming the file; returns the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    fix = "delete it and rerun the stage that writes it"
    if size == 0:
        raise CorruptFileError(f"{what} {path} is empty (0 bytes): {fix}")
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80":
            raise CorruptFileError(
                f"{what} {path} is a bare pickle, not a file written by torch.save; it is not "
                "unpickled (a pickle can run code): regenerate it with the pipeline"
            )
        raise CorruptFileError(
            f"{what} {path} is truncated or corrupt ({size} bytes, no complete zip container "
            f"of torch.save): {fix}"
        )
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CorruptFileError(f"{what} {path} is corrupt ({err}): {fix}") from None
    if bad is not None:
        raise CorruptFileError(
            f"{what} {path} is corrupt: member {bad!r} does not match its CRC-32 (a flipped "
            f"bit or a partial copy): {fix}"
        )
    return path


def load(path: str | os.PathLike, what: str = "file", map_location="cpu") -> object:
    """``torch.load(path, weights_only=True)`` after :func:`verify`; a file that holds more
    than tensors and plain values, or that torch cannot parse, raises
    :class:`CorruptFileError` naming it."""
    path = verify(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:200]
        raise CorruptFileError(
            f"{what} {path} holds Python objects other than tensors and plain values; it is "
            f"not unpickled (a pickle can run code) ({first})"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError) as err:
        raise CorruptFileError(
            f"{what} {path} cannot be read back ({type(err).__name__}: {str(err)[:200]}): "
            "delete it and rerun the stage that writes it"
        ) from None


def _leaves(obj: object, key: str) -> Iterator[tuple[str, object]]:
    if isinstance(obj, torch.Tensor) or isinstance(obj, float):
        yield key, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, f"{key}[{k!r}]" if key else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{key}[{i}]")


def check_finite(obj: object, where: str) -> None:
    """Raise :class:`NonFiniteError` unless every floating-point tensor and float in ``obj``
    (nested mappings, lists and tuples; e.g. a state dict) is finite. The message names
    ``where`` (e.g. ``"save_model(outputs/train/model.pt)"``), the key of the first offending
    entry (e.g. a layer's weight), the index and value of its first NaN / Inf and how many
    entries are not finite."""
    for key, x in _leaves(obj, ""):
        if isinstance(x, float):
            if not math.isfinite(x):
                raise NonFiniteError(f"{where}: {key or 'value'} is {x}")
            continue
        if not (x.is_floating_point() or x.is_complex()):
            continue
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0]) if x.ndim else ()
            value = float(x[idx]) if not x.is_complex() else complex(x[idx])
            raise NonFiniteError(
                f"{where}: {key or 'tensor'} has {int(bad.sum())} non-finite of {x.numel()} "
                f"entries, the first {value} at index {list(idx)}"
            )
