"""Test oracle: a tiny damped EMA written as the plain recurrence, with the contract's boundary protocol.

    y = silu(ema_fwd(x) [+ ema_bwd(x)] + omega * x),   h_t = q * h_{t-1} + p * beta * x_t,  ema_t = sum_n gamma * h_t
State resets where doc_ids change. `full(...)` runs the unsplit window; `sliced(...)` runs one SP slice with zero
incoming state and asks `boundary(local_state, decay, direction)` for the incoming state, exactly as
docs/CONTRACTS.md ("EMA boundary exchange") asks the model to. Slow (a Python loop over L): keep L small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_params(D: int, N: int, bidirectional: bool, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    K = 2 * D if bidirectional else D
    params = {
        "delta": torch.randn(K, N, generator=g, dtype=dtype),
        "alpha": torch.randn(K, N, generator=g, dtype=dtype),
        "beta": torch.randn(K, N, generator=g, dtype=dtype),
        "gamma": torch.randn(K, N, generator=g, dtype=dtype),
        "omega": torch.randn(D, generator=g, dtype=dtype),
    }
    for p in params.values():
        p.requires_grad_(True)
    return params


def _coeffs(params: dict, half: slice):
    p = torch.sigmoid(params["delta"][half])
    q = 1.0 - p * torch.sigmoid(params["alpha"][half])
    return p * params["beta"][half], q, params["gamma"][half]        # [D, N] each


def _scan(x, doc_ids, pb, q, gamma):
    """Left-to-right recurrence from zero state: (ema [B, L, D], last state [B, D, N])."""
    B, L, D = x.shape
    h = x.new_zeros(B, D, pb.shape[-1])
    out = []
    for t in range(L):
        if doc_ids is not None and t > 0:
            same = (doc_ids[:, t] == doc_ids[:, t - 1]).to(x.dtype)[:, None, None]
            h = h * same
        h = q * h + pb * x[:, t, :, None]
        out.append((h * gamma).sum(-1))
    return torch.stack(out, 1), h


def _carry_in(h_in, doc_ids, q, gamma, L):
    """Contribution of an incoming state to each position: sum_n gamma q^(t+1) h_in, until the first doc change."""
    powers = q[None] ** torch.arange(1, L + 1, dtype=q.dtype)[:, None, None]                 # [L, D, N]
    contrib = torch.einsum("bdn,ldn,dn->bld", h_in, powers, gamma)
    if doc_ids is not None:
        alive = torch.cumprod((doc_ids == doc_ids[:, :1]).to(h_in.dtype), dim=1)          # [B, L]
        contrib = contrib * alive[:, :, None]
    return contrib


def _decay(q, doc_ids, B, L):
    decay = (q ** L).expand(B, *q.shape)
    if doc_ids is not None:
        one_doc = (doc_ids == doc_ids[:, :1]).all(dim=1).to(q.dtype)[:, None, None]
        decay = decay * one_doc
    return decay


def _directions(params, D, bidirectional):
    yield "forward", _coeffs(params, slice(0, D))
    if bidirectional:
        yield "backward", _coeffs(params, slice(D, 2 * D))


def full(x, params, bidirectional, doc_ids=None):
    D = x.shape[-1]
    y = x * params["omega"]
    for direction, (pb, q, gamma) in _directions(params, D, bidirectional):
        if direction == "forward":
            y = y + _scan(x, doc_ids, pb, q, gamma)[0]
        else:
            flip_doc = None if doc_ids is None else doc_ids.flip(1)
            y = y + _scan(x.flip(1), flip_doc, pb, q, gamma)[0].flip(1)
    return F.silu(y)


def sliced(x, params, bidirectional, boundary, doc_ids=None, two_phase=False):
    """`two_phase`: use `boundary.start(...)` / `handle.wait()` as the model does -- every direction's exchange is
    started before any is waited for, and they are waited for in reverse order."""
    B, L, D = x.shape
    y = x * params["omega"]
    pending = []
    for direction, (pb, q, gamma) in _directions(params, D, bidirectional):
        xs, ds = (x, doc_ids) if direction == "forward" else (x.flip(1), None if doc_ids is None else doc_ids.flip(1))
        ema, local_state = _scan(xs, ds, pb, q, gamma)
        if two_phase:
            pending.append((direction, ema, ds, q, gamma, boundary.start(local_state, _decay(q, ds, B, L), direction)))
            continue
        h_in = boundary(local_state, _decay(q, ds, B, L), direction)
        ema = ema + _carry_in(h_in, ds, q, gamma, L)
        y = y + (ema if direction == "forward" else ema.flip(1))
    for direction, ema, ds, q, gamma, handle in reversed(pending):
        ema = ema + _carry_in(handle.wait(), ds, q, gamma, L)
        y = y + (ema if direction == "forward" else ema.flip(1))
    return F.silu(y)
