"""The PyTorch path of MEGA's per-chunk attention (CPU default; the only path for laplace/relu2/attention dropout).

    valid = dense_valid(b, n, c, c, device, causal=True, key_mask=km, doc_ids=d)   # [B, n, C, C] bool or None
    out = attend(q, k, v, valid, bias, activation="softmax", scale=Z**-0.5, dropout_p=0.0, may_be_empty=False)

Shapes as in megatrain.ops.attention.reference. Softmax where every query has a valid key goes to PyTorch's fused
attention (SDPA; the mask folds into the additive bias). Otherwise the scores are materialised; with padding
(`may_be_empty`) a query without any valid key gets zero attention instead of softmax's NaN. laplace/relu2 divide
by the number of valid keys of the query.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatrain.ops.attention.activations import ATTENTION_ACTIVATIONS


def dense_valid(b: int, n: int, tq: int, tk: int, device, causal: bool = False,
                key_mask: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """[B, n, Tq, Tk] bool "query i may look at key j" (None: all valid). key_mask [B, n, Tk] (real keys);
    causal and doc_ids [B, n, T] (a query sees keys of its own document only) need Tq == Tk."""
    valid = None
    if causal:
        valid = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()[None, None]
    if key_mask is not None:
        key_ok = key_mask.reshape(b, n, 1, tk).bool()
        valid = key_ok if valid is None else valid & key_ok
    if doc_ids is not None:
        d = doc_ids.reshape(b, n, tq)
        same = d[..., :, None] == d[..., None, :]
        valid = same if valid is None else valid & same
    return None if valid is None else valid.expand(b, n, tq, tk)


def attend(q, k, v, valid: Optional[torch.Tensor], bias: torch.Tensor, *, activation: str, scale: float,
           dropout_p: float, may_be_empty: bool) -> torch.Tensor:
    """q [B, n, Tq, Z], k [B, n, Tk, Z], v [B, n, Tk, E], valid [B, n, Tq, Tk] bool or None -> [B, n, Tq, E].

    may_be_empty: some query may have no valid key (padding); otherwise its own key is always valid.
    dropout_p: dropout on the attention probabilities (0 outside training)."""
    if activation == "softmax" and not may_be_empty:
        # every query has a valid key: PyTorch's fused attention (no [.., Tq, Tk] probabilities kept for
        # backward; flash / memory-efficient kernels). The mask folds into the additive bias.
        attn_bias = bias if valid is None else bias.masked_fill(~valid, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=dropout_p,
                                              scale=scale)
    if activation == "softmax":
        scores = torch.matmul(q * scale, k.transpose(-1, -2)) + bias
        if valid is not None:
            invalid = ~valid
            scores = scores.masked_fill(invalid, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if valid is not None and may_be_empty:
            # rows without any valid key are all-NaN after softmax: make them zero. (Their gradient is zero
            # too: every entry of such a row was masked above, and masked_fill's backward zeroes it.)
            weights = weights.masked_fill(invalid, 0.0)
    else:
        if valid is None:
            lengths = k.shape[-2]
        else:
            lengths = valid.sum(-1, keepdim=True).clamp(min=1).to(q.dtype)
        weights = ATTENTION_ACTIVATIONS[activation](torch.matmul(q, k.transpose(-1, -2)) / lengths + bias)
        if valid is not None:
            weights = weights * valid.to(weights.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=True)
    return torch.matmul(weights, v)
