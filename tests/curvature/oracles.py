"""Tiny float64 eps-models and brute-force oracles shared by the curvature tests.

Normalisation of the oracles (:mod:`diffusion_attribution.curvature.kfac`'s module docstring):
with R rows, D outputs per row, J_r the Jacobian of row r's flattened prediction and g_r the
gradient of row r's per-pixel-mean squared error,
    GGN (type2 / MC)  = 2 / (R D) sum_r J_r^T J_r,
    empirical Fisher  = D / R   sum_r g_r g_r^T   (= 1 / (R D) sum_r g^_r g^_r^T with g^_r
                                                  the gradient of the summed squared error:
                                                  the MC Fisher's scale, as in curvlinops).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.curvature.rows import noisy_rows
from diffusion_attribution.diffusion.ddpm import NoiseSchedule

T = 10
SCHEDULE = NoiseSchedule.linear(T, 1e-3, 0.2)
F64 = torch.float64
N, S = 5, 2  # examples and draws of the TINY_4X4 data (``data`` in conftest.py)


# ---------------------------------------------------------------------------------------------
# tiny eps-models (float64)
# ---------------------------------------------------------------------------------------------


class LinearEps(nn.Module):
    """flatten -> Linear(D, D) -> reshape; t ignored (no weight sharing)."""

    def __init__(self, shape=(1, 2, 2), bias: bool = True):
        super().__init__()
        self.shape = shape
        d = math.prod(shape)
        self.lin = nn.Linear(d, d, bias=bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.lin(x.flatten(1)).reshape(-1, *self.shape)


class MLPEps(nn.Module):
    """[flatten(x), t / T] -> Linear -> tanh -> Linear -> reshape (no weight sharing)."""

    def __init__(self, shape=(1, 2, 2), hidden: int = 3):
        super().__init__()
        self.shape = shape
        d = math.prod(shape)
        self.l1 = nn.Linear(d + 1, hidden)
        self.l2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1), (t.to(x.dtype) / T)[:, None]], dim=1)
        return self.l2(torch.tanh(self.l1(h))).reshape(-1, *self.shape)


class ConvAttnEps(nn.Module):
    """Conv2d -> (+ Linear time embedding) -> token self-attention (Linear q/k/v) -> Conv2d."""

    def __init__(self, c: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.temb = nn.Linear(1, c)
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.temb((t.to(x.dtype) / T)[:, None])
        h = torch.tanh(self.conv_in(x) + emb[:, :, None, None])
        b, c, hh, ww = h.shape
        tok = h.flatten(2).transpose(1, 2)  # (B, HW, C): Linear with weight sharing
        att = torch.softmax(self.q(tok) @ self.k(tok).transpose(1, 2) / math.sqrt(c), dim=-1)
        h = h + (att @ self.v(tok)).transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(h)


def make(cls, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).double()


def draws(n: int, s: int, shape=(1, 2, 2), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g, dtype=F64)
    t = torch.randint(1, T + 1, (n, s), generator=g)
    eps = torch.randn(n, s, *shape, generator=g, dtype=F64)
    return x0, t, eps


# ---------------------------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------------------------


def _functional(model: nn.Module, params: list[Tensor]):
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def call(flat: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        d = {k: c.view(s) for k, c, s in zip(keys, flat.split(sizes), shapes, strict=True)}
        return torch.func.functional_call(model, d, (xt, t))

    flat0 = torch.cat([p.detach().flatten() for p in params])
    return call, flat0


def brute_ggn(model, params, x0, t, eps) -> Tensor:
    """2 / (R D) sum_r J_r^T J_r from the explicit Jacobian."""
    xt, tt, _ = noisy_rows(SCHEDULE, x0, t, eps)
    call, flat0 = _functional(model, params)
    J = torch.func.jacrev(lambda f: call(f, xt, tt).flatten())(flat0)  # (R*D, P)
    r, d = xt.shape[0], xt[0].numel()
    return 2.0 / (r * d) * J.T @ J


def brute_ef(model, params, x0, t, eps) -> Tensor:
    """D / R sum_r g_r g_r^T, g_r = grad of row r's per-pixel-mean squared error."""
    xt, tt, y = noisy_rows(SCHEDULE, x0, t, eps)
    call, flat0 = _functional(model, params)
    G = torch.func.jacrev(lambda f: (call(f, xt, tt).flatten(1) - y).pow(2).mean(1))(flat0)
    return G.T @ G * y.shape[1] / y.shape[0]


def block_diag_mask(kfac: KFAC) -> Tensor:
    mask = torch.zeros(kfac.num_params, kfac.num_params, dtype=torch.bool)
    for b in kfac.blocks:
        idx = b.flat_index().flatten()
        mask[idx[:, None], idx[None, :]] = True
    return mask


def assert_close(a: Tensor, b: Tensor, rtol: float = 1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def rel_fro(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def assert_blocks_equal(a: KFAC, b: KFAC, tol: float = 1e-10) -> None:
    """Same layers and kinds; raw factors (where both keep them) and dense blocks agree to
    ``tol`` relative to the largest block of their kind (TINY_4X4's attention keys have a
    summed output gradient that is 0 up to round-off: softmax ignores a shift of all keys)."""
    assert [(x.layer, x.kind) for x in a.blocks] == [(y.layer, y.kind) for y in b.blocks]
    pairs = {
        "A": [
            (x.A, y.A)
            for x, y in zip(a.blocks, b.blocks, strict=True)
            if x.A is not None and y.A is not None
        ],
        "G": [
            (x.G, y.G)
            for x, y in zip(a.blocks, b.blocks, strict=True)
            if x.G is not None and y.G is not None
        ],
        "dense": [(x.dense(), y.dense()) for x, y in zip(a.blocks, b.blocks, strict=True)],
    }
    assert len(pairs["G"]) == len(a.blocks) or a.meta.get("ekfac") or b.meta.get("ekfac")
    for name, uv in pairs.items():
        scale = max(float(torch.linalg.norm(v)) for _, v in uv)
        errs = [float(torch.linalg.norm(u - v)) / scale for u, v in uv]
        assert max(errs) < tol, (name, max(errs))
