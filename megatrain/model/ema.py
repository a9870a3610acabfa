"""MEGA's multi-dimensional damped EMA (Ma et al., arXiv 2209.10655, eq. 2-3), blocked for linear memory.

Use:
    from megatrain.model.ema import MultiDimDampedEMA
    ema = MultiDimDampedEMA(hidden_size=256, ema_projection_size=16, bidirectional=False)
    y, state = ema(x)                    # x [B, L, D] -> y [B, L, D], state [B, D, N] after the last position
    y2, state = ema(x2, state=state)     # continue the same sequence (unidirectional only)
    y_t, state = ema.step(x_t, state)    # one token, x_t [B, D]
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_ema.py

Math, per channel d and EMA dimension n (parameter names are Hugging Face's `MegaMultiDimensionDampedEma`):
    p = sigmoid(damping_factor), alpha = sigmoid(decay_factor), q = 1 - p * alpha
    h_t = p * beta * x_t + q * h_{t-1}                     (beta = ema_expansion_matrix)
    ema_t = sum_n gamma_n * sqrt(1/N) * h_t[n]             (gamma = kernel_projection_matrix)
    y_t = silu(ema_t + residual_weight * x_t)
Bidirectional: channels D..2D hold a second EMA run right to left; both directions include lag 0 and are summed.
Padded positions (mask 0) are zeroed before the EMA (the residual still sees them, as in HF).

Algorithm (no [L, D, N] tensor; HF builds an [D, N, L] kernel and 2L-point FFTs): the sequence is cut into blocks
of C positions. Inside a block the EMA is a causal convolution with the C-lag kernel, done as a Toeplitz matmul.
Between blocks only the [B, D, N] state travels: each block's end state from zero start (one matmul), a
log-depth scan over blocks (H_b = q^C H_{b-1} + s_b), and each block's incoming state is propagated to its
positions in closed form (one matmul). Working memory O(B*L*D + D*C*C + B*D*N*L/C).
Document resets (`doc_ids`) cut the carry between blocks; a block with a document boundary inside is redone as a
short sequence of its own at 16-position blocks (whose boundary blocks use masked 16x16 Toeplitz matrices).
An incoming state (explicit `state`, or `boundary` for sequence parallelism) is linear, so it is added afterwards in
the same closed form. It reaches the positions before the piece's first document change; a document that starts
exactly at the piece's first position is invisible here, so whoever hands the state over zeros it for that row
(`megatrain.parallel.sequence` does, from the slices' edge doc ids). Each direction's end state is computed before
its output, so a two-phase boundary (`start`/`wait`, docs/CONTRACTS.md) exchanges while the output is computed.
Truncation to T lags is exact: the full EMA minus a second EMA (output weights gamma * q^T) read T positions back.
`ema_ref` below is the naive sequential recurrence the fast path is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# boundary(local_state [B,D,N], decay [B,D,N], direction "forward"|"backward") -> incoming state [B,D,N]; a boundary
# may also offer the two-phase `boundary.start(local_state, decay, direction) -> handle`, `handle.wait() -> h_in`
# (megatrain.parallel.sequence's does): then the exchange overlaps the local output (see _start_boundary).
Boundary = Callable[[Tensor, Tensor, str], Tensor]

# Elements allowed in one group of document-masked Toeplitz blocks (see _masked_intra_block).
_MASKED_GROUP_ELEMENTS = 1 << 22
# Blocks that contain a document boundary are redone as short sequences with blocks of this size (see _causal_ema).
_FINE_BLOCK = 16
_FINE_GROUP_BLOCKS = 64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 math for fp32/bf16/fp16 inputs; fp64 inputs stay fp64 (tests compare at fp64)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _direction_coefficients(ema: "MultiDimDampedEMA", direction: int, dtype: torch.dtype):
    """(a, c, log q), each [D, N], of one direction (0 = left-to-right, 1 = right-to-left) in `dtype`."""
    rows = slice(direction * ema.hidden_size, (direction + 1) * ema.hidden_size)
    p = torch.sigmoid(ema.damping_factor[rows, :, 0].to(dtype))
    alpha = torch.sigmoid(ema.decay_factor[rows, :, 0].to(dtype))
    a = p * ema.ema_expansion_matrix[rows, :, 0].to(dtype)
    c = ema.kernel_projection_matrix[rows].to(dtype) * math.sqrt(1.0 / ema.ema_projection_size)
    # q in (0, 1): log1p keeps precision when p * alpha is small. When both sigmoids round to 1, q = 0 and
    # log q = -inf would turn the lag-0 power into 0 * inf = NaN (transformers' kernel does exactly that);
    # q = e^-60 is 0 for every practical purpose and keeps everything finite.
    logq = torch.log1p(-p * alpha).clamp(min=-60.0)
    return a, c, logq


@dataclass
class _BlockKernel:
    """Everything one direction needs for blocks of C positions; built once per forward."""
    block: int
    logq: Tensor       # [D, N]     log of the per-step decay q
    toeplitz: Tensor   # [D, C, C]  T[d, i, j] = sum_n a c q^(i-j) for i >= j, else 0
    w_state: Tensor    # [D, C, N]  a q^(C-1-j): position j's weight in the block's end state
    w_prop: Tensor     # [D, N, C]  c q^(i+1): weight of the state entering the block at position i
    block_decay: Tensor  # [D, N]   q^C
    fine: Optional["_BlockKernel"] = None  # finer blocks for the blocks that contain a document boundary


def _make_block_kernel(a: Tensor, c: Tensor, logq: Tensor, block: int, with_fine: bool = False) -> _BlockKernel:
    steps = torch.arange(block + 1, device=a.device, dtype=a.dtype)
    powers = torch.exp(logq.unsqueeze(-1) * steps)                          # [D, N, C+1]: q^0 .. q^C
    lag_kernel = torch.einsum("dn,dnl->dl", a * c, powers[..., :block])      # [D, C]
    # T[d, i, j] = padded[d, C-1 + i - j] with C-1 zeros in front (the j > i half): sliding windows of the
    # padded kernel, reversed. unfold is a view and its backward a cheap overlap-add (an index gather's backward
    # is a slow scatter-add).
    padded = F.pad(lag_kernel, (block - 1, 0))
    toeplitz = padded.unfold(1, block, 1).flip(-1)
    w_state = (a.unsqueeze(-1) * powers[..., :block].flip(-1)).transpose(1, 2)
    w_prop = c.unsqueeze(-1) * powers[..., 1:]
    fine = _make_block_kernel(a, c, logq, _FINE_BLOCK) if with_fine and block > _FINE_BLOCK else None
    return _BlockKernel(block, logq, toeplitz, w_state.contiguous(), w_prop, powers[..., block], fine)


class _Relayout(torch.autograd.Function):
    """x.permute(dims).contiguous() whose backward also returns a contiguous gradient.

    Plain permute's gradient is a strided view; handed to the next batched matmul's backward it made MKL take a
    slow path (10x slower weight gradients), so both directions copy into the layout the matmuls want.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...]) -> Tensor:
        ctx.inverse = tuple(sorted(range(len(dims)), key=dims.__getitem__))
        return x.permute(dims).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.permute(ctx.inverse).contiguous(), None


