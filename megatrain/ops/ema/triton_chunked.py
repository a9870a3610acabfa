"""MEGA's damped EMA in chunked form on tensor cores: a Triton kernel pair (forward, backward) built on `tl.dot`.

    from megatrain.ops.ema.triton_chunked import ema_scan_chunked
    out, state = ema_scan_chunked(u, a, c, logq, resets, h_in, chunk=64)   # contract of reference.ema_scan_ref,
                                                                            # without truncation (ops.ema.ema_scan
                                                                            # builds it from two scans)
Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported; tests/conftest.py does that):  PYTHONPATH=. python -m pytest -q tests/ops/test_ema_chunked.py
Which path runs when (this, the per-step scan in triton_kernel.py, the blocked PyTorch path): ops/ema/paths.py.

Why it can use tensor cores although the state is diagonal: for one channel d the intra-chunk operator is a
C x C Toeplitz matrix T_d[i, j] = sum_n a c q^(i-j) (j <= i) that depends on the parameters only, so it is the
*same* matrix for every chunk of every row. One program owns one (channel, row) and multiplies T_d by a tile of BK
chunks at once: [C, C] @ [C, BK] -- a real matmul (bf16 in, fp32 accumulate). The [N]-state enters and leaves a
chunk through two more matmuls with parameter-only factors (Vandermonde columns):
    S_k = W_st @ u_k       W_st[n, j] = a q^(C-1-j)        the chunk's end state from zero
    E_k+1 = lam E_k + S_k  lam = q^C                       state passing: an associative scan over the BK columns
    y_k = T u_k + W_pr @ E_k,   W_pr[i, n] = c q^(i+1)     output: intra-chunk + the entering state
All factors are q^k with k >= 0 (no q^-k: fast decays underflow to exact zeros instead of overflowing), built once
per call in PyTorch (`_factors`, differentiable), so the backward kernel only returns their gradients
(d T = sum_k gout_k u_k^T, ...) and autograd maps them to d a, d c, d logq.

Document resets (a document starts at t: keep_t = 0): inside a chunk, positions are grouped by segment
(seg = number of starts so far in the chunk); y = sum_g [seg = g] T (u [seg = g]) -- one matmul per segment index
present in the tile (one when the tile holds no start); the entering state reaches only seg = 0, the end state
counts only the last segment, and a chunk with a start has lam = 0.

Layout: the sequence is right-aligned on the chunk grid (PAD = NC*C - L zero positions in front), so the state
after the last chunk is the state after position L-1; an incoming state h_in is added afterwards in closed form
(ops.ema.incoming_contribution / crossing_decay, autograd). The forward stores the state entering every chunk,
[B, D, NC, N] (N*L/C floats per channel: a quarter of u at C = 64, N = 16); the backward reads it, runs the
adjoint scan right to left (d E_k = lam d E_k+1 + W_pr^T gout_k), and writes d u plus per-(row, channel) partial
sums of the factor gradients (summed over rows in PyTorch: deterministic, no atomics).

Grid: (D, B) programs, each walking its row in tiles of C*BK positions (1024 at C = 64, BK = 16): 2048 programs at
the 350M config's D = 2048, B = 1 (the scan kernel runs D/32 * B = 64). A program reads one channel's positions,
so [B, L, D] would be a stride-D gather (one 32-byte sector per 2-byte element: ~16x the useful L2 traffic);
by default (channel_major) the wrapper hands the kernels [B, D, L] copies of u / d out and copies out / d u back
(four extra u-sized passes at full bandwidth, cheaper than the gathers by that estimate; unmeasured, and
`channel_major=False` keeps the in-place form for bench/gpu/bench_ema.py to compare).

Precision: bf16 u -> the big matmuls run on bf16 tensor cores with fp32 operands split as hi + lo bf16 pairs
(u itself is exact in bf16), accuracy ~2^-16 relative; fp32/fp16 u -> fp32 `ieee` dots (CUDA cores: exact fp32,
no tensor cores -- a caller that wants them passes u in bf16); fp64 -> fp64 (tests). The interpreter's bf16
tl.dot reads raw bits as integers, so under it (EMULATED) the same bf16 products are formed in fp32: the GPU's
bf16 dot itself is checked by the sm_80/sm_90 compile and the CUDA run of these tests.
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
from megatrain.ops.ema.triton_kernel import to_bf16_rounded

_TILE_CHUNKS = 16        # BK: chunks per tile = the matmul's N dimension (tensor cores need >= 16)
_NUM_WARPS = 4


@triton.jit
def _dot_bf16(x, y, EMULATED: tl.constexpr):
    """bf16 x bf16 -> fp32 on tensor cores. EMULATED (the Triton interpreter, whose bf16 dot reads the raw bits as
    integers): the same products in fp32 (a bf16 product is exact in fp32)."""
    if EMULATED:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(x, y)


@triton.jit
def _mm(x, y, SPLIT_X: tl.constexpr, SPLIT_Y: tl.constexpr, TC: tl.constexpr, EMULATED: tl.constexpr = False):
    """x @ y with fp32 accumulation. TC: on bf16 tensor cores, an fp32 operand with SPLIT_* as hi + lo bf16
    (x y ~ xh yh + xh yl + xl yh: ~16 mantissa bits); otherwise an exact dot in the operands' dtype."""
    if TC:
        xh = x.to(tl.bfloat16)
        yh = y.to(tl.bfloat16)
        acc = _dot_bf16(xh, yh, EMULATED)
        if SPLIT_X:
            acc += _dot_bf16((x - xh.to(tl.float32)).to(tl.bfloat16), yh, EMULATED)
        if SPLIT_Y:
            acc += _dot_bf16(xh, (y - yh.to(tl.float32)).to(tl.bfloat16), EMULATED)
        return acc
    else:
        return tl.dot(x, y, input_precision="ieee")


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _offset(b, p, d, L, D, CM: tl.constexpr):
    """Element (b, position p, channel d) of a [B, D, L] (CM, channel-major) or [B, L, D] tensor; b, d int64."""
    if CM:
        return (b * D + d) * L + p
    else:
        return (b * L + p) * D + d


