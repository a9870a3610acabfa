"""MEGA's multi-dimensional damped EMA sublayer (Ma et al., arXiv 2209.10655, eq. 2-3): parameters and the model side.

Use:
    from megatrain.model.mega.ema import MultiDimDampedEMA
    ema = MultiDimDampedEMA(hidden_size=256, ema_projection_size=16, bidirectional=False)
    y, state = ema(x)                    # x [B, L, D] -> y [B, L, D], state [B, D, N] after the last position
    y2, state = ema(x2, state=state)     # continue the same sequence (unidirectional only)
    y_t, state = ema.step(x_t, state)    # one token, x_t [B, D]
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_ema.py

Math, per channel d and EMA dimension n (parameter names are Hugging Face's `MegaMultiDimensionDampedEma`):
    p = sigmoid(damping_factor), alpha = sigmoid(decay_factor), q = 1 - p * alpha
    a = p * beta                (beta = ema_expansion_matrix)
    c = gamma / sqrt(N)         (gamma = kernel_projection_matrix)
    h_t = a * x_t + q * h_{t-1}
    ema_t = sum_n c * h_t[n]
    y_t = silu(ema_t + residual_weight * x_t)
Bidirectional: channels D..2D hold a second EMA run right to left; both directions include lag 0 and are summed.
Padded positions (mask 0) are zeroed before the EMA (the residual still sees them, as in HF).

The scan itself is the op `megatrain.ops.ema.ema_scan` (blocked PyTorch, or our Triton kernel; `kernel_backend`
picks: the op resolves it per call, megatrain.ops.backend). It runs in blocks of C = `block_size`
positions with linear memory, document resets (`doc_ids`), an incoming state, and exact truncation.
An incoming state (explicit `state`, or `boundary` for sequence parallelism) is linear, so with `boundary` each
slice is scanned from zero and the boundary's state is added afterwards in closed form
(`incoming_contribution`; why that is exact: megatrain/ops/ema/state.py). It reaches the positions before the
piece's first document change; a document that starts exactly at the piece's first position is invisible here, so
whoever hands the state over cuts it for that row (state.py's `keep`; `megatrain.parallel.sequence` does it from
the slices' edge doc ids). The scan hands its end state out before
computing its output (`on_state`), so a two-phase boundary (`start`/`wait`, docs/CONTRACTS.md) exchanges while the
output is computed.
`ema_ref` below runs the module through the naive recurrence (megatrain.ops.ema.reference), the tests' oracle.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain.model.boundary import Boundary, doc_starts, scan_with_boundary
from megatrain.ops.ema import ema_scan, ema_scan_ref, math_dtype
from megatrain.ops.ema.state import DIRECTIONS, carry

def _direction_coefficients(ema: "MultiDimDampedEMA", direction: int, dtype: torch.dtype):
    """(a, c, log q), each [D, N], of one direction (0 = left-to-right, 1 = right-to-left) in `dtype`."""
    rows = slice(direction * ema.hidden_size, (direction + 1) * ema.hidden_size)
    p = torch.sigmoid(ema.damping_factor[rows, :, 0].to(dtype))
    alpha = torch.sigmoid(ema.decay_factor[rows, :, 0].to(dtype))
    a = p * ema.ema_expansion_matrix[rows, :, 0].to(dtype)
    c = ema.kernel_projection_matrix[rows].to(dtype) * math.sqrt(1.0 / ema.ema_projection_size)
    # q in (0, 1): log1p keeps precision when p * alpha is small. When both sigmoids round to 1, q = 0 and
    # log q = -inf would turn the lag-0 power into 0 * inf = NaN (transformers' kernel does exactly that);
    # q = e^-60 is 0 for every practical purpose and keeps everything finite.
    logq = torch.log1p(-p * alpha).clamp(min=-60.0)
    return a, c, logq


class MultiDimDampedEMA(nn.Module):
    """MEGA's damped EMA sublayer with HF's parameter names/shapes; batch-first; see the module docstring."""

    def __init__(self, hidden_size: int, ema_projection_size: int, bidirectional: bool,
                 truncation: Optional[int] = None, block_size: int = 128, kernel_backend: str = "auto"):
        super().__init__()
        self.kernel_backend = kernel_backend  # a MegaConfig.kernel_backend value: ema_scan checks and resolves it
        for name, value in (("hidden_size", hidden_size), ("ema_projection_size", ema_projection_size),
                            ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiDimDampedEMA: {name} must be a positive int, got {value!r}")
        if truncation is not None and (not isinstance(truncation, int) or truncation < 1):
            raise ValueError(f"MultiDimDampedEMA: truncation must be None or a positive int, got {truncation!r}")
        self.hidden_size = hidden_size
        self.ema_projection_size = ema_projection_size
        self.bidirectional = bool(bidirectional)
        self.truncation = truncation
        self.block_size = block_size
        k = 2 * hidden_size if self.bidirectional else hidden_size
        self.damping_factor = nn.Parameter(torch.empty(k, ema_projection_size, 1))
        self.decay_factor = nn.Parameter(torch.empty(k, ema_projection_size, 1))
        self.ema_expansion_matrix = nn.Parameter(torch.empty(k, ema_projection_size, 1))
        self.kernel_projection_matrix = nn.Parameter(torch.empty(k, ema_projection_size))
        self.residual_weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ema_projection_size={self.ema_projection_size}, "
                f"bidirectional={self.bidirectional}, truncation={self.truncation}, block_size={self.block_size}, "
                f"kernel_backend={self.kernel_backend!r}")

    @torch.no_grad()
    def reset_parameters(self, delta_alpha_range: float = 0.2, beta_range: float = 0.02,
                         gamma_omega_range: float = 1.0) -> None:
        """HF's init (MegaConfig.ema_delta_alpha_range, ema_beta_range, ema_gamma_omega_range; HF defaults)."""
        nn.init.normal_(self.damping_factor, mean=0.0, std=delta_alpha_range)
        nn.init.normal_(self.decay_factor, mean=0.0, std=delta_alpha_range)
        # beta = alternating signs [1, -1, 1, ...] along the EMA dimension, plus small noise
        signs = torch.ones(self.ema_projection_size, 1)
        signs[1::2] = -1.0
        self.ema_expansion_matrix.normal_(mean=0.0, std=beta_range).add_(signs)
        nn.init.normal_(self.kernel_projection_matrix, mean=0.0, std=gamma_omega_range)
        nn.init.normal_(self.residual_weight, mean=0.0, std=gamma_omega_range)

    def _validate(self, x: Tensor, mask: Optional[Tensor], doc_ids: Optional[Tensor], state: Optional[Tensor],
                  boundary: Optional[Boundary]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiDimDampedEMA: x must be [B, L, {self.hidden_size}], got {tuple(x.shape)}")
        bsz, length = x.shape[:2]
        if length == 0:
            raise ValueError("MultiDimDampedEMA: x has length 0")
        for name, t in (("mask", mask), ("doc_ids", doc_ids)):
            if t is not None and tuple(t.shape) != (bsz, length):
                raise ValueError(f"MultiDimDampedEMA: {name} must be [B, L] = {(bsz, length)}, got {tuple(t.shape)}")
        if state is not None and boundary is not None:
            raise ValueError("MultiDimDampedEMA: pass either state or boundary, not both")
        if state is not None:
            if self.bidirectional:
                raise ValueError("MultiDimDampedEMA: state is for unidirectional EMA only (bidirectional=True)")
            want = (bsz, self.hidden_size, self.ema_projection_size)
            if tuple(state.shape) != want:
                raise ValueError(f"MultiDimDampedEMA: state must be {want}, got {tuple(state.shape)}")
        if boundary is not None and not callable(boundary):
            raise ValueError(f"MultiDimDampedEMA: boundary must be callable, got {type(boundary).__name__}")
        if self.truncation is not None and (state is not None or boundary is not None):
            raise ValueError(f"MultiDimDampedEMA: truncation={self.truncation} has no finite state; "
                             "state/boundary are unsupported with truncation")

    def _direction(self, u: Tensor, resets: Optional[Tensor], direction: int, h_in: Optional[Tensor],
                   boundary: Optional[Boundary], backend: str):
        """One direction's EMA of u [B, L, D] (already flipped for right-to-left): (ema [B, L, D], state, finish).

        With a boundary (sequence parallelism) the slice is scanned from zero state; the exchange starts as soon as
        the local end state exists (before the output on the PyTorch path: a two-phase boundary's collective runs
        while the output is computed), and `finish(out, state)` waits for the incoming state and adds its
        closed-form contribution. Without one, finish is None."""
        a, c, logq = _direction_coefficients(self, direction, u.dtype)
        if boundary is None:
            out, state = ema_scan(u, a, c, logq, resets, h_in, self.truncation, self.block_size, backend)
            return out, state, None
        return scan_with_boundary(ema_scan, u, a, c, logq, resets, boundary, DIRECTIONS[direction], self.block_size,
                                  backend)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
                state: Optional[Tensor] = None, boundary: Optional[Boundary] = None) -> tuple[Tensor, Tensor]:
        """y = silu(ema(x) + residual_weight * x) [B, L, D] in x's dtype; state_out [B, D, N] (forward direction)."""
        self._validate(x, mask, doc_ids, state, boundary)
        backend = self.kernel_backend
        dtype = math_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(dtype)
            u = xf if mask is None else xf * mask.to(dtype).unsqueeze(-1)
            resets = None if doc_ids is None else doc_starts(doc_ids)
            h_in = state.to(dtype) if state is not None else None
            # both directions' local passes first (each starts its exchange), then the waits: every rank starts
            # its collectives in the same order, and both are in flight while the local outputs are computed
            out, state_out, finish = self._direction(u, resets, 0, h_in, boundary, backend)
            if self.bidirectional:
                # right-to-left = left-to-right on the reversed sequence; doc resets recomputed on reversed ids
                resets_rev = None if doc_ids is None else doc_starts(doc_ids.flip(1))
                out_rev, state_rev, finish_rev = self._direction(u.flip(1), resets_rev, 1, None, boundary, backend)
            if finish is not None:
                out, state_out = finish(out, state_out)
            if self.bidirectional:
                if finish_rev is not None:
                    out_rev, _ = finish_rev(out_rev, state_rev)
                out = out + out_rev.flip(1)
            y = F.silu(out + xf * self.residual_weight.to(dtype))
        return y.to(x.dtype), state_out

    def step(self, x_t: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One decoding step (unidirectional): x_t [B, D], state [B, D, N] or None -> (y_t [B, D], new state)."""
        if self.bidirectional:
            raise ValueError("MultiDimDampedEMA.step: incremental decoding needs bidirectional=False")
        if x_t.dim() != 2 or x_t.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiDimDampedEMA.step: x_t must be [B, {self.hidden_size}], got {tuple(x_t.shape)}")
        if self.truncation is not None:
            raise ValueError(f"MultiDimDampedEMA.step: truncation={self.truncation} has no finite state")
        want = (x_t.shape[0], self.hidden_size, self.ema_projection_size)
        if state is not None and tuple(state.shape) != want:
            raise ValueError(f"MultiDimDampedEMA.step: state must be {want}, got {tuple(state.shape)}")
        dtype = math_dtype(x_t.dtype)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            xf = x_t.to(dtype)
            a, c, logq = _direction_coefficients(self, 0, dtype)
            # one position is a piece of the state recurrence: local a x_t, decay q
            h = carry(a * xf.unsqueeze(-1), torch.exp(logq), None, None if state is None else state.to(dtype))
            y = F.silu((h * c).sum(-1) + xf * self.residual_weight.to(dtype))
        return y.to(x_t.dtype), h


def ema_ref(x: Tensor, ema: MultiDimDampedEMA, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
            state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The module through the naive recurrence (megatrain.ops.ema.reference), in x's dtype (fp64-capable;
    parameters are cast to it). Same inputs/outputs as `ema(...)` without `boundary`."""
    dtype = x.dtype
    u = x if mask is None else x * mask.to(dtype).unsqueeze(-1)
    resets = None if doc_ids is None else doc_starts(doc_ids)
    out, state_out = ema_scan_ref(u, *_direction_coefficients(ema, 0, dtype), resets,
                                  None if state is None else state.to(dtype), ema.truncation)
    if ema.bidirectional:
        resets_rev = None if doc_ids is None else doc_starts(doc_ids.flip(1))
        out_rev, _ = ema_scan_ref(u.flip(1), *_direction_coefficients(ema, 1, dtype), resets_rev,
                                  truncation=ema.truncation)
        out = out + out_rev.flip(1)
    y = F.silu(out + x * ema.residual_weight.to(dtype))
    return y, state_out
