"""Plain-tensor oracle for MEGA's per-chunk attention (tests compare every path against it).

    out = chunk_attention_ref(q, k, v, bias, valid, activation="softmax", scale=Z**-0.5)

q [B, n, Tq, Z], k [B, n, Tk, Z], v [B, n, Tk, E] (n = chunks, each attends only within itself), bias [Tq, Tk]
additive relative-position bias, valid [B, n, Tq, Tk] bool ("query i may look at key j") or None -> [B, n, Tq, E].

- softmax: softmax(scale * q.k + bias) over the valid keys; a query with no valid key gets 0 (not NaN).
- laplace / relu2: act(q.k / (number of valid keys of the query) + bias), zero on invalid keys (no `scale`).
Written for clarity, not speed: it materialises every [Tq, Tk] score, probability and mask tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatrain.ops.attention.activations import ATTENTION_ACTIVATIONS


def chunk_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        valid: Optional[torch.Tensor], activation: str = "softmax",
                        scale: Optional[float] = None) -> torch.Tensor:
    if valid is None:
        valid = torch.ones(q.shape[:-1] + (k.shape[-2],), dtype=torch.bool, device=q.device)
    valid = valid.expand(q.shape[:-1] + (k.shape[-2],))
    dots = q @ k.transpose(-1, -2)
    if activation == "softmax":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (dots * scale + bias).masked_fill(~valid, float("-inf"))
        # a row without valid keys: exp(-inf - (-inf)) is NaN; give it max 0 so every entry is exp(-inf) = 0
        m = scores.amax(-1, keepdim=True).detach().clamp(min=torch.finfo(scores.dtype).min)
        e = torch.exp(scores - m)
        probs = e / e.sum(-1, keepdim=True).clamp(min=torch.finfo(e.dtype).tiny)
    else:
        count = valid.sum(-1, keepdim=True).clamp(min=1).to(dots.dtype)
        probs = ATTENTION_ACTIVATIONS[activation](dots / count + bias) * valid.to(dots.dtype)
    return probs @ v