def _relayout(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return _Relayout.apply(x, dims)


def _resets_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """[B, L] bool: position t starts a new document (t >= 1 and its id differs from t-1's)."""
    changed = doc_ids[:, 1:] != doc_ids[:, :-1]
    return F.pad(changed, (1, 0), value=False)


def _scan_blocks(s: Tensor, decay: Tensor) -> Tensor:
    """Inclusive scan H_b = decay_b * H_{b-1} + s_b along dim 2 (log-depth, autograd-friendly)."""
    nb, step = s.shape[2], 1
    while step < nb:
        s = torch.cat([s[:, :, :step], s[:, :, step:] + decay[:, :, step:] * s[:, :, :-step]], dim=2)
        decay = torch.cat([decay[:, :, :step], decay[:, :, step:] * decay[:, :, :-step]], dim=2)
        step *= 2
    return s


def _masked_toeplitz_apply(toeplitz: Tensor, seg: Tensor, x: Tensor) -> Tensor:
    # seg [g, C] segment index of every position; x [D, g, C]. Only same-segment pairs interact.
    same = (seg.unsqueeze(-1) == seg.unsqueeze(-2)).to(x.dtype)           # [g, C, C]
    masked = toeplitz.unsqueeze(1) * same.unsqueeze(0)                     # [D, g, C, C]
    return (masked @ x.unsqueeze(-1)).squeeze(-1)


def _masked_intra_block(kern: _BlockKernel, xb: Tensor, seg: Tensor, blocks: Tensor) -> Tensor:
    """Intra-block convolution of the `blocks` that contain a document boundary: [D, len(blocks), C]."""
    d, c = kern.toeplitz.shape[0], kern.block
    group = max(1, _MASKED_GROUP_ELEMENTS // (d * c * c))
    outs = []
    for idx in blocks.split(group):
        # checkpointed: the [D, g, C, C] masked matrices are rebuilt in backward instead of kept per group,
        # so many short documents cost time, not memory
        outs.append(checkpoint(_masked_toeplitz_apply, kern.toeplitz, seg[idx], xb[:, idx], use_reentrant=False))
    return torch.cat(outs, dim=1)


def _causal_ema(u: Tensor, kern: _BlockKernel, resets: Optional[Tensor],
                on_state: Optional[Callable[[Tensor, _BlockKernel], None]] = None) -> tuple[Tensor, Tensor]:
    """Left-to-right EMA from zero incoming state: u [B, L, D] (already masked), resets [B, L] bool or None.

    Returns (ema [B, L, D] = sum_n c h_t[n], state [B, D, N] after the last position). The end state is computed
    first and handed to `on_state(state, kern)` before the output (SP: the boundary exchange starts there and
    runs while the output is computed).
    """
    bsz, length, dim = u.shape
    c = kern.block
    nb = -(-length // c)
    pad = nb * c - length
    m = bsz * nb
    # [D, B*nb, C]: every block of every row is one row of a batched matmul per channel
    xb = _relayout(F.pad(u, (0, 0, 0, pad)), (2, 0, 1)).view(dim, m, c)

    decay = kern.block_decay[:, None, None, :]                               # [D, 1, 1, N]
    if resets is not None:
        rb = F.pad(resets, (0, pad), value=False).view(bsz, nb, c)
        seg = rb.cumsum(-1)                       # segment index inside each block (0 until the first reset)
        carry_in = (seg == 0).reshape(m, c)       # positions the block's incoming state reaches
        to_state = (seg == seg[..., -1:]).reshape(m, c)  # positions that reach the block's end state
        block_state = torch.bmm(xb * to_state.to(xb.dtype), kern.w_state)   # [D, M, N]
        decay = decay * carry_in.view(1, bsz, nb, c)[..., -1:].to(u.dtype)
    else:
        block_state = torch.bmm(xb, kern.w_state)
    n = block_state.shape[-1]
    decay = decay.expand(dim, bsz, nb, n)
    ends = _scan_blocks(block_state.view(dim, bsz, nb, n), decay)           # state after each block
    entering = F.pad(ends[:, :, :-1], (0, 0, 1, 0))                          # state entering each block

    # State after the last real position: the last block holds `tail` real positions (trailing pads are zeros).
    tail = length - (nb - 1) * c
    last_x = xb.view(dim, bsz, nb, c)[:, :, -1, :tail]
    w_tail = kern.w_state[:, c - tail:]                                      # a q^(tail-1-j)
    tail_decay = torch.exp(kern.logq * tail)[:, None, :]                    # [D, 1, N]
    if resets is not None:
        last_x = last_x * to_state.view(bsz, nb, c)[:, -1, :tail].to(u.dtype)
        tail_decay = tail_decay * carry_in.view(bsz, nb, c)[:, -1, -1].to(u.dtype)[None, :, None]
    state = (torch.bmm(last_x, w_tail) + tail_decay * entering[:, :, -1]).permute(1, 0, 2)
    if on_state is not None:
        on_state(state, kern)     # nothing below needs an incoming state

    out = torch.bmm(xb, kern.toeplitz.transpose(1, 2))
    if resets is not None:
        crossing = rb[..., 1:].any(-1).reshape(m).nonzero().squeeze(1)
        if crossing.numel() and kern.fine is not None:
            # Blocks with a document boundary inside: their intra-block part is the EMA of a C-long sequence with
            # resets and zero incoming state, i.e. this same algorithm at a finer block size. Materialized
            # masked Toeplitz matrices ([D, C, C] per block, memory-bound) are left to the fine level's
            # [D, 16, 16] ones: many short documents stay within a few times the cost of none.
            fine_outs = []
            for idx in crossing.split(_FINE_GROUP_BLOCKS):  # bounded working set (cache): ~1.4x faster at 32K
                fine_in = _relayout(xb[:, idx], (1, 2, 0))                       # [g, C, D]
                fine_out, _ = _causal_ema(fine_in, kern.fine, rb.reshape(m, c)[idx])
                fine_outs.append(_relayout(fine_out, (2, 0, 1)))
            out = out.index_copy(1, crossing, torch.cat(fine_outs, dim=1))
        elif crossing.numel():
            masked = _masked_intra_block(kern, xb, seg.reshape(m, c), crossing)
            out = out.index_copy(1, crossing, masked)
    incoming = torch.bmm(entering.reshape(dim, m, n), kern.w_prop)
    if resets is not None:
        incoming = incoming * carry_in.to(incoming.dtype)
    out = _relayout((out + incoming).view(dim, bsz, nb * c)[..., :length], (1, 2, 0))
    return out, state


def _incoming_contribution(kern: _BlockKernel, h_in: Tensor, length: int, resets: Optional[Tensor]) -> Tensor:
    """Contribution sum_n c q^(t+1) h_in[n] of an incoming state [B, D, N] to positions t < first reset: [B, L, D]."""
    bsz, dim, n = h_in.shape
    c = kern.block
    nb = -(-length // c)
    starts = torch.arange(nb, device=h_in.device, dtype=h_in.dtype) * c
    to_block = torch.exp(kern.logq.unsqueeze(1) * starts.unsqueeze(-1))     # [D, nb, N]: q^(C b)
    entering = h_in.permute(1, 0, 2).unsqueeze(2) * to_block.unsqueeze(1)    # [D, B, nb, N]
    out = torch.bmm(entering.reshape(dim, bsz * nb, n), kern.w_prop).view(dim, bsz, nb * c)[..., :length]
    out = _relayout(out, (1, 2, 0))
    if resets is not None:
        out = out * (resets.cumsum(1) == 0).unsqueeze(-1).to(out.dtype)
    return out


def _crossing_decay(kern: _BlockKernel, length: int, resets: Optional[Tensor], bsz: int) -> Tensor:
    """[B, D, N] factor an incoming state is multiplied by across `length` positions (0 if a document starts)."""
    decay = torch.exp(kern.logq * length).unsqueeze(0).expand(bsz, -1, -1)
    if resets is not None:
        decay = decay * (~resets.any(1)).to(decay.dtype)[:, None, None]
    return decay


def _one_direction(u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor], block: int,
                   truncation: Optional[int], on_state=None) -> tuple[Tensor, Tensor, _BlockKernel]:
    """Left-to-right EMA (zero incoming state) with optional truncation: (ema [B,L,D], state [B,D,N], kernel).
    `on_state`: see _causal_ema (no boundary with truncation)."""
    length = u.shape[1]
    c_blk = min(block, length)
    kern = _make_block_kernel(a, c, logq, c_blk, with_fine=resets is not None)
    out, state = _causal_ema(u, kern, resets, on_state)
    if truncation is not None and truncation < length:
        # Lags >= T: sum_{j <= t-T} a c q^(t-j) u_j = sum_n (c q^T)_n h_{t-T}[n] -- the output of an EMA with
        # output weights c q^T, read T positions earlier (only if t-T lies in t's document).
        far = _make_block_kernel(a, c * torch.exp(logq * truncation), logq, c_blk, with_fine=resets is not None)
        far_out, _ = _causal_ema(u, far, resets)
        shifted = F.pad(far_out[:, : length - truncation], (0, 0, truncation, 0))
        if resets is not None:
            seg = resets.cumsum(1)
            same_doc = seg == F.pad(seg[:, : length - truncation], (truncation, 0), value=-1)
            shifted = shifted * same_doc.unsqueeze(-1).to(shifted.dtype)
        out = out - shifted
    return out, state, kern


class _Ready:
    """The handle of a plain callable boundary: its answer is already there."""

    def __init__(self, h_in: Tensor):
        self.h_in = h_in

    def wait(self) -> Tensor:
        return self.h_in


def _start_boundary(boundary: Boundary, local_state: Tensor, decay: Tensor, direction: str):
    """A handle whose wait() gives the incoming state: the boundary's own two-phase start() when it has one (the
    exchange then runs until wait), else the plain call, answered at once."""
    start = getattr(boundary, "start", None)
    if start is not None:
        return start(local_state, decay, direction)
    return _Ready(boundary(local_state, decay, direction))


class MultiDimDampedEMA(nn.Module):
    """MEGA's damped EMA sublayer with HF's parameter names/shapes; batch-first; see the module docstring."""

    def __init__(self, hidden_size: int, ema_projection_size: int, bidirectional: bool,
                 truncation: Optional[int] = None, block_size: int = 128):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ema_projection_size", ema_projection_size),
                            ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiDimDampedEMA: {name} must be a positive int, got {value!r}")
        if truncation is not None and (not isinstance(truncation, int) or truncation < 1):
            raise ValueError(f"MultiDimDampedEMA: truncation must be None or a positive int, got {truncation!r}")
        self.hidden_size = hidden_size
        self.ema_projection_size = ema_projection_size
        self.bidirectional = bool(bidirectional)
        self.truncation = truncation
        self.block_size = block_size
        k = 2 * hidden_size if self.bidirectional else hidden_size
        self.damping_factor = nn.Parameter(torch.empty(k, ema_projection_size, 1))
        self.decay_factor = nn.Parameter(torch.empty(k, ema_projection_size, 1))
        self.ema_expansion_matrix = nn.Parameter(torch.empty(k, ema_projection_size, 1))
        self.kernel_projection_matrix = nn.Parameter(torch.empty(k, ema_projection_size))
        self.residual_weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ema_projection_size={self.ema_projection_size}, "
                f"bidirectional={self.bidirectional}, truncation={self.truncation}, block_size={self.block_size}")

    @torch.no_grad()
    def reset_parameters(self, delta_alpha_range: float = 0.2, beta_range: float = 0.02,
                         gamma_omega_range: float = 1.0) -> None:
        """HF's init (MegaConfig.ema_delta_alpha_range, ema_beta_range, ema_gamma_omega_range; HF defaults)."""
        nn.init.normal_(self.damping_factor, mean=0.0, std=delta_alpha_range)
        nn.init.normal_(self.decay_factor, mean=0.0, std=delta_alpha_range)
        # beta = alternating signs [1, -1, 1, ...] along the EMA dimension, plus small noise
        signs = torch.ones(self.ema_projection_size, 1)
        signs[1::2] = -1.0
        self.ema_expansion_matrix.normal_(mean=0.0, std=beta_range).add_(signs)
        nn.init.normal_(self.kernel_projection_matrix, mean=0.0, std=gamma_omega_range)
        nn.init.normal_(self.residual_weight, mean=0.0, std=gamma_omega_range)

    def _validate(self, x: Tensor, mask: Optional[Tensor], doc_ids: Optional[Tensor], state: Optional[Tensor],
                  boundary: Optional[Boundary]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiDimDampedEMA: x must be [B, L, {self.hidden_size}], got {tuple(x.shape)}")
        bsz, length = x.shape[:2]
        if length == 0:
            raise ValueError("MultiDimDampedEMA: x has length 0")
        for name, t in (("mask", mask), ("doc_ids", doc_ids)):
            if t is not None and tuple(t.shape) != (bsz, length):
                raise ValueError(f"MultiDimDampedEMA: {name} must be [B, L] = {(bsz, length)}, got {tuple(t.shape)}")
        if state is not None and boundary is not None:
            raise ValueError("MultiDimDampedEMA: pass either state or boundary, not both")
        if state is not None:
            if self.bidirectional:
                raise ValueError("MultiDimDampedEMA: state is for unidirectional EMA only (bidirectional=True)")
            want = (bsz, self.hidden_size, self.ema_projection_size)
            if tuple(state.shape) != want:
                raise ValueError(f"MultiDimDampedEMA: state must be {want}, got {tuple(state.shape)}")
        if boundary is not None and not callable(boundary):
            raise ValueError(f"MultiDimDampedEMA: boundary must be callable, got {type(boundary).__name__}")
        if self.truncation is not None and (state is not None or boundary is not None):
            raise ValueError(f"MultiDimDampedEMA: truncation={self.truncation} has no finite state; "
                             "state/boundary are unsupported with truncation")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
                state: Optional[Tensor] = None, boundary: Optional[Boundary] = None) -> tuple[Tensor, Tensor]:
        """y = silu(ema(x) + residual_weight * x) [B, L, D] in x's dtype; state_out [B, D, N] (forward direction)."""
        self._validate(x, mask, doc_ids, state, boundary)
        dtype = _compute_dtype(x.dtype)
        length = x.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(dtype)
            u = xf if mask is None else xf * mask.to(dtype).unsqueeze(-1)
            resets = None if doc_ids is None else _resets_from_doc_ids(doc_ids)
            # SP boundary, in phases: (1) each direction's local pass computes its end state, (2) starts the
            # exchange (on_state), (3) computes its local output, then (4) the incoming states are waited for and
            # their closed-form contributions added -- the exchanges run while (3) computes.
            pending = {}

            def exchange(direction, resets_d):
                def on_state(local_state, kern):
                    decay = _crossing_decay(kern, length, resets_d, x.shape[0])
                    pending[direction] = _start_boundary(boundary, local_state, decay, direction)
                return None if boundary is None else on_state

            a, c, logq = _direction_coefficients(self, 0, dtype)
            out, state_out, kern = _one_direction(u, a, c, logq, resets, self.block_size, self.truncation,
                                                  exchange("forward", resets))
            if self.bidirectional:
                # right-to-left = left-to-right on the reversed sequence; doc resets recomputed on reversed ids
                u_rev = u.flip(1)
                resets_rev = None if doc_ids is None else _resets_from_doc_ids(doc_ids.flip(1))
                a, c, logq = _direction_coefficients(self, 1, dtype)
                out_rev, _, kern_rev = _one_direction(u_rev, a, c, logq, resets_rev, self.block_size,
                                                      self.truncation, exchange("backward", resets_rev))
            h_in = state.to(dtype) if state is not None else None
            if boundary is not None:
                h_in = pending["forward"].wait()
            if h_in is not None:
                out = out + _incoming_contribution(kern, h_in, length, resets)
                state_out = state_out + _crossing_decay(kern, length, resets, x.shape[0]) * h_in
            if self.bidirectional:
                if boundary is not None:
                    h_rev = pending["backward"].wait()
                    out_rev = out_rev + _incoming_contribution(kern_rev, h_rev, length, resets_rev)
                out = out + out_rev.flip(1)
            y = F.silu(out + xf * self.residual_weight.to(dtype))
        return y.to(x.dtype), state_out

    def step(self, x_t: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One decoding step (unidirectional): x_t [B, D], state [B, D, N] or None -> (y_t [B, D], new state)."""
        if self.bidirectional:
            raise ValueError("MultiDimDampedEMA.step: incremental decoding needs bidirectional=False")
        if x_t.dim() != 2 or x_t.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiDimDampedEMA.step: x_t must be [B, {self.hidden_size}], got {tuple(x_t.shape)}")
        if self.truncation is not None:
            raise ValueError(f"MultiDimDampedEMA.step: truncation={self.truncation} has no finite state")
        want = (x_t.shape[0], self.hidden_size, self.ema_projection_size)
        if state is not None and tuple(state.shape) != want:
            raise ValueError(f"MultiDimDampedEMA.step: state must be {want}, got {tuple(state.shape)}")
        dtype = _compute_dtype(x_t.dtype)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            xf = x_t.to(dtype)
            a, c, logq = _direction_coefficients(self, 0, dtype)
            h = a * xf.unsqueeze(-1)
            if state is not None:
                h = h + torch.exp(logq) * state.to(dtype)
            y = F.silu((h * c).sum(-1) + xf * self.residual_weight.to(dtype))
        return y.to(x_t.dtype), h


def ema_ref(x: Tensor, ema: MultiDimDampedEMA, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
            state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Naive reference: the sequential recurrence over t (truncation: explicit windowed kernel sum), in x's dtype
    (fp64-capable; parameters are cast to it). Same inputs/outputs as `ema(...)` without `boundary`."""
    dtype = x.dtype
    bsz, length, dim = x.shape
    u = x if mask is None else x * mask.to(dtype).unsqueeze(-1)
    if doc_ids is None:
        doc_ids = torch.zeros(bsz, length, dtype=torch.long, device=x.device)

    def run(u: Tensor, docs: Tensor, direction: int, h: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(ema.damping_factor.to(dtype))[direction * dim:(direction + 1) * dim, :, 0]
        alpha = torch.sigmoid(ema.decay_factor.to(dtype))[direction * dim:(direction + 1) * dim, :, 0]
        beta = ema.ema_expansion_matrix.to(dtype)[direction * dim:(direction + 1) * dim, :, 0]
        gamma = ema.kernel_projection_matrix.to(dtype)[direction * dim:(direction + 1) * dim]
        q = 1 - p * alpha
        a = p * beta
        c = gamma / math.sqrt(ema.ema_projection_size)
        h = torch.zeros(bsz, dim, ema.ema_projection_size, dtype=dtype, device=x.device) if h is None else h
        outs = []
        for t in range(length):
            keep = torch.ones(bsz, 1, 1, dtype=dtype, device=x.device)
            if t > 0:
                keep = (docs[:, t] == docs[:, t - 1]).to(dtype)[:, None, None]
            h = a * u[:, t, :, None] + q * h * keep
            if ema.truncation is None:
                outs.append((h * c).sum(-1))
            else:
                # y_t = sum over j in t's document with t - j < T of sum_n a c q^(t-j) u_j
                acc = torch.zeros(bsz, dim, dtype=dtype, device=x.device)
                for j in range(t, max(t - ema.truncation, -1), -1):
                    same = (docs[:, j:t + 1] == docs[:, t:t + 1]).all(1).to(dtype)[:, None]
                    acc = acc + same * (a * c * q ** (t - j) * u[:, j, :, None]).sum(-1)
                outs.append(acc)
        return torch.stack(outs, dim=1), h

    out, state_out = run(u, doc_ids, 0, None if state is None else state.to(dtype))
    if ema.bidirectional:
        out_rev, _ = run(u.flip(1), doc_ids.flip(1), 1, None)
        out = out + out_rev.flip(1)
    y = F.silu(out + x * ema.residual_weight.to(dtype))
    return y, state_out
