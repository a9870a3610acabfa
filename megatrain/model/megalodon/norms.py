"""Megalodon's norms: the timestep norm (cumulative group statistics over time, megatrain/ops/tsn) and the RMS and
layer norms of the reference code, all with the "+1" weight reparameterisation (weights start at 0, scale 1 + w).

    norm = TimestepNorm(hidden_size=256, num_groups=8)
    y, state = norm(x, mask=None, doc_ids=None, state=None, boundary=None)  # state: (count [B], mean, var [B, G])
    y = OffsetRMSNorm(256)(x); y = OffsetLayerNorm(256)(x)
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_megalodon.py

TimestepNorm with a `boundary` (sequence parallelism, a segment's pre-pass): the op hands its slice's statistics
(count, mean, var, and whether a document starts inside) to `on_summary`, here converted to the additive form of
ops/tsn/stats.py and started on the boundary -- the same exchange and state recurrence as the EMAs' -- and the
incoming statistics come back from it before the positions are normalized (the local prefix sums are formed while
the exchange runs). The statistics restart at a document start (`doc_ids`); padded positions (mask 0) count
nowhere and come out 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain.model.boundary import Boundary, doc_starts, start_boundary
from megatrain.model.layers import rms_normalize
from megatrain.ops.ema import math_dtype
from megatrain.ops.tsn import from_additive, timestep_norm, to_additive


class _StatsHandle:
    """An exchange of statistics in additive form in flight: wait() -> (count, mean, var)."""

    def __init__(self, handle):
        self.handle = handle

    def wait(self):
        return from_additive(self.handle.wait())


def exchange_statistics(boundary: Boundary):
    """The timestep norm's `on_summary` for a boundary: the summary in additive form, started on it."""
    def on_summary(count: Tensor, mean: Tensor, var: Tensor, crosses: Tensor) -> _StatsHandle:
        local, decay = to_additive((count.unsqueeze(-1), mean, var), crosses)
        return _StatsHandle(start_boundary(boundary, local, decay, "forward"))
    return on_summary


class TimestepNorm(nn.Module):
    """Group norm with statistics cumulative over time (see the module docstring); weight + 1, bias."""

    def __init__(self, hidden_size: int, num_groups: int, eps: float = 1e-5, kernel_backend: str = "auto"):
        super().__init__()
        if hidden_size % num_groups:
            raise ValueError(f"TimestepNorm: num_groups={num_groups} must divide hidden_size={hidden_size}")
        self.hidden_size, self.num_groups, self.eps = hidden_size, num_groups, eps
        self.kernel_backend = kernel_backend
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, num_groups={self.num_groups}, eps={self.eps}"

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None, state=None,
                boundary: Optional[Boundary] = None):
        """x [B, L, D] -> (y [B, L, D] in x's dtype, (count [B], mean [B, G], var [B, G]) after the last position)."""
        if state is not None and boundary is not None:
            raise ValueError("TimestepNorm: pass either state or boundary, not both")
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = math_dtype(x.dtype)     # 1 + w in the math dtype (a bf16 weight keeps its 8 bits in w)
            return timestep_norm(x, self.weight.to(dtype) + 1.0, self.bias, self.num_groups, mask,
                                 doc_starts(doc_ids), state, self.eps, backend=self.kernel_backend,
                                 on_summary=None if boundary is None else exchange_statistics(boundary))


class OffsetRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight) (weight starts at 0); affine=False: x / rms(x). Statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        y = rms_normalize(x, self.eps)
        return y if self.weight is None else y * (self.weight + 1.0)


class OffsetLayerNorm(nn.Module):
    """Layer norm with weight (1 + w) and bias (w, bias start at 0)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight + 1.0
        return F.layer_norm(x, (self.dim,), weight, self.bias, self.eps)
