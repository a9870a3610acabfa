"""Megalodon's timestep normalization (TSN) as an op: one dispatch function over the PyTorch and Triton paths.

    from megatrain.ops.tsn import timestep_norm
    y, (count, mean, var) = timestep_norm(x, gamma, beta, num_groups, mask=None, resets=None, state=None,
                                          eps=1e-5, block=256, backend="torch", on_summary=None)
    # x [B, L, D]; gamma, beta [D] (the effective weight: the module adds its "+1"); mask [B, L] (1 = real token);
    # resets [B, L] bool (True: a document starts there: the statistics restart); state = the incoming
    # (count [B] int64, mean [B, G], var [B, G]) or None -> y [B, L, D] in x's dtype, the state after the last
    # position in the math dtype (count int64)
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_tsn_ops.py

A group norm whose mean and variance are cumulative over time: position t is normalized by the mean and biased
variance of every value of its group at the real positions <= t of its document (and the incoming state's). Padded
positions count nowhere and come out 0. Files: reference.py (the definition in float64, the oracle), stats.py
(Chan's merge, the prior, the scan over pieces, the additive form that crosses sequence-parallel ranks),
torch_blocked.py (PyTorch, autograd backward), triton_kernel.py (our kernels, forward + hand-written backward).
`backend` is a MegaConfig.kernel_backend value ("auto" | "torch" | "triton"), resolved here once per call by
megatrain.ops.backend.resolve_backend ("triton" where it cannot run: the one-line ValueError naming the field).
`on_summary` (sequence parallelism): see torch_blocked.py; with it, `state` must be None.
`block`: positions per block (PyTorch) / per chunk (Triton, at most 64: a chunk is walked position by position).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from megatrain.ops.backend import resolve_backend
from megatrain.ops.ema import math_dtype
from megatrain.ops.tsn.reference import timestep_norm_ref
from megatrain.ops.tsn.stats import from_additive, to_additive
from megatrain.ops.tsn.torch_blocked import timestep_norm_blocked

__all__ = ["timestep_norm", "timestep_norm_ref", "to_additive", "from_additive", "TRITON_CHUNK"]

TRITON_CHUNK = 64        # positions a kernel program walks (statistics restart from merged ones every chunk)


def _validate(x, gamma, beta, num_groups, mask, resets, state, block) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"timestep_norm: x must be a floating [B, L, D] tensor, got {getattr(x, 'shape', type(x))}")
    bsz, length, dim = x.shape
    if length == 0:
        raise ValueError("timestep_norm: x has length 0")
    if not isinstance(num_groups, int) or num_groups < 1 or dim % num_groups:
        raise ValueError(f"timestep_norm: num_groups={num_groups!r} must be a positive int dividing D={dim}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (dim,):
            raise ValueError(f"timestep_norm: {name} must be [D] = [{dim}], got {tuple(t.shape)}")
    for name, t, dtypes in (("mask", mask, None), ("resets", resets, (torch.bool,))):
        if t is not None and (tuple(t.shape) != (bsz, length) or dtypes is not None and t.dtype not in dtypes):
            raise ValueError(f"timestep_norm: {name} must be [B, L] = {(bsz, length)}"
                             f"{' bool' if dtypes else ''}, got {t.dtype} {tuple(t.shape)}")
    if state is not None:
        count, mean, var = state
        if tuple(count.shape) != (bsz,) or tuple(mean.shape) != (bsz, num_groups) or mean.shape != var.shape:
            raise ValueError(f"timestep_norm: state must be (count [B], mean [B, G], var [B, G]) with B={bsz}, "
                             f"G={num_groups}, got {tuple(count.shape)}, {tuple(mean.shape)}, {tuple(var.shape)}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"timestep_norm: block must be a positive int, got {block!r}")


def timestep_norm(x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, mask: Optional[Tensor] = None,
                  resets: Optional[Tensor] = None, state=None, eps: float = 1e-5, block: int = 256,
                  backend: str = "torch", on_summary: Optional[Callable] = None):
    """The timestep norm (see the module docstring): (y, (count, mean, var))."""
    _validate(x, gamma, beta, num_groups, mask, resets, state, block)
    if on_summary is not None and state is not None:
        raise ValueError("timestep_norm: pass either state or on_summary, not both")
    dtype = math_dtype(x.dtype)
    if resolve_backend(backend, x) == "triton":
        from megatrain.ops.tsn.triton_kernel import timestep_norm_triton  # imports triton only when asked for
        return timestep_norm_triton(x, gamma, beta, num_groups, mask, resets, state, eps, min(block, TRITON_CHUNK),
                                    on_summary, dtype)
    return timestep_norm_blocked(x, gamma, beta, num_groups, mask, resets, state, eps, block, on_summary, dtype)
