"""Adopting results named by the legacy scheme, so that the change of scheme retrains nothing.

Before :mod:`diffusion_attribution.identity`, names and keys hashed the raw bytes of the code:

- a retrained model ``<name>-<fp>.pt``: ``fp`` = SHA-256 of the bytes of ``train.py``,
  ``ddpm.py``, ``unet.py``, then of the parts ``repr(data digest)``, ``repr(job code)``, the
  three configs' ``model_dump_json()``, ``repr(keep)`` and ``repr(seed)`` (first 16 hex digits),
  where the job code was the concatenated :func:`inspect.getsource` of ``_configs``,
  ``run_job`` and ``ImageDataset.subset``; its checkpoint ``<model>.<fp'>.ckpt``: ``fp'`` of
  the same three files, the job's configs and the bytes of its subset's images;
- a measurement cache entry's key: SHA-256 of the settings' JSON, the model file's bytes and
  the bytes of ``ground_truth.py``, ``measurements.py``, ``ddpm.py``, ``unet.py``,
  ``train.py`` (first 16 hex digits).

Legacy fingerprints are recomputed exactly from the package's sources in the git history of
the checkout (``git rev-list HEAD -- lib/diffusion_attribution/``, newest first; commits of
the new scheme, which have ``identity.py``, are skipped; commits with the same sources are
tried once).

When migration applies. A result is adopted (renamed, or re-keyed; never copied, never
retrained) when

1. it is named (keyed) by the legacy fingerprint of exactly this job (this model and these
   settings) at some commit, and
2. the code of that commit does what the current code does: every module or function the new
   identity covers is the same up to comments and docstrings
   (:mod:`~diffusion_attribution.identity`), except definitions that only name results
   (:data:`NAMING`), the exact versions of definitions reviewed as changing no result
   (:data:`REVIEWED`), dropped imports and added definitions of new names
   (:func:`differences`).

Otherwise it stays where it is (and :func:`~diffusion_attribution.retrain.prune` or
:func:`~diffusion_attribution.ground_truth.measure_models` moves it aside). Without git, or
without a matching commit, nothing is adopted and one line says so. Call
:func:`adopt_legacy_models` before pruning and training, :func:`adopt_legacy_measurements`
before measuring; both are idempotent and cheap when there is nothing to adopt (no git call).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import tokenize
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .identity import normalized_source, source_digest, strip_docstrings
from .io import atomic_save

if TYPE_CHECKING:
    from .measurements import Measurement
    from .retrain import RetrainJob

#: Where the package lies in the repository.
PACKAGE = "lib/diffusion_attribution"
#: Top-level definitions that name results and compute none: the code of a legacy commit may
#: differ from the current code there.
NAMING = {"train.py": {"fingerprint"}, "ground_truth.py": {"_cache_key"}}
#: Definitions changed since the legacy scheme, reviewed to change no result: ``{file: {name:
#: the first 16 hex digits of the source_digest of the reviewed current definition, or None
#: for a removed one}}`` (:func:`reviewed_digest`). Any other version of them is a difference
#: again (and is named by the message of an adoption that does not happen).
#:
#: - ``ground_truth.measure_models``: moves stale entries aside instead of deleting them and
#:   computes its settings through ``cache_settings``, and says which labels it measured
#:   (``MeasuredModels``); what it measures and how is unchanged. Since the job fan-out
#:   (``jobs.run_tasks``) it runs ``run_measure_task`` tasks instead of a process pool of
#:   ``_measure_one`` (with ``_SHARED`` / ``_share``, removed): the same ``measure`` call per
#:   model, cached under the same key.
#: - ``ground_truth.measurement_code`` hashes ``measure`` and ``describe`` instead of the whole
#:   module, so that how models are fanned out does not rename measurements.
#: - ``unet.UNetConfig`` lost its defaults and ``unet.TINY_DIGITS`` moved to ``testing``:
#:   ``train.build_model`` passes every field, so a trained network is the same.
REVIEWED: dict[str, dict[str, str | None]] = {
    "ground_truth.py": {
        "measure_models": "3c1180e2ff1fbcf2",
        "measurement_code": "900f7156a1c08afa",
        "_SHARED": None,
        "_share": None,
        "_measure_one": None,
    },
    "unet.py": {"UNetConfig": "24098dce616998a3", "TINY_DIGITS": None},
}
_RECIPE_FILES = ("train.py", "ddpm.py", "unet.py")
#: (file, function) whose :func:`inspect.getsource` the legacy job code concatenated.
_LEGACY_JOB_CODE = (
    ("retrain.py", "_configs"),
    ("retrain.py", "run_job"),
    ("data.py", "ImageDataset.subset"),
)
_MEASURE_FILES = ("ground_truth.py", "measurements.py", "ddpm.py", "unet.py", "train.py")
_HEX = "[0-9a-f]{16}"
_LEGACY_FILE = re.compile(rf"{_HEX}\.pt(\.{_HEX}\.ckpt)?")
_LABEL = re.compile(rf"(.+)-{_HEX}")


# -- the legacy sources ---------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    """The lines of a source file as :mod:`linecache` holds them (universal newlines, a final
    newline added), which is what :func:`inspect.getsource` cuts from."""
    lines = io.StringIO(text.replace("\r\n", "\n").replace("\r", "\n")).readlines()
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def legacy_getsource(text: str, qualname: str) -> str | None:
    """What :func:`inspect.getsource` returns for the function ``qualname`` (``"f"`` or
    ``"Class.method"``) of a module whose source is ``text``: the lines from its first
    decorator (or its ``def``) to the end of its block, with their indentation. ``None`` when
    the module defines no such function."""
    body = ast.parse(text).body
    *classes, name = qualname.split(".")
    for cls in classes:
        found = [n for n in body if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            return None
        body = found[-1].body  # the last definition is the one that counts
    defs = [n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    defs = [n for n in defs if n.name == name]
    if not defs:
        return None
    node = defs[-1]
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return "".join(inspect.getblock(_lines(text)[first - 1 :]))


def _decode(data: bytes) -> str:
    return data.decode(tokenize.detect_encoding(io.BytesIO(data).readline)[0])


class _History:
    """The package's files at every commit of ``repo_root`` that touched it, newest first,
    read through git on demand."""

    def __init__(self, repo_root: str | Path) -> None:
        self.root = Path(repo_root)
        self.problem: str | None = None
        self._commits: list[str] | None = None
        self._blobs: dict[str, bytes] = {}

    def _git(self, *args: str) -> bytes:
        cmd = ["git", "-C", str(self.root), *args]
        return subprocess.run(cmd, capture_output=True, check=True).stdout

    def commits(self) -> list[str]:
        if self._commits is None:
            try:
                self._commits = self._git("rev-list", "HEAD", "--", PACKAGE).decode().split()
            except (OSError, subprocess.CalledProcessError) as err:
                detail = getattr(err, "stderr", b"") or b""
                self.problem = f"no git history at {self.root} ({_first_line(detail, err)})"
                self._commits = []
        return self._commits

    def files(self, commit: str, names: Sequence[str]) -> dict[str, bytes] | None:
        """``{name: bytes}`` of the package's files ``names`` at ``commit``; ``None`` when one
        is missing or the commit uses the new scheme (has ``identity.py``)."""
        listing = {}
        for entry in self._git("ls-tree", "-z", commit, "--", f"{PACKAGE}/").split(b"\0"):
            if entry:
                meta, path = entry.decode().split("\t", 1)
                listing[Path(path).name] = meta.split()[2]
        if "identity.py" in listing or not all(n in listing for n in names):
            return None
        for n in names:
            if listing[n] not in self._blobs:
                self._blobs[listing[n]] = self._git("cat-file", "blob", listing[n])
        return {n: self._blobs[listing[n]] for n in names}


def _first_line(detail: bytes, err: BaseException) -> str:
    text = detail.decode(errors="replace").strip() or str(err)
    return text.splitlines()[0] if text else type(err).__name__


# -- is the legacy code the current code? ---------------------------------------------------


def _bound(stmt: ast.stmt) -> set[str]:
    """The module-level names a top-level statement binds."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {stmt.name}
    names = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def _statements(text: str, ignore: Iterable[str]) -> list[tuple[str, set[str], bool]]:
    """(normalized source, names bound, is an import) of each top-level statement, without
    docstrings and without the definitions named in ``ignore``."""
    ignore = set(ignore)
    out = []
    for stmt in strip_docstrings(ast.parse(text)).body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if stmt.name in ignore:
                continue
        out.append((ast.unparse(stmt), _bound(stmt), isinstance(stmt, ast.Import | ast.ImportFrom)))
    return out


