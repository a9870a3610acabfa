"""MEGA's per-chunk single-head attention: the one entry point the model calls.

    from megatrain.ops.attention import chunk_attention
    out = chunk_attention(q, k, v, bias, scale=Z**-0.5, causal=True, key_mask=km, doc_ids=d,
                          activation="softmax", dropout_p=0.0, backend=config.kernel_backend)

q [B, n, Tq, Z], k [B, n, Tk, Z], v [B, n, Tk, E] (n chunks, each attending within itself), bias [Tq, Tk] the
additive relative-position bias (gradients flow to whatever it was built from). Mask, by parts: causal
(key j <= query i), key_mask [B, n, Tk] (True = real key), doc_ids [B, n, T] (same document; Tq == Tk); or one
dense `valid` [B, n, Tq, Tk] bool (decoding), not both. A query with no valid key gets 0.

Paths (megatrain.ops.attention.*):
- reference.chunk_attention_ref: the plain-tensor oracle of the tests.
- torch_path.attend: PyTorch (SDPA where no row can be empty, materialised scores otherwise).
- flex_path.flex_chunk_attention: FlexAttention, compiled to Triton on CUDA -- what backend "triton" runs.
`backend` is a MegaConfig.kernel_backend value ("auto" | "torch" | "triton"), resolved here once by
megatrain.ops.backend.resolve_backend (a one-line ValueError where "triton" cannot run).
Backend "triton" covers softmax attention without dropout on the attention probabilities. laplace, relu2 and
attention-probability dropout > 0 have one implementation, the PyTorch one, whatever the backend (FlexAttention
has no dropout; the shipped configs set attention_probs_dropout_prob 0).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatrain.ops.attention.flex_path import flex_chunk_attention
from megatrain.ops.backend import resolve_backend
from megatrain.ops.attention.reference import chunk_attention_ref
from megatrain.ops.attention.torch_path import attend, dense_valid

__all__ = ["chunk_attention", "chunk_attention_ref", "kernel_covers"]


def kernel_covers(activation: str, dropout_p: float) -> bool:
    """Whether backend "triton" runs the FlexAttention kernel for this attention (else the PyTorch path)."""
    return activation == "softmax" and dropout_p == 0.0


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, scale: float,
                    causal: bool = False, key_mask: Optional[torch.Tensor] = None,
                    doc_ids: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
                    activation: str = "softmax", dropout_p: float = 0.0, backend: str = "torch") -> torch.Tensor:
    """-> [B, n, Tq, E]. dropout_p applies to the attention probabilities (pass 0 outside training)."""
    if valid is not None and (causal or key_mask is not None or doc_ids is not None):
        raise ValueError("chunk_attention: give the mask either by parts (causal, key_mask, doc_ids) or as valid")
    if resolve_backend(backend, q) == "triton" and kernel_covers(activation, dropout_p):
        return flex_chunk_attention(q, k, v, bias, scale=scale, causal=causal, key_mask=key_mask,
                                    doc_ids=doc_ids, valid=valid)
    b, n, tq, _ = q.shape
    if valid is None:
        if q.shape[-2] != k.shape[-2] and (causal or doc_ids is not None):
            raise ValueError("chunk_attention: causal/doc_ids masks need Tq == Tk; pass valid instead")
        valid = dense_valid(b, n, tq, k.shape[-2], q.device, causal, key_mask, doc_ids)
        may_be_empty = key_mask is not None  # otherwise a query always sees its own key
    else:
        may_be_empty = True
    return attend(q, k, v, valid, bias, activation=activation, scale=scale, dropout_p=dropout_p,
                  may_be_empty=may_be_empty)
