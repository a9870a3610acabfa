"""Timestep normalization in blocked PyTorch: stable cumulative statistics, linear memory, autograd backward.

    from megatrain.ops.tsn.torch_blocked import timestep_norm_blocked
    y, state = timestep_norm_blocked(x, gamma, beta, num_groups, mask, resets, state, eps, block, on_summary)
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_tsn_ops.py

Algorithm: the group moments of every position ([B, L, G]: mean m, biased variance v; two-pass over the K features),
then the sequence in blocks of C positions. Inside a block, prefix sums of the *shifted* moments (m - k, v +
(m - k)^2 with k = the block's first mean) give every position's statistics since the block start (or since its
document start inside the block) -- C terms in fp32, with the shift the sums stay small and cancellation-free.
Between blocks only the statistics travel: Chan's merge (ops/tsn/stats.py) over the blocks' summaries with
state.py's log-depth scan, then every position merges the statistics entering its block in front of its own.
Nothing accumulates over more than one block in fp32, so the result holds at any length (64K+ in the tests) where a
plain fp32 prefix sum drifts. Working memory: [B, L, G] statistics (G << D) besides x and y.

`on_summary(count [B], mean [B, G], var [B, G], crosses [B])`: called with the statistics of the whole input from
the prior (its last document's; crosses = no document start inside) before anything needs the incoming state; it
returns a handle whose wait() gives the incoming state (count, mean, var) -- the sequence-parallel exchange runs
while the per-block prefix sums are formed (megatrain/model/megalodon/ use it). Without it, `state` is the incoming
state (None = the prior).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatrain.ops.tsn.reference import doc_cumsum
from megatrain.ops.tsn.stats import cut, enter, merge, scan_pieces


def group_moments(x: Tensor, num_groups: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) [B, L, G] of every group's K features, in `dtype` (two-pass: stable)."""
    bsz, length, dim = x.shape
    xg = x.to(dtype).reshape(bsz, length, num_groups, dim // num_groups)
    m = xg.mean(-1)
    return m, (xg - m.unsqueeze(-1)).square().mean(-1)


def timestep_norm_blocked(x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, mask: Optional[Tensor] = None,
                          resets: Optional[Tensor] = None, state=None, eps: float = 1e-5, block: int = 256,
                          on_summary: Optional[Callable] = None, dtype: torch.dtype = torch.float32):
    """x [B, L, D] -> (y [B, L, D] in x's dtype, (count [B] int64, mean [B, G], var [B, G]) in `dtype`)."""
    bsz, length, dim = x.shape
    g = num_groups
    m, v = group_moments(x, g, dtype)
    c = min(block, length)
    nb = -(-length // c)
    pad = nb * c - length
    w = torch.ones(bsz, length, dtype=dtype, device=x.device) if mask is None else mask.to(dtype)
    wb = F.pad(w, (0, pad)).view(bsz * nb, c, 1)
    mb = F.pad(m, (0, 0, 0, pad)).view(bsz * nb, c, g)
    vb = F.pad(v, (0, 0, 0, pad)).view(bsz * nb, c, g)
    rb = None if resets is None else F.pad(resets, (0, pad), value=False).view(bsz * nb, c)
    # the shift is any value near the block's means (the statistics do not depend on it): no gradient through it
    dm = mb - mb[:, :1].detach()
    n_loc = doc_cumsum(wb.expand(-1, -1, g), rb)
    s1 = doc_cumsum(wb * dm, rb)
    s2 = doc_cumsum(wb * (vb + dm * dm), rb)
    inv = 1.0 / n_loc.clamp(min=1)
    mean_dm = s1 * inv
    local = (n_loc, mean_dm + mb[:, :1].detach(), (s2 * inv - mean_dm * mean_dm).clamp(min=0))
    # positions before the first document start of their block: the statistics entering the block reach them
    reach = None if rb is None else (rb.cumsum(1) == 0).unsqueeze(-1)
    # every block's summary (its last position; keep = no document start in the block) and the scan over blocks
    pieces = tuple(t.view(bsz, nb, c, g)[:, :, -1].transpose(0, 1) for t in local)        # [nb, B, G]
    keeps = (torch.ones(nb, bsz, 1, dtype=dtype, device=x.device) if rb is None
             else reach.view(bsz, nb, c, 1)[:, :, -1].transpose(0, 1).to(dtype))
    before, through = scan_pieces(pieces, keeps)
    if on_summary is not None:
        whole = tuple(t[-1] for t in through)
        state = on_summary(whole[0][:, 0], whole[1], whole[2], whole[3][:, 0] > 0.5).wait()
    h0 = None if state is None else (state[0].to(dtype).reshape(bsz, 1), state[1].to(dtype), state[2].to(dtype))
    entering = enter(h0, before)                                                           # [nb, B, G] each
    out = enter(h0, tuple(t[-1] for t in through))
    entering = tuple(t.transpose(0, 1).reshape(bsz * nb, 1, g) for t in entering)
    n, mu, var = merge(cut(entering, reach), local)
    rstd = torch.rsqrt(var + eps)
    mu, rstd = (t.view(bsz, nb * c, g)[:, :length] for t in (mu, rstd))
    xg = x.to(dtype).reshape(bsz, length, g, dim // g)
    y = ((xg - mu.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(bsz, length, dim) * gamma.to(dtype) + beta.to(dtype)
    y = y * w.unsqueeze(-1)
    return y.to(x.dtype), (out[0][:, 0].round().to(torch.int64), out[1], out[2])