def _what(names: set[str], src: str) -> str:
    return ", ".join(sorted(names)) if names else src.splitlines()[0][:60]


def differences(
    legacy: str,
    current: str,
    ignore: Iterable[str] = (),
    reviewed: Mapping[str, str | None] | None = None,
) -> list[str]:
    """What keeps module source ``current`` from doing what ``legacy`` does (empty: nothing),
    up to comments and docstrings, as the names of the top-level definitions concerned.

    Every top-level statement of ``legacy`` must be in ``current`` unchanged, except the
    definitions named in ``ignore`` and imports ``current`` dropped (a dropped import that is
    still used fails loudly, never silently); a statement only ``current`` has must bind new
    names only (a new function, a new import), so that it cannot change what the others do.
    A name in ``reviewed`` may differ when the current statement binding it is the reviewed
    version (the first 16 hex digits of its
    :func:`~diffusion_attribution.identity.source_digest`; ``None``: the name is gone).
    """
    reviewed = reviewed or {}
    old, new = _statements(legacy, ignore), _statements(current, ignore)
    old_src, new_src = {s for s, _, _ in old}, {s for s, _, _ in new}
    old_names = set().union(*(b for _, b, _ in old))
    found = set()
    for src, names, is_import in old:
        if src not in new_src and not is_import and not (names and names <= reviewed.keys()):
            found.add(_what(names, src))
    for src, names, _ in new:
        if src in old_src:
            continue
        if names and names <= reviewed.keys():
            if any(reviewed[n] != source_digest(src)[:16] for n in names):
                found.add(f"{_what(names, src)} (not the reviewed version)")
        elif not names or names & old_names:
            found.add(_what(names, src))
    return sorted(found)


