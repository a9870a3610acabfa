"""MEGA's damped EMA as an op: one dispatch function over the PyTorch and Triton implementations.

    from megatrain.ops.ema import ema_scan, incoming_contribution, crossing_decay
    out, state = ema_scan(u, a, c, logq, resets=None, h_in=None, truncation=None, block=128, backend="torch",
                          path="auto")
    # u [B, L, D] (already masked), a/c/logq [D, N], resets [B, L] bool (True: a document starts there),
    # h_in [B, D, N] -> out [B, L, D] = sum_n c h_t, state [B, D, N] = h after the last position (untruncated)
    extra = incoming_contribution(h_in, c, logq, length, resets, block)    # [B, L, D]: what h_in adds to out
    decay = crossing_decay(logq, batch, length, resets)                    # [B, D, N]: h_in's factor across L
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_ema_ops.py

Math: h_t = a u_t + q keep_t h_{t-1} (keep_t = 0 where resets[:, t]; h_{-1} = h_in), q = exp(logq); in MEGA's
parameters a = p * beta, c = gamma / sqrt(N), q = 1 - p * alpha. Files: reference.py (the naive recurrence, the
oracle), state.py (the state recurrence between pieces -- blocks, segments, SP slices -- and why splitting is
exact), torch_blocked.py (blocked PyTorch, autograd backward), triton_kernel.py and triton_chunked.py (our
kernels, forward+backward), paths.py (which one runs).
`backend` is a MegaConfig.kernel_backend value ("auto" | "torch" | "triton"), resolved here once per call by
megatrain.ops.backend.resolve_backend; "triton" where it cannot run raises the one-line ValueError naming
MegaConfig.kernel_backend. `path` (default "auto") picks the implementation: "blocked" (torch_blocked.py), "scan"
(triton_kernel.py: per-step recurrence) or "chunked" (triton_chunked.py: tensor-core matmuls); "auto" reads the one
table, per GPU architecture and length, in paths.py. The math is fp32 (fp64 for fp64 u); u may be bf16.

Truncation T (lags >= T dropped, inside the document) is exact on both backends and built here, once: lags >= T of
the EMA are sum_n (c q^T) h_{t-T}, i.e. the output of a second scan with output weights c q^T read T positions back
(where t-T lies in t's document), subtracted from the full output. It has no finite state: h_in is rejected.
The two boundary helpers are the cheap closed forms sequence parallelism needs (docs/CONTRACTS.md, "EMA boundary
exchange"): each rank scans with zero incoming state, exchanges (state, crossing_decay), then adds
incoming_contribution. They are plain PyTorch on both backends (crossing_decay lives in state.py with the
recurrence; incoming_contribution, an output of the blocked layout, in torch_blocked.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatrain.ops.ema.paths import EMA_PATH_TABLE, EMA_PATHS, choose_path, chunk_length, device_row
from megatrain.ops.ema.reference import ema_scan_ref
from megatrain.ops.ema.state import crossing_decay
from megatrain.ops.ema.torch_blocked import causal_ema_blocked, incoming_contribution

__all__ = ["ema_scan", "ema_scan_ref", "incoming_contribution", "crossing_decay", "math_dtype", "EMA_PATHS",
           "EMA_PATH_TABLE", "choose_path"]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs; fp64 inputs stay fp64 (tests compare at fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _validate(u, a, c, logq, resets, h_in, truncation, block) -> None:
    if not isinstance(u, Tensor) or u.dim() != 3 or not u.is_floating_point():
        raise ValueError(f"ema_scan: u must be a floating [B, L, D] tensor, got {getattr(u, 'shape', type(u))}")
    bsz, length, dim = u.shape
    if length == 0:
        raise ValueError("ema_scan: u has length 0")
    for name, t in (("a", a), ("c", c), ("logq", logq)):
        if t.dim() != 2 or t.shape[0] != dim or t.shape != a.shape:
            raise ValueError(f"ema_scan: {name} must be [D, N] with D = {dim} (as a), got {tuple(t.shape)}")
    if resets is not None and (resets.dtype != torch.bool or tuple(resets.shape) != (bsz, length)):
        raise ValueError(f"ema_scan: resets must be bool [B, L] = {(bsz, length)}, got {resets.dtype} "
                         f"{tuple(resets.shape)}")
    if h_in is not None and tuple(h_in.shape) != (bsz, dim, a.shape[1]):
        raise ValueError(f"ema_scan: h_in must be [B, D, N] = {(bsz, dim, a.shape[1])}, got {tuple(h_in.shape)}")
    if truncation is not None and (not isinstance(truncation, int) or truncation < 1):
        raise ValueError(f"ema_scan: truncation must be None or a positive int, got {truncation!r}")
    if truncation is not None and h_in is not None:
        raise ValueError(f"ema_scan: truncation={truncation} has no finite state; h_in is unsupported with it")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"ema_scan: block must be a positive int, got {block!r}")


def _scan(path: str, u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor],
          h_in: Optional[Tensor], block: int, on_state=None) -> tuple[Tensor, Tensor]:
    if path in ("scan", "chunked"):
        if path == "scan":
            from megatrain.ops.ema.triton_kernel import ema_scan_triton  # imports triton only when asked for
            out, state = ema_scan_triton(u, a, c, logq, resets, h_in, block)
        else:
            from megatrain.ops.ema.triton_chunked import ema_scan_chunked
            out, state = ema_scan_chunked(u, a, c, logq, resets, h_in, chunk_length(block, device_row(u)))
        if on_state is not None:  # one fused pass: the state exists only with the output
            on_state(state)
        return out, state
    return causal_ema_blocked(u.to(a.dtype), a, c, logq, resets, h_in, block, on_state)


def _same_document_shift(x: Tensor, lag: int, resets: Optional[Tensor]) -> Tensor:
    """x read `lag` positions back: [B, L, D], 0 where t - lag < 0 or lies in an earlier document."""
    length = x.shape[1]
    shifted = F.pad(x[:, : length - lag], (0, 0, lag, 0))
    if resets is not None:
        seg = resets.cumsum(1)
        same_doc = seg == F.pad(seg[:, : length - lag], (lag, 0), value=-1)
        shifted = shifted * same_doc.unsqueeze(-1).to(shifted.dtype)
    return shifted


def ema_scan(u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor] = None,
             h_in: Optional[Tensor] = None, truncation: Optional[int] = None, block: int = 128,
             backend: str = "torch", on_state: Optional[Callable[[Tensor], None]] = None,
             path: str = "auto") -> tuple[Tensor, Tensor]:
    """The EMA (see the module docstring): (out [B, L, D], state [B, D, N]) in the math dtype.
    `on_state(state)` (no h_in, no truncation) is called with the end state as soon as it exists: before the
    output on the PyTorch path, so a sequence-parallel boundary exchange started there overlaps the output's work."""
    _validate(u, a, c, logq, resets, h_in, truncation, block)
    if on_state is not None and (h_in is not None or truncation is not None):
        raise ValueError("ema_scan: on_state is for a scan from zero state without truncation")
    path = choose_path(backend, u, path)
    dtype = math_dtype(u.dtype)
    a, c, logq = a.to(dtype), c.to(dtype), logq.to(dtype)
    h_in = None if h_in is None else h_in.to(dtype)
    out, state = _scan(path, u, a, c, logq, resets, h_in, block, on_state)
    length = u.shape[1]
    if truncation is not None and truncation < length:
        far, _ = _scan(path, u, a, c * torch.exp(logq * truncation), logq, resets, None, block)
        out = out - _same_document_shift(far, truncation, resets)
    return out, state
