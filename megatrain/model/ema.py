"""MEGA's multi-dimensional damped EMA sublayer (Ma et al., arXiv 2209.10655, eq. 2-3): parameters and the model side.

Use:
    from megatrain.model.ema import MultiDimDampedEMA
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
picks, resolved per call by megatrain.ops.backend.resolve_backend). It runs in blocks of C = `block_size`
positions with linear memory, document resets (`doc_ids`), an incoming state, and exact truncation.
An incoming state (explicit `state`, or `boundary` for sequence parallelism) is linear, so with `boundary` each
slice is scanned from zero and the boundary's state is added afterwards in closed form
(`incoming_contribution`). It reaches the positions before the piece's first document change; a document that
starts exactly at the piece's first position is invisible here, so whoever hands the state over zeros it for that
row (`megatrain.parallel.sequence` does, from the slices' edge doc ids). The scan hands its end state out before
computing its output (`on_state`), so a two-phase boundary (`start`/`wait`, docs/CONTRACTS.md) exchanges while the
output is computed.
`ema_ref` below runs the module through the naive recurrence (megatrain.ops.ema.reference), the tests' oracle.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain.ops.backend import KERNEL_BACKENDS, resolve_backend
from megatrain.ops.ema import crossing_decay, ema_scan, ema_scan_ref, incoming_contribution, math_dtype

# boundary(local_state [B,D,N], decay [B,D,N], direction "forward"|"backward") -> incoming state [B,D,N]
# A boundary may also offer the two-phase `boundary.start(local_state, decay, direction) -> handle`,
# `handle.wait() -> h_in` (megatrain.parallel.sequence's does): the exchange then overlaps the local output.
Boundary = Callable[[Tensor, Tensor, str], Tensor]


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


def _resets_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """[B, L] bool: position t starts a new document (t >= 1 and its id differs from t-1's)."""
    changed = doc_ids[:, 1:] != doc_ids[:, :-1]
    return F.pad(changed, (1, 0), value=False)


class _Ready:
    """The handle of a plain callable boundary: its answer is already there."""

    def __init__(self, h_in: Tensor):
        self.h_in = h_in

    def wait(self) -> Tensor:
        return self.h_in


def _start_boundary(boundary: Boundary, local_state: Tensor, decay: Tensor, direction: str):
    """A handle whose wait() gives the incoming state: the boundary's own two-phase start() when it has one (the
    exchange then runs until wait), else the plain call, answered at once."""
    start = getattr(boundary, "start", None)
    if start is not None:
        return start(local_state, decay, direction)
    return _Ready(boundary(local_state, decay, direction))


class MultiDimDampedEMA(nn.Module):
    """MEGA's damped EMA sublayer with HF's parameter names/shapes; batch-first; see the module docstring."""

    def __init__(self, hidden_size: int, ema_projection_size: int, bidirectional: bool,
                 truncation: Optional[int] = None, block_size: int = 128, kernel_backend: str = "auto"):
        super().__init__()
        if kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"MultiDimDampedEMA: kernel_backend must be one of {', '.join(KERNEL_BACKENDS)}, "
                             f"got {kernel_backend!r}")
        self.kernel_backend = kernel_backend
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
        bsz, length = u.shape[:2]
        a, c, logq = _direction_coefficients(self, direction, u.dtype)
        if boundary is None:
            out, state = ema_scan(u, a, c, logq, resets, h_in, self.truncation, self.block_size, backend)
            return out, state, None
        decay = crossing_decay(logq, bsz, length, resets)
        name = "forward" if direction == 0 else "backward"
        started = []
        out, state = ema_scan(u, a, c, logq, resets, block=self.block_size, backend=backend,
                              on_state=lambda s: started.append(_start_boundary(boundary, s, decay, name)))

        def finish(out: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
            h = started[0].wait()
            return out + incoming_contribution(h, c, logq, length, resets, self.block_size), state + decay * h
        return out, state, finish

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
                state: Optional[Tensor] = None, boundary: Optional[Boundary] = None) -> tuple[Tensor, Tensor]:
        """y = silu(ema(x) + residual_weight * x) [B, L, D] in x's dtype; state_out [B, D, N] (forward direction)."""
        self._validate(x, mask, doc_ids, state, boundary)
        resolve_backend(self.kernel_backend, x)  # a backend that cannot run fails here, before any work
        backend = self.kernel_backend            # unresolved: `auto` lets ops/ema/paths.py choose the path
        dtype = math_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(dtype)
            u = xf if mask is None else xf * mask.to(dtype).unsqueeze(-1)
            resets = None if doc_ids is None else _resets_from_doc_ids(doc_ids)
            h_in = state.to(dtype) if state is not None else None
            # both directions' local passes first (each starts its exchange), then the waits: every rank starts
            # its collectives in the same order, and both are in flight while the local outputs are computed
            out, state_out, finish = self._direction(u, resets, 0, h_in, boundary, backend)
            if self.bidirectional:
                # right-to-left = left-to-right on the reversed sequence; doc resets recomputed on reversed ids
                resets_rev = None if doc_ids is None else _resets_from_doc_ids(doc_ids.flip(1))
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
            h = a * xf.unsqueeze(-1)
            if state is not None:
                h = h + torch.exp(logq) * state.to(dtype)
            y = F.silu((h * c).sum(-1) + xf * self.residual_weight.to(dtype))
        return y.to(x_t.dtype), h


def ema_ref(x: Tensor, ema: MultiDimDampedEMA, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
            state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The module through the naive recurrence (megatrain.ops.ema.reference), in x's dtype (fp64-capable;
    parameters are cast to it). Same inputs/outputs as `ema(...)` without `boundary`."""
    dtype = x.dtype
    u = x if mask is None else x * mask.to(dtype).unsqueeze(-1)
    resets = None if doc_ids is None else _resets_from_doc_ids(doc_ids)
    out, state_out = ema_scan_ref(u, *_direction_coefficients(ema, 0, dtype), resets,
                                  None if state is None else state.to(dtype), ema.truncation)
    if ema.bidirectional:
        resets_rev = None if doc_ids is None else _resets_from_doc_ids(doc_ids.flip(1))
        out_rev, _ = ema_scan_ref(u.flip(1), *_direction_coefficients(ema, 1, dtype), resets_rev,
                                  truncation=ema.truncation)
        out = out + out_rev.flip(1)
    y = F.silu(out + x * ema.residual_weight.to(dtype))
    return y, state_out
