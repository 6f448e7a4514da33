"""Score matrices: one key whose fields mean the same for every producer, and one lookup.

Every method of the pipeline -- K-FAC influence (``influence``), TRAK and D-TRAK (``trak``),
the similarity baselines (``similarity``) -- produces (Q, N) float32 score matrices in the
convention stated once in :mod:`diffusion_attribution.attribution.influence`
(``score[q, j] ~ m(theta_{-j}, x_q) - m(theta, x_q)``). Each matrix is named by a
:class:`ScoreKey`:

============== =========================================================================
field          meaning (the same for every method)
============== =========================================================================
``method``     ``"kfac"``, ``"trak"``, ``"d-trak"``, ``"das"``, ``"grad_dot"``,
               ``"grad_cos"``, ``"pixel"`` or ``"feature_cos"``
``measurement`` the query measurement whose gradient the scores use (``"loss"``,
               ``"elbo"``, ``"trajectory"``, ``"square_norm"``, ``"output_mean"`` (DAS's),
               ``"journey"`` (TRAK with it is Journey-TRAK), ``"l_t=<t>"``), or ``"none"`` for a method without a
               query gradient (pixel and feature similarity)
``curvature``  the curvature the query gradients are preconditioned with: a K-FAC variant
               (``"mc_expand"``, ...) for K-FAC influence, ``"projected_empirical"`` for
               TRAK / D-TRAK (the projected GGN^loss), ``"projected_output_ggn"`` for DAS,
               ``"none"`` for no curvature
``damping``    the absolute damping added to that curvature (0.0 without one)
``compression`` how the preconditioned query gradients are stored: ``"none"``,
               ``"int8"``, ``"int4"`` or ``"svd<r>"`` (App. C)
``precision``  floating-point format the features are stored and solved in
               (``"float32"``; ``"float16"`` for TRAK's Fig. 18)
============== =========================================================================

A :class:`ScoreSet` holds matrices with what later stages need to read them (e.g. the mean
eigenvalue of TRAK's projected Fisher, against which its damping is reported); it saves to a
file loadable with ``torch.load(weights_only=True)``. :func:`matches` is the one rule by which
a key -- or a row of an LDS table, which carries the key's fields as columns -- is looked up,
used by :meth:`ScoreSet.find` and :func:`select`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from diffusion_attribution.core.io import CorruptFileError, atomic_save, check_finite, load

METHODS = ("kfac", "trak", "d-trak", "das", "grad_dot", "grad_cos", "pixel", "feature_cos")
CONVENTION = "score[q, j] ~ m(theta_{-j}, x_q) - m(theta, x_q)"
_FORMAT = "diffusion_attribution.ScoreSet/1"


@dataclass(frozen=True)
class ScoreKey:
    """The name of one score matrix (the table in the module docstring)."""

    method: str
    measurement: str
    curvature: str = "none"
    damping: float = 0.0
    compression: str = "none"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ScoreKey.method: unknown {self.method!r}; one of {METHODS}")
        object.__setattr__(self, "damping", float(self.damping))

    @property
    def label(self) -> str:
        """A readable one-line name, e.g. ``kfac/mc_expand/loss/damping=1e-08/int8``."""
        parts = [self.method]
        if self.curvature != "none":
            parts.append(self.curvature)
        parts.append(self.measurement)
        if self.damping:
            parts.append(f"damping={self.damping:g}")
        if self.compression != "none":
            parts.append(self.compression)
        if self.precision != "float32":
            parts.append(self.precision)
        return "/".join(parts)


KEY_FIELDS = tuple(f.name for f in fields(ScoreKey))


def matches(record: ScoreKey | Mapping | pd.Series, rtol: float = 1e-6, **query: object) -> bool:
    """Whether ``record`` (a key, or anything with the key's fields) has every field in
    ``query``; dampings compare with relative tolerance ``rtol`` (a damping computed from a
    mean eigenvalue and read back from a file differs in the last digits)."""
    for name, want in query.items():
        if name not in KEY_FIELDS:
            raise ValueError(f"unknown score key field {name!r}; fields are {KEY_FIELDS}")
        have = getattr(record, name) if isinstance(record, ScoreKey) else record[name]
        if name == "damping":
            if not math.isclose(float(have), float(want), rel_tol=rtol, abs_tol=0.0):
                return False
        elif have != want:
            return False
    return True


@dataclass
class ScoreSet(Mapping):
    """Score matrices by key, with the facts needed to read them (``meta``: plain values,
    e.g. ``{"mean_eigenvalue": {"trak": 3.1e-4, "d-trak": 0.02}}``)."""

    scores: dict[ScoreKey, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key: ScoreKey) -> Tensor:
        try:
            return self.scores[key]
        except KeyError:
            raise KeyError(f"no score matrix {key.label}") from None

    def __iter__(self) -> Iterator[ScoreKey]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def __or__(self, other: ScoreSet) -> ScoreSet:
        clash = set(self.scores) & set(other.scores)
        if clash:
            raise ValueError(f"score matrices in both sets: {sorted(k.label for k in clash)}")
        return ScoreSet({**self.scores, **other.scores}, {**self.meta, **other.meta})

    def find(self, **query: object) -> dict[ScoreKey, Tensor]:
        """Every matrix whose key has the fields in ``query`` (:func:`matches`)."""
        return {k: v for k, v in self.scores.items() if matches(k, **query)}

    def one(self, **query: object) -> tuple[ScoreKey, Tensor]:
        """The single matrix matching ``query``; a clear error when none or several do."""
        found = self.find(**query)
        if len(found) != 1:
            what = ", ".join(f"{k}={v!r}" for k, v in query.items())
            raise KeyError(
                f"{len(found)} score matrices match {what}"
                + (f": {sorted(k.label for k in found)}" if found else "")
            )
        return next(iter(found.items()))

    def relative_damping(self, key: ScoreKey) -> float:
        """``key.damping`` over the mean eigenvalue of its method's curvature when the set
        records one (TRAK / D-TRAK), else NaN."""
        eig = self.meta.get("mean_eigenvalue", {}).get(key.method)
        return key.damping / eig if eig else float("nan")

    def save(self, path: str | Path) -> None:
        """Atomically, loadable with ``torch.load(weights_only=True)``. Every matrix must be
        finite (:class:`~diffusion_attribution.core.io.NonFiniteError` names the first that is not)
        except those of ``precision="float16"``, traker's float16 pipeline, whose overflow
        to +-Inf is what Fig. 18 shows."""
        keys = list(self.scores)
        for k in keys:
            if k.precision != "float16":
                check_finite(self.scores[k], f"ScoreSet.save({path}): {k.label}")
        atomic_save(
            {
                "format": _FORMAT,
                "convention": CONVENTION,
                "keys": [asdict(k) for k in keys],
                "scores": torch.stack([self.scores[k] for k in keys]) if keys else torch.empty(0),
                "meta": self.meta,
            },
            path,
            finite=False,  # checked above, float16 matrices aside
        )

    @classmethod
    def load(cls, path: str | Path) -> ScoreSet:
        """Inverse of :meth:`save`. A missing, truncated, bit-flipped or foreign file raises
        ``FileNotFoundError`` or :class:`~diffusion_attribution.core.io.CorruptFileError` naming it
        (:func:`~diffusion_attribution.core.io.load`)."""
        state = load(path, "score file")
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise CorruptFileError(f"{path} is not a score file written by ScoreSet.save")
        try:
            keys = [ScoreKey(**d) for d in state["keys"]]
            return cls(dict(zip(keys, state["scores"], strict=True)), state.get("meta", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(
                f"score file {path} does not hold what ScoreSet.save writes ({err})"
            ) from None


def rows(table: pd.DataFrame, target: str | None = None, **query: object) -> pd.DataFrame:
    """The rows of an LDS table (one row per (score key, target), the key's fields as
    columns) evaluated for ``target`` (all targets when ``None``) whose key matches ``query``
    (:func:`matches`: the same rule as :meth:`ScoreSet.find`)."""
    unknown = sorted(set(query) - set(KEY_FIELDS))
    if unknown:
        raise ValueError(f"unknown score key field {unknown[0]!r}; fields are {KEY_FIELDS}")
    t = table if target is None else table[table.target == target]
    keep = [matches(row, **query) for _, row in t.iterrows()]
    return t[np.array(keep, dtype=bool)]


def select(table: pd.DataFrame, target: str, **query: object) -> pd.Series | None:
    """The row of :func:`rows` with the best LDS (e.g. "*", best of a damping sweep), or
    ``None`` when no row matches."""
    t = rows(table, target, **query)
    if t.empty:
        return None
    return t.loc[t.lds.idxmax()]
