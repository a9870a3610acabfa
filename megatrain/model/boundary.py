"""The model side of the state exchange, written once for every family: a layer's scan hands its local end state to
a boundary and adds the incoming state's closed-form contribution afterwards.

    from megatrain.model.boundary import Boundary, doc_starts, scan_with_boundary, start_boundary
    handle = start_boundary(boundary, local_state, decay, "forward")       # handle.wait() -> incoming state
    out, state, finish = scan_with_boundary(scan, u, a, c, logq, resets, boundary, "forward", block, backend)
    out, state = finish(out, state)        # waits for the incoming state, adds it (closed form), carries it on

A boundary is `boundary(local_state, decay, direction) -> incoming state` (same shapes; [B, D, N] for an EMA, real
or complex, [B, G, 3] for timestep-norm statistics in additive form) and may also offer the two-phase
`boundary.start(...) -> handle`, `handle.wait()` (megatrain.parallel.sequence's EMABoundary does: the exchange then
overlaps the local output). Sequence parallelism, segments (megatrain/model/segments.py) and the tests' fakes
implement it; the state math is ops/ema/state.py's. Users: MEGA's damped EMA (model/mega/ema.py), Megalodon's
complex EMA and timestep norm (model/megalodon/).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from megatrain.ops.ema import crossing_decay, incoming_contribution
from megatrain.ops.ema.state import carry

# boundary(local_state, decay, direction "forward"|"backward") -> incoming state (see the module docstring)
Boundary = Callable[[Tensor, Tensor, str], Tensor]


def doc_starts(doc_ids: Optional[Tensor]) -> Optional[Tensor]:
    """[B, L] bool: position t starts a new document (t >= 1 and its id differs from t-1's); None for None."""
    if doc_ids is None:
        return None
    return F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=False)


class _Ready:
    """The handle of a plain callable boundary: its answer is already there."""

    def __init__(self, h_in: Tensor):
        self.h_in = h_in

    def wait(self) -> Tensor:
        return self.h_in


def start_boundary(boundary: Boundary, local_state: Tensor, decay: Tensor, direction: str):
    """A handle whose wait() gives the incoming state: the boundary's own two-phase start() when it has one (the
    exchange then runs until wait), else the plain call, answered at once."""
    start = getattr(boundary, "start", None)
    if start is not None:
        return start(local_state, decay, direction)
    return _Ready(boundary(local_state, decay, direction))


def scan_with_boundary(scan: Callable, u: Tensor, a: Tensor, c: Tensor, logq: Tensor, resets: Optional[Tensor],
                       boundary: Boundary, direction: str, block: int, backend: str):
    """A linear scan (ops.ema.ema_scan or ops.cema.cema_scan) of a slice from zero state whose incoming state comes
    from `boundary`: (out, local state, finish). The exchange starts as soon as the local end state exists (before
    the output on the PyTorch path: a two-phase boundary's collective runs while the output is computed);
    `finish(out, state)` waits for the incoming state, adds its closed-form contribution and carries it across."""
    bsz, length = u.shape[:2]
    decay = crossing_decay(logq, bsz, length, resets)
    started = []
    out, state = scan(u, a, c, logq, resets, block=block, backend=backend,
                      on_state=lambda s: started.append(start_boundary(boundary, s, decay, direction)))

    def finish(out: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        h = started[0].wait()
        out = out + incoming_contribution(h, c, logq, length, resets, block)
        return out, carry(state, decay, None, h)
    return out, state, finish
