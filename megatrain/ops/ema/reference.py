"""The EMA oracle: MEGA's damped EMA as the plain sequential recurrence over t, on plain tensors.

    from megatrain.ops.ema.reference import ema_scan_ref
    out, state = ema_scan_ref(u, a, c, logq, resets=None, h_in=None, truncation=None)

Per channel d and EMA dimension n (q = exp(logq)):
    h_t = a * u_t + q * keep_t * h_{t-1}       keep_t = 0 where resets[:, t] (a document starts at t), h_{-1} = h_in
    out_t = sum_n c * h_t
With `truncation` T the output only sees the last T lags inside the document (an explicit windowed kernel sum);
`state` is always the untruncated h after the last position. Slow (Python loops over t): tests only, small L.
Any float dtype; fp64 inputs give an fp64 oracle.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def ema_scan_ref(u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
                 h_in: Optional[Tensor] = None, truncation: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """u [B, L, D] (already masked); a, c, logq [D, N]; resets [B, L] bool; h_in [B, D, N] ->
    (out [B, L, D], state [B, D, N]), all in u's dtype."""
    if truncation is not None and h_in is not None:
        raise ValueError("ema_scan_ref: truncation has no finite state; h_in is unsupported with truncation")
    bsz, length, dim = u.shape
    dtype = u.dtype
    a, c, q = a.to(dtype), c.to(dtype), torch.exp(logq.to(dtype))
    if resets is None:
        resets = torch.zeros(bsz, length, dtype=torch.bool, device=u.device)
    keep = (~resets).to(dtype)[:, :, None, None]                                  # [B, L, 1, 1]
    h = torch.zeros(bsz, dim, a.shape[1], dtype=dtype, device=u.device) if h_in is None else h_in.to(dtype)
    outs = []
    for t in range(length):
        h = a * u[:, t, :, None] + q * keep[:, t] * h
        if truncation is None:
            outs.append((c * h).sum(-1))
            continue
        # out_t = sum over lags k < T whose source t-k is in t's document (no reset in t-k+1 .. t)
        acc = torch.zeros(bsz, dim, dtype=dtype, device=u.device)
        linked = torch.ones(bsz, 1, 1, dtype=dtype, device=u.device)
        for k in range(min(truncation, t + 1)):
            if k > 0:
                linked = linked * keep[:, t - k + 1]
            acc = acc + (linked * a * c * q ** k * u[:, t - k, :, None]).sum(-1)
        outs.append(acc)
    return torch.stack(outs, dim=1), h
