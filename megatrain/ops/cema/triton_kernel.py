"""Megalodon's complex EMA as our own Triton kernel, forward and backward (a torch.autograd.Function).

    from megatrain.ops.cema.triton_kernel import cema_scan_triton
    out, state = cema_scan_triton(u, p, c, logq, resets, h_in, chunk)   # contract of reference.cema_scan_ref
Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported; tests/conftest.py does that):  PYTHONPATH=. python -m pytest -q tests/ops/test_cema_ops.py

Recurrence (per channel d, EMA dimension n; complex q = exp(logq), complex output weight c, real input weight p;
keep_t = 0 where a document starts at t, h_{-1} = h_in):
    h_t = p u_t + q keep_t h_{t-1},    out_t = Re(sum_n c h_t)

The layout and the launches are MEGA's scan kernel's (ops/ema/triton_kernel.py, whose docstring derives them) with
the [BD, BN] state held as (re, im) register pairs. Forward (3 launches): every chunk from zero state -> its end
state; one program per (row, channel block) walks the chunk states (E_k = q^len keep_k E_{k-1} + S_{k-1}); every
chunk reruns from its entering state and writes out. Backward: the adjoint of multiplying by q is multiplying by
conj(q) (PyTorch's complex gradient convention, dL/dRe + i dL/dIm), so MEGA's right-to-left sums hold with q ->
conj(q) and c -> conj(c):
    g_t = conj(c) gout_t + conj(q) keep_{t+1} g_{t+1} (+ d state at t = L-1)      d u_t = sum_n p Re(g_t)
    d p = sum_t u_t Re(g_t)        d c = p sum_t u_t s_t + conj(h_in) conj(q) keep_0 s_0
    d q = p sum_t u_t r_t + conj(h_in) r_{-1}        s_t = gout_t + conj(q) keep_{t+1} s_{t+1}
    r_t = keep_{t+1} (g_{t+1} + conj(q) r_{t+1})      d logq = conj(q) d q
and across a chunk of `len` positions G, S -> conj(q)^len (.), R -> conj(q)^len R + len conj(q)^(len-1) G.
Every input and gradient crosses the autograd boundary as real tensors (re, im separately); the wrapper builds the
complex state. Precision: u may be bf16/fp16/fp32, all math and stored states fp32 (fp64 for fp64 inputs: tests).
Memory: u-sized out/grads plus [B, L/C, D, N] complex chunk states (forward 1, backward 3): linear in L.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from megatrain.ops.backend import triton_interpreted
from megatrain.ops.ema.triton_kernel import _Plan, to_bf16_rounded

_NUM_WARPS = 2       # the per-step work is two [32, 16] tiles (re, im): few warps per program


@triton.jit
def _cema_setup(P, CR, CI, LR, LI, D, N, BD: tl.constexpr, BN: tl.constexpr):
    """This program's channels (axis 1 of the grid) and their coefficients p, c = cr + i ci, q = qr + i qi."""
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    dmask = offs_d < D
    m2 = dmask[:, None] & (offs_n < N)[None, :]
    coef = offs_d[:, None] * N + offs_n[None, :]
    p = tl.load(P + coef, mask=m2, other=0.0)
    cr = tl.load(CR + coef, mask=m2, other=0.0)
    ci = tl.load(CI + coef, mask=m2, other=0.0)
    lr = tl.load(LR + coef, mask=m2, other=0.0)
    li = tl.load(LI + coef, mask=m2, other=0.0)
    mag = tl.exp(lr)
    return offs_d, dmask, m2, coef, p, cr, ci, mag * tl.cos(li), mag * tl.sin(li)


