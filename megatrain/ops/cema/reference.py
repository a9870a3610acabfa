"""The complex-EMA oracle: Megalodon's CEMA as the plain sequential complex recurrence over t, on plain tensors.

    from megatrain.ops.cema.reference import cema_scan_ref
    out, state = cema_scan_ref(u, p, c, logq, resets=None, h_in=None)

Per channel d and EMA dimension n (Ma et al. 2024, arXiv 2404.08801, as the reference code computes it: the
decay is rotated, the input is not), with q = exp(logq) complex:
    h_t = p * u_t + q * keep_t * h_{t-1}       keep_t = 0 where resets[:, t] (a document starts at t), h_{-1} = h_in
    out_t = Re(sum_n c * h_t)
u real [B, L, D] (already masked); p real [D, N] (the input weight sigma(alpha)); c, logq complex [D, N] (c = gamma *
sqrt(1/N); logq = log(1 - sigma(alpha) sigma(delta)) + i theta_n); h_in complex [B, D, N]. The math runs in
complex128 whatever the inputs (the oracle of the tests); out is float64, state complex128. Slow (a Python loop over
t): tests only. (The model's coefficients from its parameters: megatrain/model/megalodon/cema.py.)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def cema_scan_ref(u: Tensor, p: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
                  h_in: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """-> (out [B, L, D] float64, state [B, D, N] complex128 = h after the last position)."""
    bsz, length, dim = u.shape
    x = u.to(torch.float64)
    p, c, q = p.to(torch.float64), c.to(torch.complex128), torch.exp(logq.to(torch.complex128))
    if resets is None:
        resets = torch.zeros(bsz, length, dtype=torch.bool, device=u.device)
    keep = (~resets).to(torch.float64)[:, :, None, None]
    h = (torch.zeros(bsz, dim, p.shape[1], dtype=torch.complex128, device=u.device) if h_in is None
         else h_in.to(torch.complex128))
    outs = []
    for t in range(length):
        h = p * x[:, t, :, None] + q * keep[:, t] * h
        outs.append((c * h).sum(-1).real)
    return torch.stack(outs, dim=1), h