@triton.jit
def _load_tile(U, RES, b, d, v0, L, D, PAD, C: tl.constexpr, BK: tl.constexpr, dtype: tl.constexpr,
               CM: tl.constexpr):
    """The tile of BK chunks whose first virtual position is v0: u [C, BK] (0 outside the sequence) and the
    segment index of every position inside its chunk [C, BK] (int32)."""
    rows = tl.arange(0, C)[:, None]
    cols = tl.arange(0, BK)[None, :]
    p = v0 + cols * C + rows - PAD                     # real position; < 0 in the front padding
    valid = (p >= 0) & (p < L)
    x = tl.load(U + _offset(b, p, d, L, D, CM), mask=valid, other=0.0).to(dtype)
    starts = tl.load(RES + b * L + p, mask=valid, other=0).to(tl.int32)
    return x, tl.cumsum(starts, 0)


@triton.jit
def _ema_chunked_fwd(U, RES, T, WST, WPR, LAM, OUT, STATES, STATE_OUT, L, D, N, NC, PAD,
                     C: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, TC: tl.constexpr,
                     EMULATED: tl.constexpr, CM: tl.constexpr):
    """Program (channel d, row b): out [B, L, D] (math dtype), STATES[b, d, k] = state entering chunk k,
    STATE_OUT[b, d] = state after position L-1."""
    d, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    ci = tl.arange(0, C)
    nn = tl.arange(0, BN)
    cols = tl.arange(0, BK)
    nmask = nn < N
    t_mat = tl.load(T + d * C * C + ci[:, None] * C + ci[None, :])                              # [C, C]
    w_st = tl.load(WST + d * N * C + nn[:, None] * C + ci[None, :], mask=nmask[:, None], other=0.0)   # [BN, C]
    w_pr = tl.load(WPR + d * C * N + ci[:, None] * N + nn[None, :], mask=nmask[None, :], other=0.0)   # [C, BN]
    lam = tl.load(LAM + d * N + nn, mask=nmask, other=0.0)
    dtype = t_mat.dtype
    carry = tl.zeros((BN,), dtype=dtype)               # state entering the tile's first chunk
    # tiles up to column NC (one past the last chunk): that column's entering state is the state after L-1
    for tile in range(0, tl.cdiv(NC + 1, BK)):
        k0 = tile * BK
        x, seg = _load_tile(U, RES, b, d, k0 * C, L, D, PAD, C, BK, dtype, CM)
        # state passing: E_k = lam_(k-1) E_(k-1) + S_(k-1), scanned over the columns from the previous chunk's
        # inputs (the tile reloaded one chunk to the left: cache hits), so E comes out exclusive
        xp, segp = _load_tile(U, RES, b, d, k0 * C - C, L, D, PAD, C, BK, dtype, CM)
        segp_last = tl.max(segp, 0)
        s_prev = _mm(w_st, tl.where(segp == segp_last[None, :], xp, 0.0), True, False, TC, EMULATED)  # [BN, BK]
        lam_prev = tl.where((segp_last == 0)[None, :], lam[:, None], 0.0)
        # past the last chunk nothing decays: the last column then holds the state after chunk NC-1
        lam_prev = tl.where((k0 + cols - 1 >= NC)[None, :], 1.0, lam_prev)
        a_run, e_run = tl.associative_scan((lam_prev, s_prev), 1, _combine)
        entering = a_run * carry[:, None] + e_run                                                 # [BN, BK]
        carry = tl.sum(tl.where((cols == BK - 1)[None, :], entering, 0.0), 1)
        chunk = k0 + cols
        tl.store(STATES + ((b * D + d) * NC + chunk[None, :]) * N + nn[:, None], entering,
                 mask=nmask[:, None] & (chunk < NC)[None, :])
        # output: the entering state where it reaches (before the chunk's first start), then T per segment
        y = tl.where(seg == 0, _mm(w_pr, entering, True, True, TC, EMULATED), 0.0)
        for g in range(0, tl.max(tl.max(seg, 1), 0) + 1):
            in_g = seg == g
            y += tl.where(in_g, _mm(t_mat, tl.where(in_g, x, 0.0), True, False, TC, EMULATED), 0.0)
        p = k0 * C + cols[None, :] * C + ci[:, None] - PAD
        tl.store(OUT + _offset(b, p, d, L, D, CM), y, mask=(p >= 0) & (p < L))
    tl.store(STATE_OUT + (b * D + d) * N + nn, carry, mask=nmask)


