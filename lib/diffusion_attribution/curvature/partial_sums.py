"""K-FAC factors and EK-FAC corrections as sums over rows, additive over shards of examples.

The hooks (:mod:`~diffusion_attribution.curvature.hooks`) keep the matrices that
:mod:`~diffusion_attribution.curvature.kfac`'s module docstring defines as *sums over rows*, so
that a fit can be split into shards of examples and the shards added. With the inputs
``a_rs`` and output gradients ``b_rs = d ||y_r - f_r||^2 / d out_rs`` of layer l at positions
``s = 1..S_l`` of row r (:mod:`~diffusion_attribution.curvature.layers`), one shard contributes
(:class:`FactorSums`)

* expand: ``sum_{r,s} a_rs a_rs^T`` and ``sum_{r,s} a_rs`` (count ``R S_l``),
  ``sum_{r,s} b_rs b_rs^T``;
* reduce: ``sum_r abar_r abar_r^T`` and ``sum_r abar_r`` (``abar_r`` = mean over positions,
  count ``R``), ``sum_r (sum_s b_rs)(sum_s b_rs)^T``;

and :func:`to_kfac` normalises the combined sums, ``A = sum / (R S_l)`` (expand) or
``sum / R`` (reduce), ``G = sum / (R D)``, eigendecomposes them and returns a
:class:`~diffusion_attribution.curvature.kfac.KFAC`. With ``separate_weight_and_bias=False`` the
joint block's input covariance is that of ``[a, 1]``: ``[[A, abar], [abar^T, 1]]`` with
``abar`` the normalised sum of inputs, so the sums do not depend on the bias mode.

EK-FAC's corrections (:class:`CorrectionSums`) are per block ``sum_r ((Q_G^T grad_W(r)
Q_A)_ij)^2`` in the eigenbases of the combined factors; :func:`apply_corrections` divides them
by ``R D``. Both kinds of sums add with ``+`` or :func:`combine` and are saved as plain tensors
(``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.curvature.kronecker import (
    KroneckerBlock,
    LayerFactors,
    Precision,
    check_factor_finite,
    kronecker_blocks,
)

__all__ = [
    "CorrectionSums",
    "FactorSums",
    "apply_corrections",
    "basis_fingerprint",
    "combine",
    "to_kfac",
]

_SUMS_FORMAT = "diffusion_attribution.factors.FactorSums"
_CORR_FORMAT = "diffusion_attribution.factors.CorrectionSums"
_VERSION = 1


def _disjoint(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged half-open ranges; raises if two overlap."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a < out[-1][1]:
            raise ValueError(
                f"example ranges overlap: [{out[-1][0]}, {out[-1][1]}) and [{a}, {b}); "
                "each example may be counted in one shard only"
            )
        if out and a == out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@dataclass
class FactorSums:
    """Unnormalised K-FAC factor sums of a shard of examples (module docstring).

    ``A[name]`` / ``a[name]``: sum of input outer products / of inputs (expand: over rows and
    positions, reduce: of the position means over rows; ``None`` for a layer without weight
    in params); ``G[name]``: sum of output-gradient outer products (MC draws weighted 1/M);
    all float64. ``positions[name]`` is ``S_l``, ``num_rows`` the rows ``R`` summed,
    ``examples`` the half-open ranges of global example ids covered. Add shards with ``+`` or
    :func:`combine`; :meth:`save` / :meth:`load` use plain tensors (``weights_only=True``).
    """

    fisher: str
    kfac: str
    mc_seed: int
    mc_samples: int
    output_dim: int
    draws_per_example: int
    layers: list[str]
    param_positions: list[dict[str, int]]
    param_shapes: list[tuple[int, ...]]
    positions: dict[str, int]
    A: dict[str, Tensor | None]
    a: dict[str, Tensor | None]
    G: dict[str, Tensor]
    num_rows: int
    examples: list[tuple[int, int]] = field(default_factory=list)

    def _settings(self) -> tuple:
        return (
            self.fisher,
            self.kfac,
            self.mc_seed if self.fisher == "mc" else None,
            self.mc_samples,
            self.output_dim,
            self.draws_per_example,
            tuple(self.layers),
            tuple(tuple(sorted(p.items())) for p in self.param_positions),
            tuple(self.param_shapes),
            tuple(sorted(self.positions.items())),
        )

    def __add__(self, other: FactorSums) -> FactorSums:
        if not isinstance(other, FactorSums):
            return NotImplemented
        if self._settings() != other._settings():
            raise ValueError(
                "cannot add factor sums fitted with different settings or layers: "
                f"{self._settings()[:6]} vs {other._settings()[:6]}"
            )
        examples = _disjoint([*self.examples, *other.examples])

        def add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
            return None if x is None else x + y.to(x.device)

        return FactorSums(
            **{k: getattr(self, k) for k in ("fisher", "kfac", "mc_seed", "mc_samples")},
            output_dim=self.output_dim,
            draws_per_example=self.draws_per_example,
            layers=list(self.layers),
            param_positions=[dict(p) for p in self.param_positions],
            param_shapes=list(self.param_shapes),
            positions=dict(self.positions),
            A={k: add(v, other.A[k]) for k, v in self.A.items()},
            a={k: add(v, other.a[k]) for k, v in self.a.items()},
            G={k: v + other.G[k].to(v.device) for k, v in self.G.items()},
            num_rows=self.num_rows + other.num_rows,
            examples=examples,
        )

    @property
    def num_examples(self) -> int:
        return sum(b - a for a, b in self.examples)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (CPU), strings, numbers, lists and dicts: ``weights_only``-loadable."""

        def cpu(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.detach().cpu()

        return {
            "format": _SUMS_FORMAT,
            "version": _VERSION,
            "fisher": self.fisher,
            "kfac": self.kfac,
            "mc_seed": self.mc_seed,
            "mc_samples": self.mc_samples,
            "output_dim": self.output_dim,
            "draws_per_example": self.draws_per_example,
            "layers": [
                {
                    "name": name,
                    "param_positions": dict(pos),
                    "positions": self.positions[name],
                    "A": cpu(self.A[name]),
                    "a": cpu(self.a[name]),
                    "G": cpu(self.G[name]),
                }
                for name, pos in zip(self.layers, self.param_positions, strict=True)
            ],
            "param_shapes": [list(s) for s in self.param_shapes],
            "num_rows": self.num_rows,
            "examples": [list(r) for r in self.examples],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FactorSums:
        _check_format(state, _SUMS_FORMAT)
        layers = state["layers"]
        return cls(
            fisher=state["fisher"],
            kfac=state["kfac"],
            mc_seed=int(state["mc_seed"]),
            mc_samples=int(state["mc_samples"]),
            output_dim=int(state["output_dim"]),
            draws_per_example=int(state["draws_per_example"]),
            layers=[d["name"] for d in layers],
            param_positions=[dict(d["param_positions"]) for d in layers],
            param_shapes=[tuple(s) for s in state["param_shapes"]],
            positions={d["name"]: int(d["positions"]) for d in layers},
            A={d["name"]: d["A"] for d in layers},
            a={d["name"]: d["a"] for d in layers},
            G={d["name"]: d["G"] for d in layers},
            num_rows=int(state["num_rows"]),
            examples=[(int(a), int(b)) for a, b in state["examples"]],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically (``io.atomic_save``)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FactorSums:
        """Load with ``torch.load(weights_only=True)``."""
        return cls.from_state_dict(torch.load(path, map_location=device, weights_only=True))


def _check_format(state: dict[str, Any], fmt: str) -> None:
    if state.get("format") != fmt or state.get("version") != _VERSION:
        raise ValueError(
            f"not a {fmt} v{_VERSION} state dict "
            f"(format={state.get('format')!r}, version={state.get('version')!r})"
        )


def combine(parts: Iterable[FactorSums] | Iterable[CorrectionSums]):
    """The sum of shards' :class:`FactorSums` (or :class:`CorrectionSums`); raises if their
    settings differ or two shards cover the same example."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine needs at least one part")
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _normalised(sums: FactorSums, name: str, joint: bool) -> tuple[Tensor | None, Tensor]:
    """(A, G) of layer ``name``: ``A = sum / (R S_l)`` (expand) or ``sum / R`` (reduce),
    augmented to ``[[A, abar], [abar^T, 1]]`` for a joint block; ``G = sum / (R D)``."""
    r = sums.num_rows
    G = sums.G[name] / (r * sums.output_dim)
    A_sum = sums.A[name]
    if A_sum is None:
        return None, G
    count = r * sums.positions[name] if sums.kfac == "expand" else r
    A = A_sum / count
    if joint:
        abar = (sums.a[name] / count)[:, None]
        one = torch.ones(1, 1, dtype=A.dtype, device=A.device)
        A = torch.cat([torch.cat([A, abar], 1), torch.cat([abar.T, one], 1)], 0)
    return A, G


def to_kfac(
    sums: FactorSums,
    *,
    separate_weight_and_bias: bool = True,
    meta: dict[str, Any] | None = None,
    precision: Precision = "float64",
    folder: str | os.PathLike | None = None,
    release: bool = False,
) -> KFAC:
    """Normalise combined factor sums (:func:`_normalised`) and eigendecompose them in
    ``precision``, one layer at a time: the :class:`~diffusion_attribution.curvature.kfac.KFAC`
    of the rows summed. Raises ``FloatingPointError`` naming the layer if a factor is not
    finite.

    ``folder``: each layer's decomposed blocks are written there as soon as they exist
    (``layer_<index>_<key>.pt``, ``key`` a digest of the sums' settings, rows, examples, bias
    mode and precision) and read back instead of decomposed again, so an interrupted
    decomposition resumes where it stopped. ``release``: each layer's sums are dropped from
    ``sums`` once it is decomposed, so the sums and the blocks together never hold much more
    than the sums alone (``sums`` cannot be used afterwards)."""
    key = hashlib.sha256(
        repr(
            (sums._settings(), sums.num_rows, sums.examples, separate_weight_and_bias, precision)
        ).encode()
    ).hexdigest()[:16]
    blocks: list[KroneckerBlock] = []
    for i, (name, pos) in enumerate(zip(sums.layers, sums.param_positions, strict=True)):
        path = None if folder is None else Path(folder) / f"layer_{i:04d}_{key}.pt"
        if path is not None and path.exists():
            states = torch.load(path, map_location=sums.G[name].device, weights_only=True)
            blocks += [KroneckerBlock.from_state(d) for d in states]
        else:
            blocks += _layer_blocks(sums, name, pos, separate_weight_and_bias, precision, path)
        if release:
            sums.A[name] = sums.a[name] = sums.G[name] = None  # type: ignore[assignment]
    info = {
        "backend": "hooks",
        "fisher": sums.fisher,
        "kfac": sums.kfac,
        "ekfac": False,
        "separate_weight_and_bias": separate_weight_and_bias,
        "num_examples": sums.num_examples,
        "draws_per_example": sums.draws_per_example,
        "num_rows": sums.num_rows,
        "output_dim": sums.output_dim,
        "mc_seed": sums.mc_seed,
        "mc_samples": sums.mc_samples,
        "examples": [list(r) for r in sums.examples],
    }
    info.update(meta or {})
    return KFAC(blocks, sums.param_shapes, info)


def _layer_blocks(
    sums: FactorSums,
    name: str,
    pos: dict[str, int],
    separate_weight_and_bias: bool,
    precision: Precision,
    path: Path | None,
) -> list[KroneckerBlock]:
    """Layer ``name``'s blocks (:func:`to_kfac`), saved to ``path`` where one is given."""
    joint = not separate_weight_and_bias and "weight" in pos and "bias" in pos
    A, G = _normalised(sums, name, joint)
    check_factor_finite(name, "input covariance A", A)
    check_factor_finite(name, "gradient covariance G", G)
    layer = LayerFactors(name, dict(pos), A=A, G=G)
    blocks = kronecker_blocks(
        [layer],
        sums.param_shapes,
        ekfac=False,
        separate_weight_and_bias=separate_weight_and_bias,
        precision=precision,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save([b.state() for b in blocks], path)
    return blocks


def basis_fingerprint(basis: KFAC) -> str:
    """SHA-256 of every block's eigenvectors (float64 bytes): identifies the eigenbases the
    corrections were computed in."""
    h = hashlib.sha256()
    for b in basis.blocks:
        for Q in (b.QG, b.QA):
            h.update(Q.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CorrectionSums:
    """Unnormalised EK-FAC corrections of a shard: ``E[i]`` (out, k) float64 for block ``i``
    of the basis (module docstring), ``num_rows`` rows summed, ``examples`` the ranges of
    global example ids covered, ``basis`` the :func:`basis_fingerprint` of the eigenbases."""

    fisher: str
    mc_seed: int
    mc_samples: int
    output_dim: int
    basis: str
    E: list[Tensor]
    num_rows: int
    examples: list[tuple[int, int]] = field(default_factory=list)

    def _settings(self) -> tuple:
        mc = self.mc_seed if self.fisher == "mc" else None
        shapes = tuple(tuple(e.shape) for e in self.E)
        return (self.fisher, mc, self.mc_samples, self.output_dim, self.basis, shapes)

    def __add__(self, other: CorrectionSums) -> CorrectionSums:
        if not isinstance(other, CorrectionSums):
            return NotImplemented
        if self._settings() != other._settings():
            raise ValueError(
                "cannot add corrections computed with different settings or eigenbases: "
                f"{self._settings()[:5]} vs {other._settings()[:5]}"
            )
        return CorrectionSums(
            fisher=self.fisher,
            mc_seed=self.mc_seed,
            mc_samples=self.mc_samples,
            output_dim=self.output_dim,
            basis=self.basis,
            E=[x + y.to(x.device) for x, y in zip(self.E, other.E, strict=True)],
            num_rows=self.num_rows + other.num_rows,
            examples=_disjoint([*self.examples, *other.examples]),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _CORR_FORMAT,
            "version": _VERSION,
            "fisher": self.fisher,
            "mc_seed": self.mc_seed,
            "mc_samples": self.mc_samples,
            "output_dim": self.output_dim,
            "basis": self.basis,
            "E": [e.detach().cpu() for e in self.E],
            "num_rows": self.num_rows,
            "examples": [list(r) for r in self.examples],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CorrectionSums:
        _check_format(state, _CORR_FORMAT)
        return cls(
            fisher=state["fisher"],
            mc_seed=int(state["mc_seed"]),
            mc_samples=int(state["mc_samples"]),
            output_dim=int(state["output_dim"]),
            basis=state["basis"],
            E=list(state["E"]),
            num_rows=int(state["num_rows"]),
            examples=[(int(a), int(b)) for a, b in state["examples"]],
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> CorrectionSums:
        return cls.from_state_dict(torch.load(path, map_location=device, weights_only=True))


def apply_corrections(basis: KFAC, corrections: CorrectionSums) -> KFAC:
    """EK-FAC: ``basis`` with its Kronecker eigenvalues replaced by
    ``corrections.E / (R D)``. Raises if the corrections were computed in other eigenbases or
    on other examples than the basis' factors."""
    if corrections.basis != basis_fingerprint(basis):
        raise ValueError("the corrections were computed in other eigenbases than basis")
    examples = basis.meta.get("examples")
    if examples is not None and [list(r) for r in corrections.examples] != examples:
        raise ValueError(
            f"corrections cover examples {corrections.examples}, the basis' factors {examples}"
        )
    scale = 1.0 / (corrections.num_rows * corrections.output_dim)
    blocks = []
    for b, e in zip(basis.blocks, corrections.E, strict=True):
        check_factor_finite(b.layer, "EK-FAC eigenvalue corrections", e)
        blocks.append(
            KroneckerBlock(
                b.layer,
                b.kind,
                b.param_indices,
                b.offsets,
                b.cols,
                b.out,
                QG=b.QG,
                QA=b.QA,
                eig=(e * scale).to(b.QG.device, b.QG.dtype),
                G=b.G,
                A=b.A,
            )
        )
    meta = {**basis.meta, "ekfac": True}
    return KFAC(blocks, basis.param_shapes, meta)