def _current_sources(names: Iterable[str]) -> dict[str, str]:
    """The current source of the package's modules ``names`` (``"train.py"``, ...)."""
    import importlib

    return {
        n: inspect.getsource(importlib.import_module(f"{__package__}.{n.removesuffix('.py')}"))
        for n in names
    }


def _current_job_functions() -> list[tuple[str, str, str]]:
    """(file, qualified name, normalized source) of each function the current job code
    covers (:func:`~diffusion_attribution.retrain._job_functions`)."""
    from .retrain import _job_functions

    return [
        (
            Path(inspect.getsourcefile(inspect.unwrap(f))).name,
            f.__qualname__,
            normalized_source(inspect.getsource(f)),
        )
        for f in _job_functions()
    ]


def reviewed_digest(file: str, name: str) -> str | None:
    """The entry of :data:`REVIEWED` for the current definition of ``name`` in the package's
    module ``file`` (``None`` when it has none), to pin a version after reviewing it."""
    statements = _statements(_current_sources([file])[file], ())
    found = [src for src, names, _ in statements if name in names]
    return source_digest(found[-1])[:16] if found else None


def _differences_from_now(texts: Mapping[str, str], names: Iterable[str]) -> list[str]:
    current = _current_sources(names)
    return [
        f"{n}: {what}"
        for n in names
        for what in differences(texts[n], current[n], NAMING.get(n, ()), REVIEWED.get(n))
    ]


@dataclass
class _Legacy:
    """The raw bytes a legacy fingerprint hashed at one commit."""

    commit: str
    code: bytes
    job_code: str = ""