@triton.jit
def _ema_chunked_bwd(U, RES, GOUT, GSTATE, T, WST, WPR, LAM, STATES, GU, DT, DWST, DWPR, DLAM, L, D, N, NC, PAD,
                     C: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, TC: tl.constexpr,
                     EMULATED: tl.constexpr, CM: tl.constexpr, GU_BF16: tl.constexpr):
    """Program (channel d, row b), tiles right to left. F_k = d loss / d E_(k+1) (the adjoint of chunk k's end
    state) = lam_(k+1) F_(k+1) + W_pr^T gout_(k+1) [seg = 0], F_(NC-1) = d state_out. Writes d u and this
    (row, channel)'s sums: DT = sum_k sum_g gout_g u_g^T, DWST = sum_k F_k u_last^T, DWPR = sum_k gout_0 E_k^T,
    DLAM = sum_(k without start) F_k E_k."""
    d, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    ci = tl.arange(0, C)
    nn = tl.arange(0, BN)
    cols = tl.arange(0, BK)
    nmask = nn < N
    t_mat = tl.load(T + d * C * C + ci[:, None] * C + ci[None, :])
    w_st = tl.load(WST + d * N * C + nn[:, None] * C + ci[None, :], mask=nmask[:, None], other=0.0)
    w_pr = tl.load(WPR + d * C * N + ci[:, None] * N + nn[None, :], mask=nmask[None, :], other=0.0)
    lam = tl.load(LAM + d * N + nn, mask=nmask, other=0.0)
    dtype = t_mat.dtype
    t_tr = tl.trans(t_mat)
    w_st_tr = tl.trans(w_st)                                                                    # [C, BN]
    w_pr_tr = tl.trans(w_pr)                                                                    # [BN, C]
    carry = tl.load(GSTATE + (b * D + d) * N + nn, mask=nmask, other=0.0).to(dtype)
    acc_t = tl.zeros((C, C), dtype=dtype)
    acc_st = tl.zeros((BN, C), dtype=dtype)
    acc_pr = tl.zeros((C, BN), dtype=dtype)
    acc_lam = tl.zeros((BN,), dtype=dtype)
    n_tiles = tl.cdiv(NC, BK)
    for j in range(0, n_tiles):
        k0 = (n_tiles - 1 - j) * BK
        x, seg = _load_tile(U, RES, b, d, k0 * C, L, D, PAD, C, BK, dtype, CM)
        go, _ = _load_tile(GOUT, RES, b, d, k0 * C, L, D, PAD, C, BK, dtype, CM)
        # the next chunk's inputs (one chunk to the right) make the reverse scan give F_k = dE_(k+1)
        gon, segn = _load_tile(GOUT, RES, b, d, k0 * C + C, L, D, PAD, C, BK, dtype, CM)
        x_next = _mm(w_pr_tr, tl.where(segn == 0, gon, 0.0), True, True, TC, EMULATED)  # [BN, BK]
        lam_next = tl.where((tl.max(segn, 0) == 0)[None, :], lam[:, None], 0.0)
        lam_next = tl.where((k0 + cols + 1 >= NC)[None, :], 1.0, lam_next)
        a_run, f_run = tl.associative_scan((lam_next, x_next), 1, _combine, reverse=True)
        f = a_run * carry[:, None] + f_run                                                        # [BN, BK]
        carry = tl.sum(tl.where((cols == 0)[None, :], f, 0.0), 1)
        chunk = k0 + cols
        live = (chunk < NC)[None, :]
        entering = tl.load(STATES + ((b * D + d) * NC + chunk[None, :]) * N + nn[:, None],
                           mask=nmask[:, None] & live, other=0.0)                                 # [BN, BK]
        seg_last = tl.max(seg, 0)
        last = seg == seg_last[None, :]
        f = tl.where(live, f, 0.0)
        # d u: through the end state (last segment), then T^T per segment
        gu = tl.where(last, _mm(w_st_tr, f, True, True, TC, EMULATED), 0.0)
        for g in range(0, tl.max(seg_last, 0) + 1):
            # masks as float factors, not tl.where: a transposed dot operand must not carry an i1 mask through
            # shared memory (the compiler cannot store 1-bit elements there)
            in_g = (seg == g).to(dtype)
            go_g = go * in_g
            gu += in_g * _mm(t_tr, go_g, True, True, TC, EMULATED)
            acc_t += _mm(go_g, tl.trans(x * in_g), True, False, TC, EMULATED)
        acc_st += _mm(f, tl.trans(x * last.to(dtype)), False, False, False)
        acc_pr += _mm(go * (seg == 0).to(dtype), tl.trans(entering), False, False, False)
        acc_lam += tl.sum(tl.where((seg_last == 0)[None, :], f * entering, 0.0), 1)
        p = k0 * C + cols[None, :] * C + ci[:, None] - PAD
        if GU_BF16:
            gu = to_bf16_rounded(gu)
        tl.store(GU + _offset(b, p, d, L, D, CM), gu, mask=(p >= 0) & (p < L))
    part = b * D + d
    tl.store(DT + part * C * C + ci[:, None] * C + ci[None, :], acc_t)
    tl.store(DWST + part * N * C + nn[:, None] * C + ci[None, :], acc_st, mask=nmask[:, None])
    tl.store(DWPR + part * C * N + ci[:, None] * N + nn[None, :], acc_pr, mask=nmask[None, :])
    tl.store(DLAM + part * N + nn, acc_lam, mask=nmask)


