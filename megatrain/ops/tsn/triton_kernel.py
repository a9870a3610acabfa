"""Timestep normalization as our own Triton kernels, forward and backward (a torch.autograd.Function).

    from megatrain.ops.tsn.triton_kernel import timestep_norm_triton
    y, state = timestep_norm_triton(x, gamma, beta, num_groups, mask, resets, state, eps, chunk, on_summary)
Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported; tests/conftest.py does that):  PYTHONPATH=. python -m pytest -q tests/ops/test_tsn_ops.py
Contract and math: ops/tsn/reference.py; the statistics' merge and scan: ops/tsn/stats.py.

Forward (2 launches around one PyTorch scan). A program owns one (chunk of CHUNK positions, block of BG groups,
row) and reads each position's [BG, K] tile once per launch. (1) `_tsn_summary`: the group moments of every
position (two-pass in registers) merged into the chunk's statistics (Welford/Chan, count-1 steps; a document start
restarts them from the prior). (2) PyTorch: Chan's merge over the chunk summaries with state.py's log-depth scan
(ops/tsn/stats.scan_pieces) -> the statistics entering every chunk (the incoming state merged in front; the SP
exchange, `on_summary`, runs here). (3) `_tsn_normalize`: each chunk walks its positions again from its entering
statistics, writes y and keeps the per-position mean and 1/std [B, L, G] for the backward. No statistic is
accumulated over more than one chunk by count-1 steps, so fp32 holds at any length (the reference code's Kahan
sums are not needed: chunks restart from merged statistics).

Backward (hand-written; mu_t, r_t = 1/sqrt(var_t + eps), n_t the count, E2 = var + mu^2, g = dy * gamma):
    dL/dmu_t|E2 = -r_t sum_i g - 2 mu_t P_t,   P_t = dL/dE2_t = -r_t^3 / 2 sum_i g (x - mu_t)
    Rm_s = sum_{t >= s, same document} (dL/dmu_t) / n_t,   Rv_s likewise with P_t
    dx_s = w_s (g_s r_s + Rm_s / K + 2 x_s Rv_s / K)     d gamma = sum w dy (x - mu) r,  d beta = sum w dy
    d mean_in = n0 (Rm + 2 mean_in Rv)_first,   d var_in = n0 (Rv)_first     (over the row's first document)
`_tsn_backward_terms` writes the per-position dL/dmu, P and per-chunk partial sums of d gamma, d beta; PyTorch
adds the returned state's gradient at the last position and forms Rm, Rv by reversed document-wise prefix sums in
float64 (the one accumulation over the whole sequence); `_tsn_backward_dx` writes dx.
Precision: x may be bf16/fp16/fp32 (y and dx in x's dtype), math and statistics fp32 (fp64 for fp64 x: tests).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from megatrain.ops.backend import triton_interpreted
from megatrain.ops.ema.triton_kernel import to_bf16_rounded
from megatrain.ops.tsn.reference import doc_cumsum
from megatrain.ops.tsn.stats import enter, scan_pieces

_NUM_WARPS = 4
_TILE = 1024         # elements of one position's [BG, BK] tile


@triton.jit
def _tile(X, b, t, L, D, G, K, BG: tl.constexpr, BK: tl.constexpr, dtype: tl.constexpr):
    """Position t of row b, groups of this program (axis 1): x [BG, BK] (0 outside), the element mask, the
    columns, and the group offsets."""
    offs_g = tl.program_id(1) * BG + tl.arange(0, BG)
    offs_k = tl.arange(0, BK)
    inside = (offs_g < G)[:, None] & (offs_k < K)[None, :]
    col = offs_g[:, None] * K + offs_k[None, :]
    m2 = inside & (col * 0 + t < L)
    x = tl.load(X + (b * L + t) * D + col, mask=m2, other=0.0).to(dtype)
    return x, m2, col, offs_g


@triton.jit
def _moments(x, m2, K):
    """(mean, biased variance) [BG] of every group's K values: two-pass."""
    mt = tl.sum(x, axis=1) / K
    dx = tl.where(m2, x - mt[:, None], 0.0)
    return mt, tl.sum(dx * dx, axis=1) / K