@triton.jit
def _cema_forward_chunk(U, P, CR, CI, LR, LI, KEEP, SR, SI, OUT, L, D, N, NC, CHUNK: tl.constexpr,
                        HAS_RESETS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, FINAL: tl.constexpr):
    """Chunk k of row b. FINAL=False: from zero state, (SR, SI)[b, k] <- the state after the chunk. FINAL=True: from
    (SR, SI)[b, k] (the entering state), write out = Re(sum_n c h_t)."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    offs_d, dmask, m2, coef, p, cr, ci, qr, qi = _cema_setup(P, CR, CI, LR, LI, D, N, BD, BN)
    state = (b * NC + k) * D * N + coef
    if FINAL:
        hr = tl.load(SR + state, mask=m2, other=0.0)
        hi = tl.load(SI + state, mask=m2, other=0.0)
    else:
        hr = tl.zeros((BD, BN), dtype=p.dtype)
        hi = tl.zeros((BD, BN), dtype=p.dtype)
    for i in range(CHUNK):
        t = k * CHUNK + i
        valid = t < L
        load_mask = dmask & (offs_d * 0 + t < L)
        x = tl.load(U + (b * L + t) * D + offs_d, mask=load_mask, other=0.0).to(p.dtype)[:, None]
        if HAS_RESETS:
            keep = tl.load(KEEP + b * L + t, mask=valid, other=1.0)
        else:
            keep = 1.0
        dr = qr * keep
        di = qi * keep
        nr = dr * hr - di * hi + p * x
        ni = dr * hi + di * hr
        hr = tl.where(valid, nr, hr)
        hi = tl.where(valid, ni, hi)
        if FINAL:
            tl.store(OUT + (b * L + t) * D + offs_d, tl.sum(cr * hr - ci * hi, axis=1), mask=load_mask)
    if not FINAL:
        tl.store(SR + state, hr, mask=m2)
        tl.store(SI + state, hi, mask=m2)


@triton.jit
def _cema_backward_chunk(U, GOUT, P, CR, CI, LR, LI, KEEP, GCR, GCI, RCR, RCI, SCR, SCI, GU, L, D, N, NC,
                         CHUNK: tl.constexpr, HAS_RESETS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                         FINAL: tl.constexpr, GU_BF16: tl.constexpr):
    """Chunk k of row b, right to left. FINAL=False: from zero carries, the carries (G, R, S) leaving the chunk to
    the left. FINAL=True: from the carries entering it from the right, write d u and replace them by the chunk's
    partial sums: GCR <- sum u Re(g), (RCR, RCI) <- sum u r, (SCR, SCI) <- sum u s (GCI unused)."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    offs_d, dmask, m2, coef, p, cr, ci, qr, qi = _cema_setup(P, CR, CI, LR, LI, D, N, BD, BN)
    base = (b * NC + k) * D * N + coef
    if FINAL:
        gcr = tl.load(GCR + base, mask=m2, other=0.0)
        gci = tl.load(GCI + base, mask=m2, other=0.0)
        rcr = tl.load(RCR + base, mask=m2, other=0.0)
        rci = tl.load(RCI + base, mask=m2, other=0.0)
        scr = tl.load(SCR + base, mask=m2, other=0.0)
        sci = tl.load(SCI + base, mask=m2, other=0.0)
    else:
        gcr = tl.zeros((BD, BN), dtype=p.dtype)
        gci = tl.zeros((BD, BN), dtype=p.dtype)
        rcr = tl.zeros((BD, BN), dtype=p.dtype)
        rci = tl.zeros((BD, BN), dtype=p.dtype)
        scr = tl.zeros((BD, BN), dtype=p.dtype)
        sci = tl.zeros((BD, BN), dtype=p.dtype)
    sum_ug = tl.zeros((BD, BN), dtype=p.dtype)
    sum_urr = tl.zeros((BD, BN), dtype=p.dtype)
    sum_uri = tl.zeros((BD, BN), dtype=p.dtype)
    sum_usr = tl.zeros((BD, BN), dtype=p.dtype)
    sum_usi = tl.zeros((BD, BN), dtype=p.dtype)
    for j in range(CHUNK):
        t = k * CHUNK + CHUNK - 1 - j
        valid = t < L
        load_mask = dmask & (offs_d * 0 + t < L)
        go = tl.load(GOUT + (b * L + t) * D + offs_d, mask=load_mask, other=0.0).to(p.dtype)[:, None]
        gr = cr * go + gcr           # g = conj(c) gout + carry
        gi = gci - ci * go
        sr = go + scr                # s = gout + carry
        si = sci
        if FINAL:
            grad_u = tl.sum(p * gr, axis=1)
            if GU_BF16:
                grad_u = to_bf16_rounded(grad_u)
            tl.store(GU + (b * L + t) * D + offs_d, grad_u, mask=load_mask)
            x = tl.load(U + (b * L + t) * D + offs_d, mask=load_mask, other=0.0).to(p.dtype)[:, None]
            sum_ug += x * gr         # x = 0 past the end: padded positions add nothing
            sum_urr += x * rcr
            sum_uri += x * rci
            sum_usr += x * sr
            sum_usi += x * si
        if HAS_RESETS:
            keep = tl.load(KEEP + b * L + t, mask=valid, other=1.0)
        else:
            keep = 1.0
        # conj(q) z = (qr zr + qi zi) + i (qr zi - qi zr)
        rcr_next = keep * (gr + qr * rcr + qi * rci)
        rci_next = keep * (gi + qr * rci - qi * rcr)
        rcr = tl.where(valid, rcr_next, rcr)
        rci = tl.where(valid, rci_next, rci)
        gcr = tl.where(valid, keep * (qr * gr + qi * gi), gcr)
        gci = tl.where(valid, keep * (qr * gi - qi * gr), gci)
        scr = tl.where(valid, keep * (qr * sr + qi * si), scr)
        sci = tl.where(valid, keep * (qr * si - qi * sr), sci)
    if FINAL:
        gcr, rcr, rci, scr, sci = sum_ug, sum_urr, sum_uri, sum_usr, sum_usi
    tl.store(GCR + base, gcr, mask=m2)
    tl.store(GCI + base, gci, mask=m2)
    tl.store(RCR + base, rcr, mask=m2)
    tl.store(RCI + base, rci, mask=m2)
    tl.store(SCR + base, scr, mask=m2)
    tl.store(SCI + base, sci, mask=m2)


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _cema_scan_chunks(LGR, LGI, LRR, LRI, LSR, LSI, INR, INI, CHUNK_KEEP, LR, LI, EGR, EGI, ERR, ERI, ESR, ESI,
                      L, D, N, NC, CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_INIT: tl.constexpr,
                      BACKWARD: tl.constexpr):
    """One program per (channel block, row) walks the chunks; every LG*[b, k] (and LR*, LS* backward) is replaced
    by what enters chunk k. Forward: h_k = q^len keep_k h_{k-1} + LG[b, k-1] from IN = h_in; EG = the state after
    the last position. Backward (right to left, conj(q)): G, S -> conj(q)^len keep (.), R -> conj(q)^len keep R +
    keep len conj(q)^(len-1) G, from IN = d state; E* = the carries leaving position 0."""
    dblk, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = dblk * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    m2 = (offs_d < D)[:, None] & (offs_n < N)[None, :]
    coef = offs_d[:, None] * N + offs_n[None, :]
    lr = tl.load(LR + coef, mask=m2, other=0.0)
    li = tl.load(LI + coef, mask=m2, other=0.0)
    if BACKWARD:
        li = -li                                   # conj(q)
    if HAS_INIT:
        hr = tl.load(INR + b * D * N + coef, mask=m2, other=0.0)
        hi = tl.load(INI + b * D * N + coef, mask=m2, other=0.0)
    else:
        hr = tl.zeros((BD, BN), dtype=lr.dtype)
        hi = tl.zeros((BD, BN), dtype=lr.dtype)
    rr = tl.zeros((BD, BN), dtype=lr.dtype)
    ri = tl.zeros((BD, BN), dtype=lr.dtype)
    sr = tl.zeros((BD, BN), dtype=lr.dtype)
    si = tl.zeros((BD, BN), dtype=lr.dtype)
    for j in range(NC):
        if BACKWARD:
            k = NC - 1 - j
        else:
            k = j
        base = (b * NC + k) * D * N + coef
        loc_r = tl.load(LGR + base, mask=m2, other=0.0)
        loc_i = tl.load(LGI + base, mask=m2, other=0.0)
        tl.store(LGR + base, hr, mask=m2)
        tl.store(LGI + base, hi, mask=m2)
        length = tl.minimum(L - k * CHUNK, CHUNK)
        keep = tl.load(CHUNK_KEEP + b * NC + k)
        mag = tl.exp(lr * length) * keep
        ar = mag * tl.cos(li * length)
        ai = mag * tl.sin(li * length)
        if BACKWARD:
            rl_r = tl.load(LRR + base, mask=m2, other=0.0)
            rl_i = tl.load(LRI + base, mask=m2, other=0.0)
            sl_r = tl.load(LSR + base, mask=m2, other=0.0)
            sl_i = tl.load(LSI + base, mask=m2, other=0.0)
            tl.store(LRR + base, rr, mask=m2)
            tl.store(LRI + base, ri, mask=m2)
            tl.store(LSR + base, sr, mask=m2)
            tl.store(LSI + base, si, mask=m2)
            # R picks up every g of the chunk: sum_i conj(q)^i conj(q)^(len-1-i) G = len conj(q)^(len-1) G
            mag1 = keep * length * tl.exp(lr * (length - 1))
            br = mag1 * tl.cos(li * (length - 1))
            bi = mag1 * tl.sin(li * (length - 1))
            xr, xi = _cmul(ar, ai, rr, ri)
            yr, yi = _cmul(br, bi, hr, hi)
            rr, ri = xr + yr + rl_r, xi + yi + rl_i
            xr, xi = _cmul(ar, ai, sr, si)
            sr, si = xr + sl_r, xi + sl_i
        xr, xi = _cmul(ar, ai, hr, hi)
        hr, hi = xr + loc_r, xi + loc_i
    tl.store(EGR + b * D * N + coef, hr, mask=m2)
    tl.store(EGI + b * D * N + coef, hi, mask=m2)
    if BACKWARD:
        tl.store(ERR + b * D * N + coef, rr, mask=m2)
        tl.store(ERI + b * D * N + coef, ri, mask=m2)
        tl.store(ESR + b * D * N + coef, sr, mask=m2)
        tl.store(ESI + b * D * N + coef, si, mask=m2)