def _factors(a: Tensor, c: Tensor, logq: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The parameter-only matmul factors for chunks of C positions (differentiable; see the module docstring):
    T [D, C, C] (lower-triangular Toeplitz), W_st [D, N, C], W_pr [D, C, N], lam [D, N]."""
    steps = torch.arange(chunk + 1, device=logq.device, dtype=logq.dtype)
    powers = torch.exp(logq.unsqueeze(-1) * steps)                         # [D, N, C+1]: q^0 .. q^C
    lag_kernel = torch.einsum("dn,dnl->dl", a * c, powers[..., :chunk])     # [D, C]: sum_n a c q^lag
    # T[d, i, j] = lag_kernel[d, i-j] (0 for j > i): windows of the front-padded kernel, reversed (a view)
    toeplitz = F.pad(lag_kernel, (chunk - 1, 0)).unfold(1, chunk, 1).flip(-1)
    w_st = a.unsqueeze(-1) * powers[..., :chunk].flip(-1)
    w_pr = (c.unsqueeze(-1) * powers[..., 1:]).transpose(1, 2)
    return toeplitz.contiguous(), w_st.contiguous(), w_pr.contiguous(), powers[..., chunk].contiguous()


class _Geometry:
    def __init__(self, u: Tensor, n: int, chunk: int, channel_major: bool):
        self.bsz, self.length, self.dim = u.shape
        self.channel_major = channel_major
        self.n, self.chunk = n, chunk
        self.nc = triton.cdiv(self.length, chunk)
        self.pad = self.nc * chunk - self.length
        self.consts = dict(C=chunk, BK=_TILE_CHUNKS, BN=max(16, triton.next_power_of_2(n)),
                           TC=u.dtype == torch.bfloat16, EMULATED=triton_interpreted(), CM=channel_major,
                           num_warps=_NUM_WARPS)
        self.grid = (self.dim, self.bsz)

    def dims(self) -> tuple[int, int, int, int, int]:
        return self.length, self.dim, self.n, self.nc, self.pad

    def to_kernel(self, x: Tensor) -> Tensor:
        """[B, L, D] -> the kernel's layout (a contiguous [B, D, L] copy when channel-major)."""
        return x.transpose(1, 2).contiguous() if self.channel_major else x.contiguous()

    def from_kernel(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).contiguous() if self.channel_major else x


class _ChunkedEma(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, starts: Tensor, toeplitz: Tensor, w_st: Tensor, w_pr: Tensor, lam: Tensor,
                chunk: int, channel_major: bool):
        geo = _Geometry(u, lam.shape[1], chunk, channel_major)
        dtype = toeplitz.dtype
        u = geo.to_kernel(u)
        out = torch.empty_like(u, dtype=dtype)
        states = torch.empty(geo.bsz, geo.dim, geo.nc, geo.n, dtype=dtype, device=u.device)
        state_out = torch.empty(geo.bsz, geo.dim, geo.n, dtype=dtype, device=u.device)
        _ema_chunked_fwd[geo.grid](u, starts, toeplitz, w_st, w_pr, lam, out, states, state_out, *geo.dims(),
                                   **geo.consts)
        ctx.save_for_backward(u, starts, toeplitz, w_st, w_pr, lam, states)
        ctx.geo = geo
        return geo.from_kernel(out), state_out

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_state: Tensor):
        u, starts, toeplitz, w_st, w_pr, lam, states = ctx.saved_tensors
        geo = ctx.geo
        dtype = toeplitz.dtype
        grad_out = geo.to_kernel(grad_out.to(dtype))
        grad_state = grad_state.to(dtype).contiguous()
        grad_u = torch.empty_like(u)
        parts = [torch.empty(geo.bsz, *t.shape, dtype=dtype, device=u.device) for t in (toeplitz, w_st, w_pr, lam)]
        _ema_chunked_bwd[geo.grid](u, starts, grad_out, grad_state, toeplitz, w_st, w_pr, lam, states, grad_u,
                                   *parts, *geo.dims(), GU_BF16=u.dtype == torch.bfloat16, **geo.consts)
        d_t, d_st, d_pr, d_lam = (p.sum(0) for p in parts)
        return geo.from_kernel(grad_u), None, d_t, d_st, d_pr, d_lam, None, None