def _legacy_variants(history: _History, kind: str) -> tuple[list[_Legacy], str]:
    """The distinct legacy sources (newest first) whose code is the current code, for
    ``kind`` ``"recipe"`` (models) or ``"measure"`` (cache keys); and a note when none is."""
    if kind == "recipe":
        job_now = _current_job_functions()
        files = _RECIPE_FILES
        needed = (
            *files,
            *dict.fromkeys([f for f, _ in _LEGACY_JOB_CODE] + [f for f, *_ in job_now]),
        )
    else:
        files, needed = _MEASURE_FILES, _MEASURE_FILES
    seen, out, differ = set(), [], []
    for commit in history.commits():
        raw = history.files(commit, needed)
        if raw is None:
            continue
        sig = tuple(hashlib.sha256(raw[n]).hexdigest() for n in needed)
        if sig in seen:
            continue
        seen.add(sig)
        texts = {n: _decode(raw[n]) for n in needed}
        job_code, changed = "", []
        if kind == "recipe":
            job = [legacy_getsource(texts[f], q) for f, q in _LEGACY_JOB_CODE]
            if None in job or "def _job_code(" not in texts["retrain.py"]:
                continue  # an older scheme, without the job code
            job_code = "".join(job)
            for f, q, now in job_now:
                then = legacy_getsource(texts[f], q)
                if then is None or normalized_source(then) != now:
                    changed.append(f"{f}: {q}")
        changed += _differences_from_now(texts, files)
        if changed:
            differ.append((commit, changed))
            continue
        legacy = _Legacy(commit, b"".join(raw[n] for n in files), job_code)
        if all((x.code, x.job_code) != (legacy.code, legacy.job_code) for x in out):
            out.append(legacy)  # commits that differ elsewhere give the same fingerprints
    if history.problem:
        note = history.problem
    elif out:
        note = ""
    elif differ:
        commit, changed = differ[0]
        note = (
            f"the code of every legacy commit ({len(differ)} distinct) differs from the current "
            f"code; at {commit[:7]} in {'; '.join(changed)}"
        )
    else:
        note = "no commit of the legacy scheme in the git history"
    return out, note


# -- models ---------------------------------------------------------------------------------


