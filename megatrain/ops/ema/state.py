"""The EMA state recurrence, written once: how the state crosses from piece to piece of a sequence.

    from megatrain.ops.ema.state import DIRECTIONS, carry, crossing_decay, cut, fold, prefix, traversal, inclusive_scan
    h_out = carry(local, decay, keep, h)        # one piece: local + decay * cut(h, keep)       [B, D, N]
    local, decay = fold(locals_, decays, keeps)  # K pieces [K, B, D, N] -> the one piece they make up
    h_in = prefix(locals_, decays, keeps, h0)    # [K, B, D, N]: the state entering every piece
    locals_, decays, keeps = traversal(direction, locals_, decays, edges)   # edges [K+1, B] -> that order
    decay = crossing_decay(logq, batch, length, resets)   # [B, D, N]: a piece's decay
    qn = power(logq, n)                          # q^n (a complex q's angle reduced in float64: see power)
    items = inclusive_scan((a, b), combine)      # the log-depth scan itself, for any associative combine
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_ema_state.py

Why it is exact (the argument behind sequence parallelism, segments and the blocked scan). MEGA's EMA
h_t = a u_t + q keep_t h_{t-1} is linear in the state h that enters a piece of L positions, so scanning the piece
from zero state gives everything: the state at its far edge is `local + decay * h` (decay = q^L, 0 for a row whose
piece holds a document start after its first position: crossing_decay), and the output gains the closed form
sum_n c q^(t+1) h before the first reset (ops.ema.incoming_contribution). A document that starts exactly at a
piece's first position is invisible to the piece itself (its resets see changes inside it only), so the hand-over
cuts the state there. `keep` is that one fact, one convention everywhere: a bool tensor, True where the state
crosses the edge into a piece, False where a document starts exactly at that edge; [B] for one edge, [K, B] for K
pieces (keeps[k] = the edge entering piece k), None = True for every row.

Pieces compose like affine maps: (l2, d2) after (l1, d1) = (l2 + d2 l1, d2 d1), with each keep folded into its
piece's decay. That operation is associative, so K pieces fold into one piece (`fold`: what a slice of segments
reports to the SP exchange, exactly what the unsegmented slice reports) and the state entering every piece is an
exclusive scan (`prefix`), computed in ceil(log2 K) rounds (Hillis-Steele). Every path sums the same terms grouped
differently, so SP = one rank and segmented = unsegmented up to float rounding; autograd gives the backward (the
transposed scan), so no adjoint is written by hand. Right to left (a bidirectional EMA's second direction) is the
same recurrence over the pieces in reversed order. Users: ops/ema/torch_blocked.py (blocks inside one scan),
model/ema.py (adding a boundary's or a decoding step's incoming state), model/segments.py (segments inside a
layer), parallel/sequence.py (SP slices: all-gather every slice's (local, decay), prefix, take this rank's entry).
Any float or complex dtype; the math runs in the inputs' dtype (the EMA hands it fp32, or fp64 in tests; Megalodon's
complex EMA hands complex64 / complex128 states: ops/cema). The scan itself (`inclusive_scan`) takes any associative
combine: the timestep norm's running statistics (ops/tsn) use it with Chan's merge.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

# The directions a state travels: "forward" = left to right, "backward" = right to left (bidirectional EMA).
DIRECTIONS = ("forward", "backward")


def cut(h: Optional[Tensor], keep: Optional[Tensor]) -> Optional[Tensor]:
    """h crossing edge(s) `keep` (keep's dims are h's leading dims): zero in the rows whose document starts there."""
    if h is None or keep is None:
        return h
    return h * keep.reshape(keep.shape + (1,) * (h.dim() - keep.dim())).to(h.dtype)


def carry(local: Tensor, decay: Tensor, keep: Optional[Tensor], h: Optional[Tensor]) -> Tensor:
    """The state after a piece that produces `local` from zero state and enters with `h` (None = zero)."""
    return local if h is None else local + decay * cut(h, keep)


def inclusive_scan(items: tuple[Tensor, ...], combine: Callable) -> tuple[Tensor, ...]:
    """The log-depth (Hillis-Steele) inclusive scan along dim 0, written once for every piece summary: `items`
    are K pieces as tensors [K, ...]; `combine(earlier, later)` (tuples of tensors, batched) is associative.
    Returns, per piece k, the combination of pieces 0..k, in ceil(log2 K) rounds of batched combines."""
    step, k = 1, items[0].shape[0]
    while step < k:
        merged = combine(tuple(t[:-step] for t in items), tuple(t[step:] for t in items))
        items = tuple(torch.cat([t[:step], m]) for t, m in zip(items, merged))
        step *= 2
    return items


def _affine(earlier: tuple[Tensor, Tensor], later: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(l2, d2) after (l1, d1) = (l2 + d2 l1, d2 d1): two pieces of the EMA recurrence as one."""
    return later[0] + later[1] * earlier[0], later[1] * earlier[1]


