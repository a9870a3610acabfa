"""Megalodon's complex EMA (CEMA) as an op: one dispatch function over the PyTorch and Triton implementations.

    from megatrain.ops.cema import cema_scan, incoming_contribution, crossing_decay
    out, state = cema_scan(u, p, c, logq, resets=None, h_in=None, block=128, backend="torch", path="auto")
    # u [B, L, D] real (already masked), p [D, N] real, c/logq [D, N] complex, resets [B, L] bool (True: a document
    # starts there), h_in [B, D, N] complex -> out [B, L, D] = Re(sum_n c h_t) (real, the math dtype),
    # state [B, D, N] complex = h after the last position
    extra = incoming_contribution(h_in, c, logq, length, resets, block)   # [B, L, D]: what h_in adds to out
    decay = crossing_decay(logq, batch, length, resets)                   # [B, D, N] complex: h_in's factor
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_cema_ops.py

Math: h_t = p u_t + q keep_t h_{t-1} (keep_t = 0 where resets[:, t]; h_{-1} = h_in), q = exp(logq) complex. In
Megalodon's parameters (megatrain/model/megalodon/cema.py) p = sigmoid(alpha), |q| = 1 - sigmoid(alpha)
sigmoid(delta), arg q = n sigmoid(theta) 2 pi / N (n = 1..N), c = gamma sqrt(1/N). Files: reference.py (the
sequential complex128 recurrence, the oracle) and triton_kernel.py (our kernel, forward + backward). The PyTorch
path is MEGA's blocked EMA itself (ops/ema/torch_blocked.py, complex coefficients; its Toeplitz matmuls stay
real) and the state recurrence between blocks, segments and SP slices is the one of ops/ema/state.py on complex
states: one implementation of each mechanism for both families. So are the two boundary helpers (re-exported).

`backend` is a MegaConfig.kernel_backend value ("auto" | "torch" | "triton"), resolved here once per call by
megatrain.ops.backend.resolve_backend; "triton" where it cannot run raises the one-line ValueError naming the field.
`path` (default "auto"): "blocked" (PyTorch) or "scan" (the kernel); auto = the resolved backend's path. The math
is fp32 (complex64 states; fp64 / complex128 for fp64 u); u may be bf16.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from megatrain.ops.backend import resolve_backend
from megatrain.ops.cema.reference import cema_scan_ref
from megatrain.ops.ema import crossing_decay, incoming_contribution, math_dtype
from megatrain.ops.ema.torch_blocked import causal_ema_blocked

__all__ = ["cema_scan", "cema_scan_ref", "incoming_contribution", "crossing_decay", "complex_dtype", "CEMA_PATHS"]

CEMA_PATHS = ("scan", "blocked")


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype of the math for inputs of `dtype`: complex64 (fp32/bf16/fp16), complex128 (fp64)."""
    return torch.complex128 if math_dtype(dtype) == torch.float64 else torch.complex64


def _validate(u, p, c, logq, resets, h_in, block) -> None:
    if not isinstance(u, Tensor) or u.dim() != 3 or not u.is_floating_point():
        raise ValueError(f"cema_scan: u must be a real floating [B, L, D] tensor, got {getattr(u, 'shape', type(u))}")
    bsz, length, dim = u.shape
    if length == 0:
        raise ValueError("cema_scan: u has length 0")
    if p.dim() != 2 or p.shape[0] != dim or p.is_complex():
        raise ValueError(f"cema_scan: p must be real [D, N] with D = {dim}, got {p.dtype} {tuple(p.shape)}")
    for name, t in (("c", c), ("logq", logq)):
        if t.shape != p.shape or not t.is_complex():
            raise ValueError(f"cema_scan: {name} must be complex [D, N] = {tuple(p.shape)} (as p), got {t.dtype} "
                             f"{tuple(t.shape)}")
    if resets is not None and (resets.dtype != torch.bool or tuple(resets.shape) != (bsz, length)):
        raise ValueError(f"cema_scan: resets must be bool [B, L] = {(bsz, length)}, got {resets.dtype} "
                         f"{tuple(resets.shape)}")
    if h_in is not None and (tuple(h_in.shape) != (bsz, dim, p.shape[1]) or not h_in.is_complex()):
        raise ValueError(f"cema_scan: h_in must be complex [B, D, N] = {(bsz, dim, p.shape[1])}, got {h_in.dtype} "
                         f"{tuple(h_in.shape)}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"cema_scan: block must be a positive int, got {block!r}")


def choose_path(requested: str, u: Tensor, path: str = "auto") -> str:
    """The CEMA path for a call on u with backend `requested`: "blocked" (torch) or "scan" (triton)."""
    if path not in ("auto",) + CEMA_PATHS:
        raise ValueError(f"cema_scan: path={path!r}: must be one of auto, {', '.join(CEMA_PATHS)}")
    if requested == "torch" and path == "scan" or requested == "triton" and path == "blocked":
        raise ValueError(f"cema_scan: path={path!r} contradicts backend={requested!r} (blocked is the torch backend; "
                         "scan is triton)")
    backend = resolve_backend(requested if path == "auto" else {"scan": "triton", "blocked": "torch"}[path], u)
    return "scan" if backend == "triton" else "blocked"


def cema_scan(u: Tensor, p: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
              h_in: Optional[Tensor] = None, block: int = 128, backend: str = "torch",
              on_state: Optional[Callable[[Tensor], None]] = None, path: str = "auto") -> tuple[Tensor, Tensor]:
    """The complex EMA (see the module docstring): (out [B, L, D] real, state [B, D, N] complex), math dtype.
    `on_state(state)` (no h_in) is called with the end state as soon as it exists: before the output on the PyTorch
    path, so a sequence-parallel boundary exchange started there overlaps the output's work."""
    _validate(u, p, c, logq, resets, h_in, block)
    if on_state is not None and h_in is not None:
        raise ValueError("cema_scan: on_state is for a scan from zero state")
    path = choose_path(backend, u, path)
    dtype, cdtype = math_dtype(u.dtype), complex_dtype(u.dtype)
    p, c, logq = p.to(dtype), c.to(cdtype), logq.to(cdtype)
    h_in = None if h_in is None else h_in.to(cdtype)
    if path == "scan":
        from megatrain.ops.cema.triton_kernel import cema_scan_triton  # imports triton only when asked for
        out, state = cema_scan_triton(u, p, c, logq, resets, h_in, block)
        if on_state is not None:
            on_state(state)
        return out, state
    return causal_ema_blocked(u.to(dtype), p, c, logq, resets, h_in, block, on_state)