def ema_scan_chunked(u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
                     h_in: Optional[Tensor] = None, chunk: int = 64,
                     channel_major: bool = True) -> tuple[Tensor, Tensor]:
    """u [B, L, D] any float dtype; a/c/logq [D, N] in the math dtype (fp32, or fp64); resets [B, L] bool;
    h_in [B, D, N]; chunk C a power of two >= 16 -> (out [B, L, D], state [B, D, N]) in the math dtype.
    channel_major: the kernels read and write [B, D, L] copies (coalesced; see the module docstring), else
    [B, L, D] in place (stride-D gathers)."""
    if triton_interpreted() != isinstance(_ema_chunked_fwd, InterpretedFunction):
        raise ValueError("megatrain.ops.ema.triton_chunked: TRITON_INTERPRET must be set before triton is imported "
                         f"(it is {'1' if triton_interpreted() else 'unset'} now, was not at import)")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"ema_scan_chunked: chunk must be a power of two >= 16 (tl.dot tiles), got {chunk}")
    from megatrain.ops.ema import crossing_decay, incoming_contribution  # the shared closed forms (plain PyTorch)

    bsz, length, _ = u.shape
    dtype = a.dtype
    c, logq = c.to(dtype), logq.to(dtype)
    starts = (torch.zeros(bsz, length, dtype=torch.int8, device=u.device) if resets is None
              else resets.to(torch.int8).contiguous())
    with torch.autocast(device_type=u.device.type, enabled=False):  # the factors stay in the math dtype
        factors = _factors(a, c, logq, chunk)
    out, state = _ChunkedEma.apply(u, starts, *factors, chunk, channel_major)
    if h_in is not None:
        h_in = h_in.to(dtype)
        out = out + incoming_contribution(h_in, c, logq, length, resets, chunk)
        state = state + crossing_decay(logq, bsz, length, resets) * h_in
    return out, state