class _CemaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, p: Tensor, cr: Tensor, ci: Tensor, lr: Tensor, li: Tensor, keep: Optional[Tensor],
                hr: Optional[Tensor], hi: Optional[Tensor], chunk: int):
        plan = _Plan(u, p.shape[1], chunk)
        dims, kw = plan.dims(), dict(plan.consts(keep is not None), num_warps=_NUM_WARPS)
        keep_arg = keep if keep is not None else p      # never read without HAS_RESETS
        coefs = (p, cr, ci, lr, li)
        out = torch.empty(plan.bsz, plan.length, plan.dim, dtype=p.dtype, device=u.device)
        sr, si = (torch.empty(plan.bsz, plan.nc, plan.dim, plan.n, dtype=p.dtype, device=u.device) for _ in range(2))
        _cema_forward_chunk[plan.chunk_grid](u, *coefs, keep_arg, sr, si, out, *dims, FINAL=False, **kw)
        chunk_keep = plan.chunk_keep(keep, p.dtype)
        end_r, end_i = (torch.empty(plan.bsz, plan.dim, plan.n, dtype=p.dtype, device=u.device) for _ in range(2))
        init = (hr, hi) if hr is not None else (p, p)
        scan_kw = dict(plan.consts(None), num_warps=_NUM_WARPS)
        _cema_scan_chunks[plan.row_grid](sr, si, sr, si, sr, si, *init, chunk_keep, lr, li, end_r, end_i, end_r,
                                         end_i, end_r, end_i, *dims, HAS_INIT=hr is not None, BACKWARD=False,
                                         **scan_kw)
        _cema_forward_chunk[plan.chunk_grid](u, *coefs, keep_arg, sr, si, out, *dims, FINAL=True, **kw)
        ctx.save_for_backward(u, p, cr, ci, lr, li, keep, hr, hi, chunk_keep)
        ctx.plan = plan
        return out, end_r, end_i

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_sr: Tensor, grad_si: Tensor):
        u, p, cr, ci, lr, li, keep, hr, hi, chunk_keep = ctx.saved_tensors
        plan = ctx.plan
        dims, kw = plan.dims(), dict(plan.consts(keep is not None), num_warps=_NUM_WARPS)
        keep_arg = keep if keep is not None else p
        grad_out = grad_out.to(p.dtype).contiguous()
        grad_u = torch.empty_like(u)
        carries = [torch.empty(plan.bsz, plan.nc, plan.dim, plan.n, dtype=p.dtype, device=u.device)
                   for _ in range(6)]
        args = (u, grad_out, p, cr, ci, lr, li, keep_arg, *carries, grad_u, *dims)
        _cema_backward_chunk[plan.chunk_grid](*args, FINAL=False, GU_BF16=False, **kw)
        ends = [torch.empty(plan.bsz, plan.dim, plan.n, dtype=p.dtype, device=u.device) for _ in range(6)]
        init = (grad_sr.to(p.dtype).contiguous(), grad_si.to(p.dtype).contiguous())
        _cema_scan_chunks[plan.row_grid](*carries, *init, chunk_keep, lr, li, *ends, *dims, HAS_INIT=True,
                                         BACKWARD=True, **dict(plan.consts(None), num_warps=_NUM_WARPS))
        _cema_backward_chunk[plan.chunk_grid](*args, FINAL=True, GU_BF16=u.dtype == torch.bfloat16, **kw)
        sum_ug, _, sur, sui, ssr, ssi = (t.sum((0, 1)) for t in carries)
        g_end, r_end, s_end = (torch.complex(ends[i], ends[i + 1]) for i in (0, 2, 4))
        grad_c = p * torch.complex(ssr, ssi)
        grad_q = p * torch.complex(sur, sui)
        grad_h = None
        if hr is not None:
            h_conj = torch.complex(hr, -hi)
            grad_c = grad_c + (h_conj * s_end).sum(0)
            grad_q = grad_q + (h_conj * r_end).sum(0)
            grad_h = g_end
        grad_logq = torch.conj(torch.exp(torch.complex(lr, li))) * grad_q
        return (grad_u, sum_ug, grad_c.real, grad_c.imag, grad_logq.real, grad_logq.imag, None,
                None if grad_h is None else grad_h.real, None if grad_h is None else grad_h.imag, None)