@triton.jit
def _step(n, mu, var, b, t, L, mt, vt, KEEP, W, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr):
    """The statistics after position t: cut to the prior at a document start, then merge (w_t, m_t, v_t)."""
    valid = t < L
    if HAS_RESETS:
        keep = tl.load(KEEP + b * L + t, mask=valid, other=1.0)
        n = n * keep
        mu = mu * keep
        var = var * keep + (1.0 - keep)
    if HAS_MASK:
        w = tl.load(W + b * L + t, mask=valid, other=0.0)
    else:
        w = valid.to(mu.dtype)
    total = n + w
    f = w / tl.maximum(total, 1.0)
    d = mt - mu
    return total, mu + f * d, (1.0 - f) * var + f * vt + ((1.0 - f) * d) * (f * d)


@triton.jit
def _tsn_summary(X, KEEP, W, SN, SM, SV, L, D, G, NC, K, CHUNK: tl.constexpr, BG: tl.constexpr,
                 BK: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """Launch 1: the statistics of chunk k (its last document's) from the prior -> (SN, SM, SV)[b, k, groups]."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    n = tl.zeros((BG,), dtype=ACC)
    mu = tl.zeros((BG,), dtype=ACC)
    var = tl.zeros((BG,), dtype=ACC) + 1.0
    offs_g = tl.program_id(1) * BG + tl.arange(0, BG)
    for i in range(CHUNK):
        t = k * CHUNK + i
        x, m2, col, offs_g = _tile(X, b, t, L, D, G, K, BG, BK, ACC)
        mt, vt = _moments(x, m2, K)
        n, mu, var = _step(n, mu, var, b, t, L, mt, vt, KEEP, W, HAS_RESETS, HAS_MASK)
    out = (b * NC + k) * G + offs_g
    gmask = offs_g < G
    tl.store(SN + out, n, mask=gmask)
    tl.store(SM + out, mu, mask=gmask)
    tl.store(SV + out, var, mask=gmask)


@triton.jit
def _tsn_normalize(X, GAMMA, BETA, KEEP, W, EN, EM, EV, Y, MU, RSTD, L, D, G, NC, K, eps, CHUNK: tl.constexpr,
                   BG: tl.constexpr, BK: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr,
                   Y_BF16: tl.constexpr, ACC: tl.constexpr):
    """Launch 3: chunk k from its entering statistics (EN, EM, EV)[b, k]: y, and mu_t, 1/std_t [B, L, G]."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    offs_g = tl.program_id(1) * BG + tl.arange(0, BG)
    gmask = offs_g < G
    state = (b * NC + k) * G + offs_g
    n = tl.load(EN + state, mask=gmask, other=0.0).to(ACC)
    mu = tl.load(EM + state, mask=gmask, other=0.0).to(ACC)
    var = tl.load(EV + state, mask=gmask, other=1.0).to(ACC)
    x, m2, col, offs_g = _tile(X, b, 0, L, D, G, K, BG, BK, ACC)
    inside = (offs_g < G)[:, None] & (col - offs_g[:, None] * K < K)     # the tile's shape, whatever t
    gamma = tl.load(GAMMA + col, mask=inside, other=0.0).to(ACC)
    beta = tl.load(BETA + col, mask=inside, other=0.0).to(ACC)
    for i in range(CHUNK):
        t = k * CHUNK + i
        x, m2, col, offs_g = _tile(X, b, t, L, D, G, K, BG, BK, ACC)
        mt, vt = _moments(x, m2, K)
        n, mu, var = _step(n, mu, var, b, t, L, mt, vt, KEEP, W, HAS_RESETS, HAS_MASK)
        r = 1.0 / tl.sqrt(var + eps)
        pos_mask = gmask & (offs_g * 0 + t < L)
        tl.store(MU + (b * L + t) * G + offs_g, mu, mask=pos_mask)
        tl.store(RSTD + (b * L + t) * G + offs_g, r, mask=pos_mask)
        if HAS_MASK:
            w = tl.load(W + b * L + t, mask=t < L, other=0.0)
        else:
            w = 1.0
        y = ((x - mu[:, None]) * r[:, None] * gamma + beta) * w
        if Y_BF16:
            y = to_bf16_rounded(y)
        tl.store(Y + (b * L + t) * D + col, y, mask=m2)


@triton.jit
def _tsn_backward_terms(X, DY, GAMMA, W, MU, RSTD, PM, PV, DG, DB, L, D, G, NC, K, CHUNK: tl.constexpr,
                        BG: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """Backward launch 1, chunk k: per position dL/dmu_t|E2 -> PM and dL/dE2_t -> PV [B, L, G]; the chunk's
    partial sums of d gamma, d beta -> DG, DB [B, NC, D]."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    x, m2, col, offs_g = _tile(X, b, 0, L, D, G, K, BG, BK, ACC)
    inside = (offs_g < G)[:, None] & (col - offs_g[:, None] * K < K)
    gmask = offs_g < G
    gamma = tl.load(GAMMA + col, mask=inside, other=0.0).to(ACC)
    acc_g = tl.zeros((BG, BK), dtype=ACC)
    acc_b = tl.zeros((BG, BK), dtype=ACC)
    for i in range(CHUNK):
        t = k * CHUNK + i
        x, m2, col, offs_g = _tile(X, b, t, L, D, G, K, BG, BK, ACC)
        dy, _, _, _ = _tile(DY, b, t, L, D, G, K, BG, BK, ACC)
        if HAS_MASK:
            dy = dy * tl.load(W + b * L + t, mask=t < L, other=0.0)
        pos_mask = gmask & (offs_g * 0 + t < L)
        mu = tl.load(MU + (b * L + t) * G + offs_g, mask=pos_mask, other=0.0)
        r = tl.load(RSTD + (b * L + t) * G + offs_g, mask=pos_mask, other=0.0)
        xc = tl.where(m2, x - mu[:, None], 0.0)
        g = dy * gamma
        pv = -0.5 * r * r * r * tl.sum(g * xc, axis=1)
        pm = -r * tl.sum(g, axis=1) - 2.0 * mu * pv
        tl.store(PM + (b * L + t) * G + offs_g, pm, mask=pos_mask)
        tl.store(PV + (b * L + t) * G + offs_g, pv, mask=pos_mask)
        acc_g += dy * xc * r[:, None]
        acc_b += dy
    out = (b * NC + k) * D + col
    tl.store(DG + out, acc_g, mask=inside)
    tl.store(DB + out, acc_b, mask=inside)


@triton.jit
def _tsn_backward_dx(X, DY, GAMMA, W, RSTD, RM, RV, DX, L, D, G, NC, K, CHUNK: tl.constexpr, BG: tl.constexpr,
                     BK: tl.constexpr, HAS_MASK: tl.constexpr, DX_BF16: tl.constexpr, ACC: tl.constexpr):
    """Backward launch 2, chunk k: dx = w (dy gamma r + Rm / K + 2 x Rv / K)."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    x, m2, col, offs_g = _tile(X, b, 0, L, D, G, K, BG, BK, ACC)
    inside = (offs_g < G)[:, None] & (col - offs_g[:, None] * K < K)
    gmask = offs_g < G
    gamma = tl.load(GAMMA + col, mask=inside, other=0.0).to(ACC)
    for i in range(CHUNK):
        t = k * CHUNK + i
        x, m2, col, offs_g = _tile(X, b, t, L, D, G, K, BG, BK, ACC)
        dy, _, _, _ = _tile(DY, b, t, L, D, G, K, BG, BK, ACC)
        pos_mask = gmask & (offs_g * 0 + t < L)
        r = tl.load(RSTD + (b * L + t) * G + offs_g, mask=pos_mask, other=0.0)
        rm = tl.load(RM + (b * L + t) * G + offs_g, mask=pos_mask, other=0.0)
        rv = tl.load(RV + (b * L + t) * G + offs_g, mask=pos_mask, other=0.0)
        dx = dy * gamma * r[:, None] + (rm[:, None] + 2.0 * x * rv[:, None]) / K
        if HAS_MASK:
            dx = dx * tl.load(W + b * L + t, mask=t < L, other=0.0)
        if DX_BF16:
            dx = to_bf16_rounded(dx)
        tl.store(DX + (b * L + t) * D + col, dx, mask=m2)


class _Geometry:
    """Launch geometry shared by forward and backward: chunks of CHUNK positions, blocks of BG groups."""

    def __init__(self, x: Tensor, num_groups: int, chunk: int):
        self.bsz, self.length, self.dim = x.shape
        self.device = x.device
        self.g, self.k = num_groups, self.dim // num_groups
        self.chunk = min(chunk, triton.next_power_of_2(self.length))
        self.nc = triton.cdiv(self.length, self.chunk)
        self.bk = triton.next_power_of_2(self.k)
        self.bg = max(1, min(triton.next_power_of_2(self.g), _TILE // self.bk))
        self.grid = (self.nc, triton.cdiv(self.g, self.bg), self.bsz)

    def args(self) -> tuple:
        return self.length, self.dim, self.g, self.nc, self.k

    def consts(self, dtype: torch.dtype) -> dict:
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        return dict(CHUNK=self.chunk, BG=self.bg, BK=self.bk, ACC=acc, num_warps=_NUM_WARPS)

    def chunk_keep(self, keep: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """[NC, B, 1]: 1 where chunk k has no document start (statistics cross it), else 0."""
        if keep is None:
            return torch.ones(self.nc, self.bsz, 1, dtype=dtype, device=self.device)
        padded = F.pad(keep, (0, self.nc * self.chunk - self.length), value=1.0)
        return padded.view(self.bsz, self.nc, self.chunk).amin(-1).t().unsqueeze(-1).to(dtype)


def _scanned_chunks(x: Tensor, keep: Optional[Tensor], w: Optional[Tensor], geo: _Geometry, dtype: torch.dtype):
    """Launch 1 and the scan over chunks: (before, through) of ops/tsn/stats.scan_pieces, [NC, B, G] each."""
    sn, sm, sv = (torch.empty(geo.bsz, geo.nc, geo.g, dtype=dtype, device=x.device) for _ in range(3))
    _tsn_summary[geo.grid](x, keep if keep is not None else sn, w if w is not None else sn, sn, sm, sv,
                           *geo.args(), HAS_RESETS=keep is not None, HAS_MASK=w is not None, **geo.consts(dtype))
    return scan_pieces(tuple(t.transpose(0, 1) for t in (sn, sm, sv)), geo.chunk_keep(keep, dtype))


def _reverse_doc_cumsum(v: Tensor, resets: Optional[Tensor]) -> Tensor:
    """sum over t >= s in s's document, along dim 1 (v [B, L, G], resets [B, L] bool)."""
    rev = None if resets is None else F.pad(resets.flip(1)[:, :-1], (1, 0), value=False)
    return doc_cumsum(v.flip(1), rev).flip(1)


class _TimestepNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, mean_in, var_in, count_in, keep, w, resets, num_groups, eps, geo, scanned):
        dtype = gamma.dtype
        flags = dict(HAS_RESETS=keep is not None, HAS_MASK=w is not None)
        before, through = scanned if scanned is not None else _scanned_chunks(x, keep, w, geo, dtype)
        h0 = None if count_in is None else (count_in.to(dtype).reshape(-1, 1), mean_in, var_in)
        entering = [t.transpose(0, 1).contiguous() for t in enter(h0, before)]
        out = enter(h0, tuple(t[-1] for t in through))
        y = torch.empty_like(x)
        mu, rstd = (torch.empty(geo.bsz, geo.length, geo.g, dtype=dtype, device=x.device) for _ in range(2))
        _tsn_normalize[geo.grid](x, gamma, beta, keep if keep is not None else gamma, w if w is not None else gamma,
                                 *entering, y, mu, rstd, *geo.args(), eps, Y_BF16=x.dtype == torch.bfloat16,
                                 **flags, **geo.consts(dtype))
        ctx.save_for_backward(x, gamma, mean_in, count_in, w, resets, mu, rstd)
        ctx.geo = geo
        return y, out[0][:, 0].round().to(torch.int64), out[1], out[2]

    @staticmethod
    def backward(ctx, dy, _dcount, dmean_out, dvar_out):
        x, gamma, mean_in, count_in, w, resets, mu, rstd = ctx.saved_tensors
        geo = ctx.geo
        dtype = gamma.dtype
        flags = dict(HAS_MASK=w is not None)
        w_arg = w if w is not None else gamma
        dy = dy.contiguous()
        pm, pv = (torch.empty(geo.bsz, geo.length, geo.g, dtype=dtype, device=x.device) for _ in range(2))
        dg, db = (torch.empty(geo.bsz, geo.nc, geo.dim, dtype=dtype, device=x.device) for _ in range(2))
        _tsn_backward_terms[geo.grid](x, dy, gamma, w_arg, mu, rstd, pm, pv, dg, db, *geo.args(), **flags,
                                      **geo.consts(dtype))
        # counts per position (the statistics' n_t) and the returned state's gradient at the last position
        ones = torch.ones(geo.bsz, geo.length, 1, dtype=torch.float64, device=x.device)
        n = doc_cumsum(ones if w is None else w.to(torch.float64).unsqueeze(-1), resets)
        first = None if resets is None else (resets.cumsum(1) == 0).unsqueeze(-1)
        if count_in is not None:
            n0 = count_in.to(torch.float64).reshape(-1, 1, 1)
            n = n + (n0 if first is None else n0 * first)
        pm, pv = pm.to(torch.float64), pv.to(torch.float64)
        dvar = dvar_out.to(torch.float64)
        pv[:, -1] += dvar
        pm[:, -1] += dmean_out.to(torch.float64) - 2 * mu[:, -1].to(torch.float64) * dvar
        inv = 1.0 / n.clamp(min=1)
        rm, rv = _reverse_doc_cumsum(pm * inv, resets), _reverse_doc_cumsum(pv * inv, resets)
        dx = torch.empty_like(x)
        _tsn_backward_dx[geo.grid](x, dy, gamma, w_arg, rstd, rm.to(dtype).contiguous(), rv.to(dtype).contiguous(),
                                   dx, *geo.args(), DX_BF16=x.dtype == torch.bfloat16, **flags, **geo.consts(dtype))
        dmean_in = dvar_in = None
        if count_in is not None:
            reach = 1.0 if first is None else first[:, 0].to(torch.float64)
            n0 = count_in.to(torch.float64).reshape(-1, 1) * reach
            dvar_in = (n0 * rv[:, 0]).to(dtype)
            dmean_in = (n0 * (rm[:, 0] + 2 * mean_in.to(torch.float64) * rv[:, 0])).to(dtype)
        return (dx, dg.sum((0, 1)).to(dtype), db.sum((0, 1)).to(dtype), dmean_in, dvar_in, None, None, None, None,
                None, None, None, None)


def timestep_norm_triton(x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, mask: Optional[Tensor] = None,
                         resets: Optional[Tensor] = None, state=None, eps: float = 1e-5, chunk: int = 64,
                         on_summary: Optional[Callable] = None, dtype: torch.dtype = torch.float32):
    """Contract of ops/tsn/torch_blocked.timestep_norm_blocked (y in x's dtype, state in `dtype`)."""
    if triton_interpreted() != isinstance(_tsn_summary, InterpretedFunction):
        raise ValueError("megatrain.ops.tsn.triton_kernel: TRITON_INTERPRET must be set before triton is imported "
                         f"(it is {'1' if triton_interpreted() else 'unset'} now, was not at import)")
    x = x.contiguous()
    keep = None if resets is None else (~resets).to(dtype).contiguous()
    w = None if mask is None else mask.to(dtype).contiguous()
    geo = _Geometry(x, num_groups, chunk)
    scanned = None
    if on_summary is not None:
        # the summary first (launch 1 + the scan), then the exchange; the incoming state it returns depends on the
        # other ranks' inputs, so it enters the Function as a differentiable input
        with torch.no_grad():
            scanned = _scanned_chunks(x, keep, w, geo, dtype)
        whole = tuple(t[-1] for t in scanned[1])
        state = on_summary(whole[0][:, 0], whole[1], whole[2], whole[3][:, 0] > 0.5).wait()
    count_in, mean_in, var_in = (None, None, None) if state is None else state
    mean_in = None if mean_in is None else mean_in.to(dtype)
    var_in = None if var_in is None else var_in.to(dtype)
    y, count, mean, var = _TimestepNorm.apply(x, gamma.to(dtype).contiguous(), beta.to(dtype).contiguous(), mean_in,
                                              var_in, count_in, keep, w, resets, num_groups, eps, geo, scanned)
    return y, (count, mean, var)
