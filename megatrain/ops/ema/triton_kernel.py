"""MEGA's damped EMA as our own Triton kernel, forward and backward (a torch.autograd.Function).

    from megatrain.ops.ema.triton_kernel import ema_scan_triton
    out, state = ema_scan_triton(u, a, c, logq, resets, h_in, chunk)   # contract of reference.ema_scan_ref,
                                                                        # without truncation (ops.ema.ema_scan
                                                                        # builds truncation from two scans)
Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (how CI tests it). TRITON_INTERPRET=1 must be
set before triton is imported (triton builds tl.sum and every @triton.jit function for one mode at import);
tests/ops/conftest.py does that for the tests:
    PYTHONPATH=. python -m pytest -q tests/ops/test_ema_ops.py

Recurrence (per channel d, EMA dimension n; keep_t = 0 where a document starts at t, h_{-1} = h_in):
    h_t = a u_t + q keep_t h_{t-1},    out_t = sum_n c h_t          (a = p*beta, c = gamma/sqrt(N), q = exp(logq))

An in-register recurrence inside a chunk: the state is diagonal (every (d, n) decays on its own), so per chunk the
intra-chunk operator is a C x C Toeplitz matrix per channel applied to one vector. Across the chunks of a long
input that matrix is shared, which the chunked kernel (triton_chunked.py) turns into tensor-core matmuls; this
scan stays the path for short inputs and decode (a few steps, no tile padding): ops/ema/paths.py picks. The
recurrence reads u once per pass and keeps the [BD, N] state in registers (the shape Mamba's selective scan uses).
Parallelism over the sequence comes from chunks:

Forward (3 launches): (1) every (row, channel block, chunk) runs its chunk from zero state and writes the end
state [B, NC, D, N]; (2) one program per (row, channel block) walks the NC chunk states left to right,
E_k = q^len keep_k E_{k-1} + S_{k-1} (0 across a chunk with a reset), overwriting them with the state entering each
chunk, and writes state_out; (3) every chunk reruns its recurrence from its entering state and writes out.

Backward needs no forward state. With gout = d(loss)/d(out) and the adjoint g_t = d(loss)/d(h_t):
    g_t = c gout_t + q keep_{t+1} g_{t+1} (+ gstate at t = L-1)        d u_t = sum_n a g_t       d a = sum_t u_t g_t
    d c = sum_t gout_t h_t = a sum_t u_t s_t + h_in q keep_0 s_0,        s_t = gout_t + q keep_{t+1} s_{t+1}
    d q = sum_t g_t keep_t h_{t-1} = a sum_t u_t r_t + h_in r_{-1},      r_t = keep_{t+1} (g_{t+1} + q r_{t+1})
(h_{t-1} = sum_{j<t} q^(t-1-j) a u_j: exchanging the sums turns the forward state into the right-to-left sums s, r,
so one right-to-left pass gives every gradient.) The carries (G = q keep g, R = r, S = q keep s) cross a chunk of
`len` positions linearly: G -> q^len G, S -> q^len S, R -> q^len R + len q^(len-1) G (all 0 across a reset). Same
three launches mirrored: local carries from zero, a right-to-left scan of chunk carries, then the exact pass that
writes d u and per-chunk partial sums of u*g, u*s, u*r (summed in PyTorch: deterministic, no atomics).

Precision: u may be bf16/fp16/fp32 (loaded and converted in registers), a/c/logq fp32, all math and every stored
state fp32; fp64 inputs run in fp64 (tests). Memory: u-sized out/grads plus [B, L/C, D, N] chunk states (forward
1, backward 3) -- linear in L, never [L, D, N].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from megatrain.ops.backend import triton_interpreted

_BLOCK_D = 32        # channels per program (the state tile is [_BLOCK_D, next_pow2(N)])
_NUM_WARPS = 2       # the per-step work is one [32, 16] tile: few warps per program, many programs per SM


@triton.jit
def to_bf16_rounded(x):
    """fp32 -> bf16, rounded to nearest even by hand: the interpreter truncates fp32 -> bf16 casts (the GPU rounds),
    and truncation alone would double a bf16 gradient's rounding error. (Shared by every kernel that writes one.)"""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x == x, rounded, x.to(tl.bfloat16))     # NaN stays NaN


@triton.jit
def _chunk_setup(A, C, LOGQ, D, N, BD: tl.constexpr, BN: tl.constexpr):
    """This program's channels (axis 1 of the grid) and their coefficients a, c, q = exp(logq), [BD, BN]."""
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    dmask = offs_d < D
    m2 = dmask[:, None] & (offs_n < N)[None, :]
    coef = offs_d[:, None] * N + offs_n[None, :]
    a = tl.load(A + coef, mask=m2, other=0.0)
    c = tl.load(C + coef, mask=m2, other=0.0)
    q = tl.exp(tl.load(LOGQ + coef, mask=m2, other=0.0))
    return offs_d, dmask, m2, coef, a, c, q


