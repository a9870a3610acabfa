"""The timestep-norm oracle: Megalodon's TimestepNorm from its definition, cumulative statistics per timestep in fp64.

    from megatrain.ops.tsn.reference import timestep_norm_ref
    y, (count, mean, var) = timestep_norm_ref(x, gamma, beta, num_groups, mask=None, resets=None, state=None)

Per row b, group g (K = D / G consecutive features) and position t, over the real positions s <= t of t's document
(mask[b, s] = 1; a document starts where resets[b, s]) plus, before the row's first document start, an incoming
state (n0, mu0, var0) counting n0 earlier positions:
    n_t   = n0 + #{s}                      mu_t = (n0 mu0 + sum_s m_s) / n_t
    var_t = (n0 (var0 + mu0^2) + sum_s (v_s + m_s^2)) / n_t - mu_t^2     (m_s, v_s: mean, biased variance of the
                                                                           group's K features at s)
    y_t   = (x_t - mu_t) / sqrt(var_t + eps) * gamma + beta,   0 at padded positions (mask 0)
i.e. the mean and biased variance of every value of the group seen so far. The returned state is (n, mu, var) after
the last position; n = 0 is "no statistics" (mean 0, variance 1). gamma is the effective weight (the module's
"+1" reparameterisation is applied by the module: megatrain/model/megalodon/norms.py). Everything runs in float64
with plain prefix sums: exact enough to be the oracle at any tested length (fp32 prefix sums of the same formula
drift, which is why the fast paths merge statistics instead: ops/tsn/stats.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def doc_cumsum(v: Tensor, resets: Optional[Tensor]) -> Tensor:
    """Prefix sums along dim 1 that restart where a document starts: v [B, L, ...], resets [B, L] bool."""
    total = v.cumsum(1)
    if resets is None:
        return total
    length = v.shape[1]
    idx = torch.arange(length, device=v.device)
    start = torch.cummax(torch.where(resets, idx, torch.zeros_like(idx)), dim=1).values      # the document's start
    before = F.pad(total, (0,) * (2 * (v.dim() - 2)) + (1, 0))                               # total[t - 1]
    index = start.reshape(start.shape + (1,) * (v.dim() - 2)).expand_as(v)
    return total - before.gather(1, index)


def timestep_norm_ref(x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, mask: Optional[Tensor] = None,
                      resets: Optional[Tensor] = None, state=None, eps: float = 1e-5):
    """x [B, L, D]; gamma, beta [D]; mask [B, L] (1 = real); resets [B, L] bool; state (count [B], mean [B, G],
    var [B, G]) -> (y [B, L, D] float64, (count [B], mean [B, G], var [B, G]) float64)."""
    bsz, length, dim = x.shape
    g = num_groups
    xg = x.to(torch.float64).reshape(bsz, length, g, dim // g)
    m = xg.mean(-1)
    e2 = xg.square().mean(-1)                                   # v + m^2: the mean square of the K values
    w = torch.ones(bsz, length, dtype=torch.float64) if mask is None else mask.to(torch.float64)
    w = w.to(x.device).unsqueeze(-1)
    n = doc_cumsum(w.expand(-1, -1, g), resets)
    s1 = doc_cumsum(w * m, resets)
    s2 = doc_cumsum(w * e2, resets)
    if state is not None:
        n0, mu0, var0 = (t.to(torch.float64) for t in state)
        first = torch.ones(bsz, length, dtype=torch.bool, device=x.device) if resets is None \
            else resets.cumsum(1) == 0                          # still in the row's first document
        reach = first.to(torch.float64).unsqueeze(-1)
        n0 = n0.reshape(bsz, 1, 1)
        n = n + reach * n0
        s1 = s1 + reach * n0 * mu0.unsqueeze(1)
        s2 = s2 + reach * n0 * (var0 + mu0 * mu0).unsqueeze(1)
    mu = s1 / n.clamp(min=1)
    var = s2 / n.clamp(min=1) - mu * mu
    empty = n == 0
    mu = torch.where(empty, torch.zeros_like(mu), mu)
    var = torch.where(empty, torch.ones_like(var), var)
    y = (xg - mu.unsqueeze(-1)) * torch.rsqrt(var + eps).unsqueeze(-1)
    y = y.reshape(bsz, length, dim) * gamma.to(torch.float64) + beta.to(torch.float64)
    y = y * w
    return y, (n[:, -1, 0], mu[:, -1], var[:, -1])
