"""Running group statistics (count, mean, variance): Chan's merge, the prior, and pieces of a sequence.

    from megatrain.ops.tsn.stats import PRIOR, merge, cut, scan_pieces, to_additive, from_additive
    n, mu, var = merge((n1, mu1, var1), (n2, mu2, var2))     # the statistics of both sets (Chan et al. 1979)
    n, mu, var = cut((n, mu, var), keep)                       # the prior (0, 0, 1) where keep is False
    before, through = scan_pieces(pieces, keeps)               # K pieces [K, ...]: statistics before / through each
    local, decay = to_additive(stats, crosses)                 # for the state recurrence of ops/ema/state.py
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_tsn_ops.py

A group's statistics over a set of positions: n positions (each with the group's K features), the mean and the
biased variance of their n*K values. Every position holds the same number of values, so positions weigh equally and
two sets merge exactly (Chan's parallel update, what the reference code's Welford struct does):
    n = n1 + n2,  f = n2 / n,  d = mu2 - mu1,  mu = mu1 + f d,  var = (1 - f) var1 + f var2 + (1 - f) f d^2
n = 0 is "no statistics": mean 0, variance 1 (the reference's prior), and merging with it changes nothing. A document
start cuts the statistics back to that prior (`cut`). The merge is associative, so the statistics before every
piece (blocks, chunks) come from state.py's one log-depth scan (`inclusive_scan`) with this combine; merging is
stable where prefix sums of x and x^2 are not (fp32 sums drift by ~L eps mean^2 / var: tests/ops/test_tsn_ops.py).

Across sequence-parallel ranks and segments the statistics travel as pieces of the EMA's state recurrence
(ops/ema/state.py): in additive form (n, n mu, n (var + mu^2)) in float64 every piece is `local + decay * h` with
decay 1 (0 when a document starts inside the piece), so the one boundary exchange of parallel/sequence.py carries
them unchanged. float64 keeps the additive form exact to ~1e-12 relative at a few hundred pieces.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatrain.ops.ema.state import inclusive_scan

Stats = tuple[Tensor, Tensor, Tensor]       # (count, mean, var), broadcastable to one shape
PRIOR_MEAN, PRIOR_VAR = 0.0, 1.0


def merge(first: Stats, second: Stats) -> Stats:
    """Statistics of the union of two disjoint sets of positions (Chan's merge; n = 0 is neutral)."""
    n1, mu1, var1 = first
    n2, mu2, var2 = second
    n = n1 + n2
    f = n2 / n.clamp(min=1)           # counts are integers: n = 0 only when n2 = 0, and then f = 0
    d = mu2 - mu1
    return n, mu1 + f * d, (1 - f) * var1 + f * var2 + ((1 - f) * d) * (f * d)


def cut(stats: Stats, keep: Optional[Tensor]) -> Stats:
    """The statistics where `keep` (broadcastable, bool or 0/1) holds, else the prior (0, 0, 1)."""
    if keep is None:
        return stats
    k = keep.to(stats[1].dtype)
    return stats[0] * k, stats[1] * k, stats[2] * k + PRIOR_VAR * (1 - k)


def prior(shape, dtype, device) -> Stats:
    return (torch.zeros(shape, dtype=dtype, device=device), torch.full(shape, PRIOR_MEAN, dtype=dtype, device=device),
            torch.full(shape, PRIOR_VAR, dtype=dtype, device=device))


def _combine(earlier, later):
    """Piece after piece: (stats, keep) with keep = no document start inside (the earlier statistics carry over)."""
    n, mu, var = merge(cut(earlier[:3], later[3]), later[:3])
    return n, mu, var, earlier[3] * later[3]


def scan_pieces(pieces: Stats, keeps: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """K pieces in order, [K, ...] each (statistics of every piece's last document; keeps = 1 where the piece
    has no document start, so earlier statistics carry across it) -> (before, through): (n, mu, var, keep) of
    pieces 0..k-1 and 0..k, [K, ...] each (before[0] = the prior, keep 1). keep = no start in those pieces: where
    it holds, an incoming state merges in front (`merge(h0, ...)`), else it is cut."""
    keeps = keeps.to(pieces[1].dtype).expand_as(pieces[1])
    through = inclusive_scan((*pieces, keeps), _combine)
    first = (*prior(pieces[1].shape[1:], pieces[1].dtype, pieces[1].device), torch.ones_like(keeps[0]))
    before = tuple(torch.cat([f.unsqueeze(0), t[:-1]]) for f, t in zip(first, through))
    return before, through


def enter(h0: Optional[Stats], piece: tuple[Tensor, ...]) -> Stats:
    """The statistics after an incoming state h0 (None = the prior) then `piece` = (n, mu, var, keep)."""
    if h0 is None:
        return piece[:3]
    return merge(cut(h0, piece[3]), piece[:3])


def to_additive(stats: Stats, crosses: Tensor) -> tuple[Tensor, Tensor]:
    """(count, mean, var) [..., G] of a piece and crosses [...] (no document start inside) -> (local, decay), each
    [..., G, 3] float64: the piece in the state recurrence's form (see the module docstring)."""
    n, mu, var = (t.to(torch.float64) for t in stats)
    n = n.expand_as(mu)
    local = torch.stack([n, n * mu, n * (var + mu * mu)], dim=-1)
    decay = crosses.to(torch.float64).reshape(crosses.shape + (1, 1)).expand_as(local)
    return local, decay


def from_additive(h: Tensor) -> Stats:
    """[..., G, 3] additive float64 -> (count [...], mean [..., G], var [..., G]) float64 (the prior where n = 0)."""
    n = h[..., 0]
    inv = 1.0 / n.clamp(min=1)
    mu = h[..., 1] * inv
    var = h[..., 2] * inv - mu * mu
    empty = n < 0.5
    mu = torch.where(empty, torch.full_like(mu, PRIOR_MEAN), mu)
    var = torch.where(empty, torch.full_like(var, PRIOR_VAR), var.clamp(min=0))
    return n[..., 0].round(), mu, var