@triton.jit
def _forward_chunk(U, A, C, LOGQ, KEEP, STATES, OUT, L, D, N, NC, CHUNK: tl.constexpr, HAS_RESETS: tl.constexpr,
                   BD: tl.constexpr, BN: tl.constexpr, FINAL: tl.constexpr):
    """Chunk k of row b, channels dblk*BD... . FINAL=False (launch 1): from zero state, STATES[b, k] <- the state
    after the chunk. FINAL=True (launch 3): from STATES[b, k] (the entering state), write out = sum_n c h_t."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    offs_d, dmask, m2, coef, a, c, q = _chunk_setup(A, C, LOGQ, D, N, BD, BN)
    state_ptr = STATES + (b * NC + k) * D * N + coef
    if FINAL:
        h = tl.load(state_ptr, mask=m2, other=0.0)
    else:
        h = tl.zeros((BD, BN), dtype=a.dtype)
    for i in range(CHUNK):
        t = k * CHUNK + i
        valid = t < L
        # the vector form of `valid`: the interpreter mis-types a scalar bool & a vector bool
        load_mask = dmask & (offs_d * 0 + t < L)
        x = tl.load(U + (b * L + t) * D + offs_d, mask=load_mask, other=0.0).to(a.dtype)
        if HAS_RESETS:
            decay = q * tl.load(KEEP + b * L + t, mask=valid, other=1.0)
        else:
            decay = q
        h = tl.where(valid, decay * h + a * x[:, None], h)
        if FINAL:
            tl.store(OUT + (b * L + t) * D + offs_d, tl.sum(c * h, axis=1), mask=load_mask)
    if not FINAL:
        tl.store(state_ptr, h, mask=m2)


@triton.jit
def _backward_chunk(U, GOUT, A, C, LOGQ, KEEP, GC, RC, SC, GU, L, D, N, NC, CHUNK: tl.constexpr,
                    HAS_RESETS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, FINAL: tl.constexpr,
                    GU_BF16: tl.constexpr):
    """Chunk k of row b, right to left. FINAL=False (launch 1'): from zero carries, GC/RC/SC[b, k] <- the carries
    (G, R, S) leaving the chunk to the left. FINAL=True (launch 3'): from the carries entering it from the right
    (GC/RC/SC[b, k]), write d u and replace them by the chunk's partial sums of u*g, u*r, u*s."""
    k, b = tl.program_id(0), tl.program_id(2).to(tl.int64)
    offs_d, dmask, m2, coef, a, c, q = _chunk_setup(A, C, LOGQ, D, N, BD, BN)
    base = (b * NC + k) * D * N + coef
    if FINAL:
        g_carry = tl.load(GC + base, mask=m2, other=0.0)
        r_carry = tl.load(RC + base, mask=m2, other=0.0)
        s_carry = tl.load(SC + base, mask=m2, other=0.0)
    else:
        g_carry = tl.zeros((BD, BN), dtype=a.dtype)
        r_carry = tl.zeros((BD, BN), dtype=a.dtype)
        s_carry = tl.zeros((BD, BN), dtype=a.dtype)
    sum_ug = tl.zeros((BD, BN), dtype=a.dtype)
    sum_ur = tl.zeros((BD, BN), dtype=a.dtype)
    sum_us = tl.zeros((BD, BN), dtype=a.dtype)
    for j in range(CHUNK):
        t = k * CHUNK + CHUNK - 1 - j
        valid = t < L
        load_mask = dmask & (offs_d * 0 + t < L)
        go = tl.load(GOUT + (b * L + t) * D + offs_d, mask=load_mask, other=0.0).to(a.dtype)[:, None]
        g = c * go + g_carry
        s = go + s_carry
        if FINAL:
            grad_u = tl.sum(a * g, axis=1)
            if GU_BF16:
                grad_u = to_bf16_rounded(grad_u)
            tl.store(GU + (b * L + t) * D + offs_d, grad_u, mask=load_mask)
            x = tl.load(U + (b * L + t) * D + offs_d, mask=load_mask, other=0.0).to(a.dtype)[:, None]
            sum_ug += x * g          # x = 0 past the end: padded positions add nothing
            sum_ur += x * r_carry
            sum_us += x * s
        if HAS_RESETS:
            keep = tl.load(KEEP + b * L + t, mask=valid, other=1.0)
        else:
            keep = 1.0
        r_carry = tl.where(valid, keep * (g + q * r_carry), r_carry)
        g_carry = tl.where(valid, keep * q * g, g_carry)
        s_carry = tl.where(valid, keep * q * s, s_carry)
    if FINAL:
        g_carry, r_carry, s_carry = sum_ug, sum_ur, sum_us
    tl.store(GC + base, g_carry, mask=m2)
    tl.store(RC + base, r_carry, mask=m2)
    tl.store(SC + base, s_carry, mask=m2)


@triton.jit
def _scan_chunks(LOC, LOC_R, LOC_S, INIT, CHUNK_KEEP, LOGQ, END, END_R, END_S, L, D, N, NC,
                 CHUNK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_INIT: tl.constexpr,
                 BACKWARD: tl.constexpr):
    """One program per (channel block, row) walks the chunks; every LOC*[b, k] is replaced by what enters chunk k.
    Forward (launch 2; LOC = chunk end states from zero, INIT = h_in): h_k = q^len keep_k h_{k-1} + LOC[b, k-1],
    END = state after the last position. Backward (launch 2', right to left; LOC* = local carries G, R, S,
    INIT = d state into the last position): G, S -> q^len keep G, S; R -> q^len keep R + keep len q^(len-1) G;
    END* = the carries leaving position 0 (d h_in = END; END_R, END_S feed d logq, d c)."""
    dblk, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = dblk * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    m2 = (offs_d < D)[:, None] & (offs_n < N)[None, :]
    coef = offs_d[:, None] * N + offs_n[None, :]
    logq = tl.load(LOGQ + coef, mask=m2, other=0.0)
    if HAS_INIT:
        carry = tl.load(INIT + b * D * N + coef, mask=m2, other=0.0)
    else:
        carry = tl.zeros((BD, BN), dtype=logq.dtype)
    r_carry = tl.zeros((BD, BN), dtype=logq.dtype)
    s_carry = tl.zeros((BD, BN), dtype=logq.dtype)
    for j in range(NC):
        if BACKWARD:
            k = NC - 1 - j
        else:
            k = j
        base = (b * NC + k) * D * N + coef
        local = tl.load(LOC + base, mask=m2, other=0.0)
        tl.store(LOC + base, carry, mask=m2)
        length = tl.minimum(L - k * CHUNK, CHUNK)
        keep = tl.load(CHUNK_KEEP + b * NC + k)
        across = tl.exp(logq * length) * keep
        if BACKWARD:
            r_local = tl.load(LOC_R + base, mask=m2, other=0.0)
            s_local = tl.load(LOC_S + base, mask=m2, other=0.0)
            tl.store(LOC_R + base, r_carry, mask=m2)
            tl.store(LOC_S + base, s_carry, mask=m2)
            # R picks up every g in the chunk: sum_i q^i q^(len-1-i) G = len q^(len-1) G
            r_carry = across * r_carry + keep * length * tl.exp(logq * (length - 1)) * carry + r_local
            s_carry = across * s_carry + s_local
        carry = across * carry + local
    tl.store(END + b * D * N + coef, carry, mask=m2)
    if BACKWARD:
        tl.store(END_R + b * D * N + coef, r_carry, mask=m2)
        tl.store(END_S + b * D * N + coef, s_carry, mask=m2)


class _Plan:
    """Launch geometry and the per-row/per-chunk keep factors, shared by forward and backward."""

    def __init__(self, u: Tensor, n: int, chunk: int):
        self.bsz, self.length, self.dim = u.shape
        self.device = u.device
        self.n = n
        # a sequence shorter than the chunk runs a shorter loop; powers of two bound the compiled variants
        self.chunk = min(chunk, triton.next_power_of_2(self.length))
        self.nc = triton.cdiv(self.length, self.chunk)
        self.bn = triton.next_power_of_2(n)
        self.bd = min(_BLOCK_D, triton.next_power_of_2(self.dim))
        self.chunk_grid = (self.nc, triton.cdiv(self.dim, self.bd), self.bsz)
        self.row_grid = (triton.cdiv(self.dim, self.bd), self.bsz)

    def chunk_keep(self, keep: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """[B, NC]: 1 where chunk k has no document start (an entering state crosses it), else 0."""
        if keep is None:
            return torch.ones(self.bsz, self.nc, dtype=dtype, device=self.device)
        padded = F.pad(keep, (0, self.nc * self.chunk - self.length), value=1.0)
        return padded.view(self.bsz, self.nc, self.chunk).amin(-1).contiguous()

    def dims(self) -> tuple[int, int, int, int]:
        return self.length, self.dim, self.n, self.nc

    def consts(self, has_resets: Optional[bool]) -> dict:
        """Compile-time constants of a launch; has_resets None for the scans (their keep is per chunk)."""
        common = dict(CHUNK=self.chunk, BD=self.bd, BN=self.bn, num_warps=_NUM_WARPS)
        return common if has_resets is None else dict(HAS_RESETS=has_resets, **common)


class _EmaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, a: Tensor, c: Tensor, logq: Tensor, keep: Optional[Tensor],
                h_in: Optional[Tensor], chunk: int):
        plan = _Plan(u, a.shape[1], chunk)
        dims, kw = plan.dims(), plan.consts(keep is not None)
        keep_arg = keep if keep is not None else a      # never read without HAS_RESETS
        out = torch.empty(plan.bsz, plan.length, plan.dim, dtype=a.dtype, device=u.device)
        states = torch.empty(plan.bsz, plan.nc, plan.dim, plan.n, dtype=a.dtype, device=u.device)
        _forward_chunk[plan.chunk_grid](u, a, c, logq, keep_arg, states, out, *dims, FINAL=False, **kw)
        chunk_keep = plan.chunk_keep(keep, a.dtype)
        state_out = torch.empty(plan.bsz, plan.dim, plan.n, dtype=a.dtype, device=u.device)
        _scan_chunks[plan.row_grid](states, states, states, h_in if h_in is not None else a, chunk_keep, logq,
                                     state_out, state_out, state_out, *dims, HAS_INIT=h_in is not None,
                                     BACKWARD=False, **plan.consts(None))
        _forward_chunk[plan.chunk_grid](u, a, c, logq, keep_arg, states, out, *dims, FINAL=True, **kw)
        ctx.save_for_backward(u, a, c, logq, keep, h_in, chunk_keep)
        ctx.plan = plan
        return out, state_out

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_state: Tensor):
        u, a, c, logq, keep, h_in, chunk_keep = ctx.saved_tensors
        plan = ctx.plan
        dims, kw = plan.dims(), plan.consts(keep is not None)
        keep_arg = keep if keep is not None else a
        grad_out = grad_out.to(a.dtype).contiguous()
        grad_state = grad_state.to(a.dtype).contiguous()
        grad_u = torch.empty_like(u)
        carries = [torch.empty(plan.bsz, plan.nc, plan.dim, plan.n, dtype=a.dtype, device=u.device)
                   for _ in range(3)]
        args = (u, grad_out, a, c, logq, keep_arg, *carries, grad_u, *dims)
        _backward_chunk[plan.chunk_grid](*args, FINAL=False, GU_BF16=False, **kw)
        ends = [torch.empty(plan.bsz, plan.dim, plan.n, dtype=a.dtype, device=u.device) for _ in range(3)]
        _scan_chunks[plan.row_grid](*carries, grad_state, chunk_keep, logq, *ends, *dims, HAS_INIT=True,
                                     BACKWARD=True, **plan.consts(None))
        _backward_chunk[plan.chunk_grid](*args, FINAL=True, GU_BF16=u.dtype == torch.bfloat16, **kw)
        sum_ug, sum_ur, sum_us = (t.sum((0, 1)) for t in carries)
        g_end, r_end, s_end = ends
        grad_c, grad_q, grad_h_in = a * sum_us, a * sum_ur, None
        if h_in is not None:
            grad_c = grad_c + (h_in * s_end).sum(0)
            grad_q = grad_q + (h_in * r_end).sum(0)
            grad_h_in = g_end
        return grad_u, sum_ug, grad_c, grad_q * torch.exp(logq), None, grad_h_in, None


def ema_scan_triton(u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
                    h_in: Optional[Tensor] = None, chunk: int = 128) -> tuple[Tensor, Tensor]:
    """u [B, L, D] any float dtype; a/c/logq [D, N] in the math dtype (fp32, or fp64); resets [B, L] bool;
    h_in [B, D, N] -> (out [B, L, D], state [B, D, N]) in the math dtype."""
    if triton_interpreted() != isinstance(_forward_chunk, InterpretedFunction):
        # triton (tl.sum, ...) and these kernels are built for interpreter or compiler when first imported
        raise ValueError("megatrain.ops.ema.triton_kernel: TRITON_INTERPRET must be set before triton is imported "
                         f"(it is {'1' if triton_interpreted() else 'unset'} now, was not at import)")
    dtype = a.dtype
    keep = None if resets is None else (~resets).to(dtype).contiguous()
    h_in = None if h_in is None else h_in.to(dtype).contiguous()
    return _EmaScan.apply(u.contiguous(), a.contiguous(), c.to(dtype).contiguous(), logq.to(dtype).contiguous(),
                          keep, h_in, chunk)
