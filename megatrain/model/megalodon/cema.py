"""Megalodon's multi-dimensional complex EMA sublayer (CEMA): parameters and the model side of megatrain/ops/cema.

Use:
    cema = ComplexEMA(hidden_size=256, ndim=16)
    y, state = cema(x)                    # x [B, L, D] -> y [B, L, D], state [B, D, N] complex after the last position
    y2, state = cema(x2, state=state)     # continue the same sequence
    y_t, state = cema.step(x_t, state)    # one token, x_t [B, D]
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_megalodon.py

Math per channel d and EMA dimension n = 1..N (parameter names and init are the reference code's
MultiHeadComplexEMA; where the paper's eq. 2 also rotates the input, the code rotates only the decay -- the code is
what produced the published models):
    p = sigmoid(alpha),  |q| = 1 - sigmoid(alpha) sigmoid(delta),  arg q = n * sigmoid(theta) * 2 pi / N
    c = (gamma[..., 0] + i gamma[..., 1]) * sqrt(1 / N)
    h_t = p x_t + q h_{t-1},   y_t = Re(sum_n c h_t) + omega x_t        (no activation, unlike MEGA's EMA)
Unidirectional (Megalodon is causal). The scan is the op megatrain.ops.cema.cema_scan (blocked PyTorch or our
Triton kernel, `kernel_backend`); an incoming state (explicit `state`, or `boundary` for sequence parallelism and
segments: megatrain/model/boundary.py) is linear, so with a boundary the slice is scanned from zero and the incoming
state's contribution is added afterwards in closed form, the exchange overlapping the output.
`cema_ref` runs the module through the sequential complex128 recurrence (ops/cema/reference.py), the tests' oracle.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from megatrain.model.boundary import Boundary, doc_starts, scan_with_boundary
from megatrain.ops.cema import cema_scan, cema_scan_ref, complex_dtype
from megatrain.ops.ema import math_dtype
from megatrain.ops.ema.state import carry


class ComplexEMA(nn.Module):
    """See the module docstring. Parameters: alpha, delta [D, N, 1], theta [D, 1, 1], gamma [D, N, 2], omega [D]."""

    def __init__(self, hidden_size: int, ndim: int = 16, block_size: int = 128, kernel_backend: str = "auto"):
        super().__init__()
        self.hidden_size, self.ndim, self.block_size = hidden_size, ndim, block_size
        self.kernel_backend = kernel_backend
        self.alpha = nn.Parameter(torch.empty(hidden_size, ndim, 1))
        self.delta = nn.Parameter(torch.empty(hidden_size, ndim, 1))
        self.theta = nn.Parameter(torch.empty(hidden_size, 1, 1))
        self.gamma = nn.Parameter(torch.empty(hidden_size, ndim, 2))
        self.omega = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, ndim={self.ndim}, kernel_backend={self.kernel_backend!r}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference code's init: alpha, delta ~ N(0, 0.2); sigmoid(theta) = the frequencies
        exp(-k log(D) / D), k = 1..D, in a random order; gamma ~ N(0, 1) real; omega ~ truncated N(0, 0.25)."""
        d = self.hidden_size
        nn.init.normal_(self.alpha, 0.0, 0.2)
        nn.init.normal_(self.delta, 0.0, 0.2)
        freqs = torch.exp(torch.arange(1, d + 1, dtype=torch.float64) * -(math.log(d) / d))[torch.randperm(d)]
        self.theta.copy_(torch.log(freqs / (1.0 - freqs)).view(d, 1, 1))
        nn.init.normal_(self.gamma, 0.0, 1.0)
        self.gamma[:, :, 1] = 0.0
        nn.init.trunc_normal_(self.omega, 0.0, 0.25, -1.0, 1.0)

    def coefficients(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(p [D, N] real, c [D, N] complex, log q [D, N] complex) in `dtype` (float32/64) / its complex dtype."""
        alpha = torch.sigmoid(self.alpha[..., 0].to(dtype))
        delta = torch.sigmoid(self.delta[..., 0].to(dtype))
        steps = torch.arange(1, self.ndim + 1, dtype=dtype, device=alpha.device)
        angle = torch.sigmoid(self.theta[:, :, 0].to(dtype)) * (2 * math.pi / self.ndim) * steps       # [D, N]
        # |q| = 1 - p sigma(delta) in (0, 1): log1p keeps precision; clamped as MEGA's (q = e^-60 is 0 in practice)
        logq = torch.complex(torch.log1p(-alpha * delta).clamp(min=-60.0), angle)
        gamma = self.gamma.to(dtype) * math.sqrt(1.0 / self.ndim)
        return alpha, torch.complex(gamma[..., 0], gamma[..., 1]), logq

    def _validate(self, x: Tensor, state: Optional[Tensor], boundary: Optional[Boundary]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"ComplexEMA: x must be [B, L, {self.hidden_size}], got {tuple(x.shape)}")
        if state is not None and boundary is not None:
            raise ValueError("ComplexEMA: pass either state or boundary, not both")
        want = (x.shape[0], self.hidden_size, self.ndim)
        if state is not None and (tuple(state.shape) != want or not state.is_complex()):
            raise ValueError(f"ComplexEMA: state must be complex {want}, got {state.dtype} {tuple(state.shape)}")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
                state: Optional[Tensor] = None, boundary: Optional[Boundary] = None) -> tuple[Tensor, Tensor]:
        """y [B, L, D] in x's dtype; the state [B, D, N] complex after the last position. Padded positions (mask 0)
        are zeroed before the scan (the state decays across them)."""
        self._validate(x, state, boundary)
        dtype = math_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(dtype)
            u = xf if mask is None else xf * mask.to(dtype).unsqueeze(-1)
            p, c, logq = self.coefficients(dtype)
            resets = doc_starts(doc_ids)
            if boundary is None:
                out, state = cema_scan(u, p, c, logq, resets, state, self.block_size, self.kernel_backend)
            else:
                out, state, finish = scan_with_boundary(cema_scan, u, p, c, logq, resets, boundary, "forward",
                                                        self.block_size, self.kernel_backend)
                out, state = finish(out, state)
            y = out + xf * self.omega.to(dtype)
        return y.to(x.dtype), state

    def step(self, x_t: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One decoding step: x_t [B, D], state [B, D, N] complex or None -> (y_t [B, D], new state)."""
        dtype = math_dtype(x_t.dtype)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            xf = x_t.to(dtype)
            p, c, logq = self.coefficients(dtype)
            # one position is a piece of the state recurrence: local p x_t, decay q
            h = carry(p * xf.unsqueeze(-1), torch.exp(logq), None,
                      None if state is None else state.to(complex_dtype(x_t.dtype)))
            y = (c * h).sum(-1).real + xf * self.omega.to(dtype)
        return y.to(x_t.dtype), h


def cema_ref(x: Tensor, cema: ComplexEMA, mask: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
             state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The module through the sequential complex128 recurrence: (y float64, state complex128)."""
    u = x.to(torch.float64)
    if mask is not None:
        u = u * mask.to(torch.float64).unsqueeze(-1)
    out, state = cema_scan_ref(u, *cema.coefficients(torch.float64), doc_starts(doc_ids), state)
    return out + x.to(torch.float64) * cema.omega.to(torch.float64), state