def cema_scan_triton(u: Tensor, p: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
                     h_in: Optional[Tensor] = None, chunk: int = 128) -> tuple[Tensor, Tensor]:
    """u [B, L, D] any float dtype; p [D, N] real in the math dtype (fp32, or fp64); c, logq [D, N] complex;
    resets [B, L] bool; h_in [B, D, N] complex -> (out [B, L, D] in the math dtype, state [B, D, N] complex)."""
    if triton_interpreted() != isinstance(_cema_forward_chunk, InterpretedFunction):
        raise ValueError("megatrain.ops.cema.triton_kernel: TRITON_INTERPRET must be set before triton is imported "
                         f"(it is {'1' if triton_interpreted() else 'unset'} now, was not at import)")
    dtype = p.dtype
    keep = None if resets is None else (~resets).to(dtype).contiguous()
    parts = [t.contiguous() for t in (c.real.to(dtype), c.imag.to(dtype), logq.real.to(dtype), logq.imag.to(dtype))]
    h = (None, None) if h_in is None else (h_in.real.to(dtype).contiguous(), h_in.imag.to(dtype).contiguous())
    out, state_r, state_i = _CemaScan.apply(u.contiguous(), p.contiguous(), *parts, keep, *h, chunk)
    return out, torch.complex(state_r, state_i)