def _legacy_fingerprint(legacy: _Legacy, parts: Iterable[object]) -> str:
    """The legacy ``train.fingerprint`` of ``parts`` with the sources of ``legacy``."""
    from pydantic import BaseModel

    h = hashlib.sha256(legacy.code)
    for p in parts:
        if isinstance(p, Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, BaseModel):
            h.update(p.model_dump_json().encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


def adopt_legacy_models(
    jobs: Iterable[RetrainJob], repo_root: str | Path
) -> list[tuple[Path, Path]]:
    """Rename the models (and checkpoints of interrupted jobs) of legacy-named retraining jobs
    to their current names, instead of retraining them; returns the ``(from, to)`` pairs.

    For each :class:`~diffusion_attribution.retrain.RetrainJob` whose ``output`` does not
    exist, a file ``<name>-<16 hex>.pt`` in its folder is renamed to ``output`` when the hex is
    the job's legacy fingerprint at a commit of ``repo_root`` (the repository's root) whose
    training code is the current one (module docstring). Failing that, a checkpoint
    ``<legacy output>.<16 hex>.ckpt`` of the job is renamed to
    :func:`~diffusion_attribution.retrain.checkpoint_path`, so the job resumes from it. Call
    it before :func:`~diffusion_attribution.retrain.prune`, which would move these files aside.
    """
    from .config import DiffusionConfig, ModelConfig, TrainConfig
    from .data import ImageDataset
    from .retrain import _configs, checkpoint_path, file_digest

    listings: dict[Path, list[str]] = {}
    pending = []
    for job in jobs:
        out = Path(job.output)
        if out.exists():
            continue
        if out.parent not in listings:
            listings[out.parent] = (
                sorted(p.name for p in out.parent.glob("*")) if out.parent.is_dir() else []
            )
        prefix = f"{job.name}-"
        found = {
            n
            for n in listings[out.parent]
            if n.startswith(prefix) and _LEGACY_FILE.fullmatch(n[len(prefix) :])
        }
        if found:
            pending.append((job, found))
    if not pending:
        return []
    variants, note = _legacy_variants(_History(repo_root), "recipe")
    moved: list[tuple[Path, Path]] = []
    digests: dict[str, str] = {}
    for job, found in pending if variants else []:
        out = Path(job.output)
        if job.data_path not in digests:
            digests[job.data_path] = file_digest(job.data_path)
        # the parts of the legacy make_job: data digest, job code, configs, kept ids, seed
        configs = (
            ModelConfig(**job.model),
            DiffusionConfig(**job.diffusion),
            TrainConfig(**job.train),
        )
        rest = (*configs, tuple(job.keep), int(job.seed))
        for legacy in variants:
            fp = _legacy_fingerprint(legacy, (digests[job.data_path], legacy.job_code, *rest))
            model = f"{job.name}-{fp}.pt"
            if model in found:
                os.replace(out.parent / model, out)
                moved.append((out.parent / model, out))
                break
            if any(n.startswith(f"{model}.") for n in found):
                images = ImageDataset.load(job.data_path).subset(list(job.keep)).images
                ckpt = f"{model}.{_legacy_fingerprint(legacy, (*_configs(job), images))}.ckpt"
                if ckpt in found:
                    new = checkpoint_path(job)
                    os.replace(out.parent / ckpt, new)
                    moved.append((out.parent / ckpt, new))
                    break
    total = sum(len(f) for _, f in pending)
    if moved:
        print(
            f"migrate: renamed {len(moved)} of {total} legacy-named model files to their current "
            "names (nothing retrained)"
        )
    else:
        why = note or "none is named by a job's legacy fingerprint"
        print(f"migrate: adopted none of {total} legacy-looking model files: {why}")
    return moved


# -- measurement caches ---------------------------------------------------------------------


def _stored_key(path: Path) -> object:
    try:
        return torch.load(path, weights_only=True).get("key")
    except Exception:  # an unreadable entry is not adopted (measure_models recomputes it)
        return None


def adopt_legacy_measurements(
    models: Mapping[str, str | Path],
    measurements: Mapping[str, Measurement],
    queries: Tensor,
    num_draws: Mapping[str, int],
    seed: int,
    cache_dir: str | Path,
    *,
    trajectories: Tensor | None = None,
    batch_size: int = 1024,
    repo_root: str | Path,
) -> list[tuple[Path, Path]]:
    """Re-key the cached measurements of the legacy key scheme for
    :func:`~diffusion_attribution.ground_truth.measure_models`, instead of measuring again;
    returns the ``(from, to)`` pairs (the same path for an entry re-keyed in place).

    Takes the arguments of the ``measure_models`` call it precedes. For each label whose entry
    ``cache_dir/<label>.pt`` is missing or keyed otherwise, an entry is adopted when its
    stored key is the legacy key of this model file and these settings at a commit of
    ``repo_root`` whose measurement code is the current one (module docstring). Candidates:
    the label's own entry and, for a label ``<name>-<16 hex>`` (a model renamed by
    :func:`adopt_legacy_models` keeps its bytes), the entries ``<name>-<other 16 hex>.pt`` of
    labels not asked for. An adopted entry keeps its values; only its name and key change.
    """
    from .ground_truth import cache_key, cache_settings

    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    settings = cache_settings(measurements, queries, num_draws, seed, trajectories, batch_size)
    names = sorted(f.name for f in cache_dir.glob("*.pt"))
    pending = []
    for label, path in models.items():
        path, cache = Path(path), cache_dir / f"{label}.pt"
        if not path.is_file():
            continue
        key = cache_key(settings, path)
        if cache.is_file():
            if _stored_key(cache) != key:
                pending.append((path, cache, key, [cache]))
            continue
        m = _LABEL.fullmatch(label)
        if m:
            same_name = re.compile(rf"{re.escape(m[1])}-{_HEX}\.pt")
            found = [
                cache_dir / n
                for n in names
                if same_name.fullmatch(n) and n.removesuffix(".pt") not in models
            ]
            if found:
                pending.append((path, cache, key, found))
    if not pending:
        return []
    variants, note = _legacy_variants(_History(repo_root), "measure")
    plain = json.dumps(settings, sort_keys=True, default=str).encode()
    moved: list[tuple[Path, Path]] = []
    for path, cache, key, found in pending if variants else []:
        h = hashlib.sha256(plain)
        h.update(path.read_bytes())
        legacy_keys = set()
        for legacy in variants:
            k = h.copy()
            k.update(legacy.code)
            legacy_keys.add(k.hexdigest()[:16])
        for old in found:
            if not old.is_file() or _stored_key(old) not in legacy_keys:
                continue
            if old != cache:
                os.replace(old, cache)  # first the rename: a crash leaves a legacy key
            saved = torch.load(cache, weights_only=True)
            atomic_save({**saved, "key": key}, cache)
            moved.append((old, cache))
            break
    total = len(pending)
    if moved:
        print(
            f"migrate: re-keyed {len(moved)} of {total} cached measurements of the legacy "
            "scheme (nothing measured again)"
        )
    else:
        why = note or "no entry carries a legacy key of its model and these settings"
        print(f"migrate: adopted none of {total} cached measurements without a current key: {why}")
    return moved