def _inclusive(local: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
    """H_k = local_k + decay_k H_{k-1} along dim 0, and prod_{j<=k} decay_j."""
    return inclusive_scan((local, decay.expand_as(local)), _affine)


def fold(local: Tensor, decay: Tensor, keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """K pieces [K, ...] in traversal order -> (local, decay) of the single piece they make up (keep[0] included,
    so the result crosses its own entering edge uncut)."""
    ends, decays = _inclusive(local, cut(decay.expand_as(local), keep))
    return ends[-1], decays[-1]


def prefix(local: Tensor, decay: Tensor, keep: Optional[Tensor] = None, h0: Optional[Tensor] = None) -> Tensor:
    """[K, ...]: the state entering each of K pieces (traversal order); piece 0's is cut(h0, keep[0])."""
    decay = cut(decay.expand_as(local), keep)
    first = torch.zeros_like(local[:1]) if h0 is None else h0.unsqueeze(0).to(local.dtype)
    # the state entering piece k is the state after piece k-1, cut at edge k: shift by one, h0 in front
    ends, _ = _inclusive(torch.cat([first, local[:-1]]), torch.cat([torch.zeros_like(decay[:1]), decay[:-1]]))
    return cut(ends, keep)


def traversal(direction: str, local: Tensor, decay: Tensor, edges: Optional[Tensor]):
    """(local, decay, keep) of K pieces [K, ...] (left-to-right order) in `direction`'s traversal order; edges
    [K+1, B] (edge e lies between pieces e-1 and e: it enters piece e going forward, piece e-1 going backward)."""
    if direction == "forward":
        return local, decay, None if edges is None else edges[:-1]
    return local.flip(0), decay.flip(0), None if edges is None else edges[1:].flip(0)


# exponents up to this keep a complex power's angle in fp32 (error <= n |Im logq| eps ~ 1e-4 rad at most); beyond
# it the angle is formed in float64 (see power)
_FP32_ANGLE_STEPS = 256


def power(logq: Tensor, n) -> Tensor:
    """q^n = exp(n logq) for n a number or a tensor broadcasting with logq. For a complex logq (Megalodon's rotating
    decay) this is polar(exp(n Re logq), n Im logq) (CPU's complex exp is ~10x slower than cos/sin), and for n
    beyond _FP32_ANGLE_STEPS the angle is formed in float64 and reduced mod 2 pi first: in fp32 its error would
    grow as n |Im logq| eps (~3e-3 rad at n = 16K), a wrong rotation of every state handed across a long piece (an
    SP slice, a segment) that the blocked scan, which multiplies short powers, does not make."""
    if not logq.is_complex():
        return torch.exp(logq * n)
    dtype = logq.real.dtype
    steps = n.to(dtype) if isinstance(n, Tensor) else n
    largest = float(n.abs().max()) if isinstance(n, Tensor) else abs(float(n))
    if largest <= _FP32_ANGLE_STEPS or dtype == torch.float64:
        angle = logq.imag * steps
    else:
        wide = n.to(torch.float64) if isinstance(n, Tensor) else float(n)
        angle = torch.remainder(logq.imag.to(torch.float64) * wide, 2 * math.pi).to(dtype)
    return torch.polar(torch.exp(logq.real * steps), angle)


def crossing_decay(logq: Tensor, batch: int, length: int, resets: Optional[Tensor] = None) -> Tensor:
    """[B, D, N] factor an incoming state is multiplied by across `length` positions (0 if a document starts
    inside: resets [B, L] bool, True where a document starts)."""
    decay = power(logq, length).unsqueeze(0).expand(batch, -1, -1)
    if resets is not None:
        decay = cut(decay, ~resets.any(1))
    return decay
