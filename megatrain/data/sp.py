"""Sequence-parallel slicing of packed windows.

Use:
    from megatrain.data import sp_slice
    piece = sp_slice(batch, sp_rank, sp_size)   # dict of [L] or [B, L] tensors -> same keys, last dim L / sp_size
Every tensor is cut to the contiguous block ``[sp_rank * L/P, (sp_rank + 1) * L/P)`` of its last dimension; other
values pass through unchanged. Because CLM labels are pre-shifted by the loader (labels[t] = token t+1), the last
label of slice r is the first input of slice r+1: no label exchange between SP ranks is needed.
"""
from __future__ import annotations

import torch


def _slice(t: torch.Tensor, sp_rank: int, sp_size: int, name: str) -> torch.Tensor:
    length = t.shape[-1]
    if length % sp_size:
        raise ValueError(f"sp_slice: {name} has length {length}, not divisible by sp_size={sp_size}")
    n = length // sp_size
    return t[..., sp_rank * n:(sp_rank + 1) * n]


def sp_slice(sample_or_batch, sp_rank: int, sp_size: int):
    """Slice a tensor, or every tensor of a dict, along the last dim for SP rank ``sp_rank`` of ``sp_size``."""
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_slice: need 0 <= sp_rank < sp_size, got sp_rank={sp_rank}, sp_size={sp_size}")
    if isinstance(sample_or_batch, torch.Tensor):
        return _slice(sample_or_batch, sp_rank, sp_size, "tensor")
    if not isinstance(sample_or_batch, dict):
        raise TypeError(f"sp_slice: expected a tensor or a dict of tensors, got {type(sample_or_batch).__name__}")
    return {k: _slice(v, sp_rank, sp_size, repr(k)) if isinstance(v, torch.Tensor) else v
            for k, v in sample_or_batch.items()}
