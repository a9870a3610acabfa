"""The EMA in blocked PyTorch: linear memory, matmul-shaped, autograd does the backward.

    from megatrain.ops.ema.torch_blocked import causal_ema_blocked
    out, state = causal_ema_blocked(u, a, c, logq, resets, h_in, block)   # same contract as reference.ema_scan_ref
                                                                           # (no truncation: see ops.ema.ema_scan)
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_ema_ops.py tests/model/test_ema.py

Algorithm (no [L, D, N] tensor; HF builds an [D, N, L] kernel and 2L-point FFTs): the sequence is cut into blocks
of C positions. Inside a block the EMA is a causal convolution with the C-lag kernel sum_n a c q^k, done as a
Toeplitz matmul. Between blocks only the [B, D, N] state travels: each block's end state from zero start (one
matmul), the state recurrence over blocks (H_b = q^C H_{b-1} + s_b: ops/ema/state.py's prefix, log-depth),
and each block's incoming state is propagated to its positions in closed form (one matmul). Working memory
O(B*L*D + D*C*C + B*D*N*L/C).
Document resets cut the carry between blocks; a block with a document boundary inside is redone as a short
sequence of its own at 16-position blocks (whose boundary blocks use masked 16x16 Toeplitz matrices).
An incoming state h_in is linear, so it is added afterwards in the same closed form (`_incoming_contribution`).
It reaches the positions before the first reset; resets[:, 0] = True cuts it entirely.

Complex coefficients (Megalodon's complex EMA, ops/cema): with complex q = exp(logq) and output weights c, a real
input and the real output Re(sum_n c h_t), the same algorithm holds with a complex [B, D, N] state. The lag kernel
Re(sum_n a c q^k) is real, so the Toeplitz matmuls stay real; the state enters and leaves the blocks through real
matmuls on its (re, im) pairs ([.., 2N] columns: `_state_columns`, `_prop_rows`), and the recurrence between blocks
is state.py's prefix on complex tensors. For real coefficients those helpers are identities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from megatrain.ops.ema.state import carry, crossing_decay, power, prefix

# Elements allowed in one group of document-masked Toeplitz blocks (see _masked_intra_block).
_MASKED_GROUP_ELEMENTS = 1 << 22
# Blocks that contain a document boundary are redone as short sequences with blocks of this size (see _causal_ema).
_FINE_BLOCK = 16
_FINE_GROUP_BLOCKS = 64


@dataclass
class _BlockKernel:
    """Everything one direction needs for blocks of C positions; built once per forward."""
    block: int
    logq: Tensor       # [D, N]     log of the per-step decay q
    toeplitz: Tensor   # [D, C, C]  T[d, i, j] = sum_n a c q^(i-j) for i >= j, else 0 (real part if complex)
    w_state: Tensor    # [D, C, N]  a q^(C-1-j): position j's weight in the block's end state ([D, C, 2N] complex)
    w_prop: Tensor     # [D, N, C]  c q^(i+1): weight of the state entering the block at position i ([D, 2N, C])
    block_decay: Tensor  # [D, N]   q^C (complex for a complex EMA)
    fine: Optional["_BlockKernel"] = None  # finer blocks for the blocks that contain a document boundary


def _powers(logq: Tensor, count: int) -> Tensor:
    """[D, N, count]: q^0 .. q^(count-1) (complex for a complex logq)."""
    steps = torch.arange(count, device=logq.device, dtype=logq.real.dtype)
    return power(logq.unsqueeze(-1), steps)


def _state_columns(w: Tensor) -> Tensor:
    """Weights into the state [.., N] -> real [.., 2N] columns, (re, im) interleaved (real w: unchanged), so that
    real x @ columns = the complex state, read back by _complex_state."""
    return torch.view_as_real(w).flatten(-2) if w.is_complex() else w


def _complex_state(t: Tensor, is_complex: bool) -> Tensor:
    """Real [.., 2N] (re, im interleaved) -> complex [.., N]; unchanged for a real EMA."""
    return torch.view_as_complex(t.unflatten(-1, (-1, 2))) if is_complex else t


def _real_state(h: Tensor) -> Tensor:
    """A state [.., N] as the real [.., 2N] rows that _prop_rows multiply (identity for a real state)."""
    return torch.view_as_real(h).flatten(-2) if h.is_complex() else h


def _prop_rows(w_prop: Tensor) -> Tensor:
    """[D, N, C] weights c q^(i+1) of an entering state -> the real [D, 2N, C] rows with
    _real_state(h) @ rows = Re(sum_n w h): rows (Re w, -Im w) interleaved (real w: unchanged)."""
    if not w_prop.is_complex():
        return w_prop
    sign = torch.tensor([1.0, -1.0], dtype=w_prop.real.dtype, device=w_prop.device)
    return (torch.view_as_real(w_prop.transpose(1, 2)) * sign).flatten(-2).transpose(1, 2)


def _make_block_kernel(a: Tensor, c: Tensor, logq: Tensor, block: int, with_fine: bool = False) -> _BlockKernel:
    powers = _powers(logq, block + 1)                                       # [D, N, C+1]: q^0 .. q^C
    lag_kernel = torch.einsum("dn,dnl->dl", a * c, powers[..., :block])      # [D, C]
    if lag_kernel.is_complex():
        lag_kernel = lag_kernel.real    # the output is Re(sum_n c h): a real kernel
    # T[d, i, j] = padded[d, C-1 + i - j] with C-1 zeros in front (the j > i half): sliding windows of the
    # padded kernel, reversed. unfold is a view and its backward a cheap overlap-add (an index gather's backward
    # is a slow scatter-add).
    padded = F.pad(lag_kernel, (block - 1, 0))
    toeplitz = padded.unfold(1, block, 1).flip(-1)
    w_state = _state_columns((a.unsqueeze(-1) * powers[..., :block].flip(-1)).transpose(1, 2))
    w_prop = _prop_rows(c.unsqueeze(-1) * powers[..., 1:])
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
                on_state: Optional[Callable[[Tensor], None]] = None) -> tuple[Tensor, Tensor]:
    """Left-to-right EMA from zero incoming state: u [B, L, D] (already masked), resets [B, L] bool or None.

    Returns (ema [B, L, D] = sum_n c h_t[n], state [B, D, N] after the last position). The end state is computed
    first and handed to `on_state(state)` before the output (sequence parallelism starts the boundary exchange
    there, so it runs while the output -- the Toeplitz matmuls, most of the work -- is computed).
    """
    bsz, length, dim = u.shape
    c = kern.block
    cplx = kern.block_decay.is_complex()
    nb = -(-length // c)
    pad = nb * c - length
    m = bsz * nb
    # [D, B*nb, C]: every block of every row is one row of a batched matmul per channel
    xb = _relayout(F.pad(u, (0, 0, 0, pad)), (2, 0, 1)).view(dim, m, c)

    # ---- the states: each block's end state from zero start, a scan over blocks, the state after the last position
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
    block_state = _complex_state(block_state, cplx)
    n = block_state.shape[-1]
    decay = decay.expand(dim, bsz, nb, n)
    # the state entering each block: the blocks are pieces of the state recurrence (ops/ema/state.py), in order
    entering = prefix(block_state.view(dim, bsz, nb, n).movedim(2, 0), decay.movedim(2, 0)).movedim(0, 2)
    # State after the last real position: the last block holds `tail` real positions (trailing pads are zeros).
    tail = length - (nb - 1) * c
    last_x = xb.view(dim, bsz, nb, c)[:, :, -1, :tail]
    w_tail = kern.w_state[:, c - tail:]                                      # a q^(tail-1-j)
    tail_decay = power(kern.logq, tail)[:, None, :]                         # [D, 1, N]
    if resets is not None:
        last_x = last_x * to_state.view(bsz, nb, c)[:, -1, :tail].to(u.dtype)
        tail_decay = tail_decay * carry_in.view(bsz, nb, c)[:, -1, -1].to(u.dtype)[None, :, None]
    state = carry(_complex_state(torch.bmm(last_x, w_tail), cplx), tail_decay, None,
                  entering[:, :, -1]).permute(1, 0, 2)
    if on_state is not None:
        on_state(state)  # nothing below needs an incoming state

    # ---- the output: intra-block Toeplitz matmuls + each block's entering state in closed form
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
    incoming = torch.bmm(_real_state(entering.reshape(dim, m, n)), kern.w_prop)
    if resets is not None:
        incoming = incoming * carry_in.to(incoming.dtype)
    out = _relayout((out + incoming).view(dim, bsz, nb * c)[..., :length], (1, 2, 0))
    return out, state


def _incoming_contribution(logq: Tensor, w_prop: Tensor, h_in: Tensor, length: int,
                           resets: Optional[Tensor]) -> Tensor:
    """Contribution sum_n c q^(t+1) h_in[n] of an incoming state [B, D, N] to positions t < first reset: [B, L, D]
    (its real part for a complex EMA). w_prop = _prop_rows(c q^(i+1)) for one block of C positions."""
    bsz, dim, n = h_in.shape
    c = w_prop.shape[-1]
    nb = -(-length // c)
    starts = torch.arange(nb, device=h_in.device, dtype=logq.real.dtype) * c
    to_block = power(logq.unsqueeze(1), starts.unsqueeze(-1))               # [D, nb, N]: q^(C b)
    entering = h_in.permute(1, 0, 2).unsqueeze(2) * to_block.unsqueeze(1)    # [D, B, nb, N]
    out = torch.bmm(_real_state(entering.reshape(dim, bsz * nb, n)), w_prop).view(dim, bsz, nb * c)[..., :length]
    out = _relayout(out, (1, 2, 0))
    if resets is not None:
        out = out * (resets.cumsum(1) == 0).unsqueeze(-1).to(out.dtype)
    return out


def incoming_contribution(h_in: Tensor, c: Tensor, logq: Tensor, length: int, resets: Optional[Tensor] = None,
                          block: int = 128) -> Tensor:
    """[B, L, D]: what an incoming state h_in [B, D, N] adds to the EMA output (positions before the first reset)."""
    w_prop = _prop_rows(c.unsqueeze(-1) * _powers(logq, min(block, length) + 1)[..., 1:])
    return _incoming_contribution(logq, w_prop, h_in, length, resets)


def causal_ema_blocked(u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
                       h_in: Optional[Tensor] = None, block: int = 128,
                       on_state: Optional[Callable[[Tensor], None]] = None) -> tuple[Tensor, Tensor]:
    """Untruncated EMA: u [B, L, D], a/c/logq [D, N] (one real dtype; or c, logq complex and a real or complex: the
    complex EMA, out = Re(...)), resets [B, L] bool, h_in [B, D, N] -> (out [B, L, D], state [B, D, N], complex for
    a complex EMA). `on_state(local state)`: see _causal_ema (only without h_in)."""
    length = u.shape[1]
    kern = _make_block_kernel(a, c, logq, min(block, length), with_fine=resets is not None)
    out, state = _causal_ema(u, kern, resets, on_state)
    if h_in is not None:
        out = out + _incoming_contribution(logq, kern.w_prop, h_in, length, resets)
        state = carry(state, crossing_decay(logq, u.shape[0], length, resets), None, h_in)
    return out, state
