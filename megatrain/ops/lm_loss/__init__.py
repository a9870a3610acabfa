"""Fused LM head + cross-entropy, summed over non-ignored positions: the one entry point the model calls.

    from megatrain.ops.lm_loss import lm_head_ce_sum, lm_head_ce_sum_ref
    loss = lm_head_ce_sum(h, weight, bias, targets, block=1024, backend="torch")
        # h [N, D] or [..., D] (flattened with targets), weight [V, D], bias [V] or None, targets int (-100 =
        # ignored) -> fp32 scalar (fp64 for fp64 inputs on the PyTorch path)

Paths (megatrain.ops.lm_loss.*): reference.lm_head_ce_sum_ref (plain F.linear + F.cross_entropy, the oracle),
blockwise.blockwise_ce_sum (PyTorch, `block` rows at a time; see its docstring), liger.liger_ce_sum (Liger-Kernel's
Triton fused linear cross-entropy; optional dependency: pip install 'megatrain[gpu]').
`backend` is a MegaConfig.kernel_backend value, resolved here once (megatrain.ops.backend.resolve_backend, then
Liger's availability): "torch" the blockwise path; "triton" Liger (a one-line ValueError when Liger or Triton
cannot run); "auto" Liger on CUDA when liger-kernel is installed, else blockwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatrain.ops.backend import resolve_backend
from megatrain.ops.lm_loss.blockwise import blockwise_ce_sum
from megatrain.ops.lm_loss.liger import liger_available, liger_ce_sum
from megatrain.ops.lm_loss.reference import IGNORE_INDEX, lm_head_ce_sum_ref

__all__ = ["IGNORE_INDEX", "lm_head_ce_sum", "lm_head_ce_sum_ref", "loss_backend"]


def loss_backend(requested: str, h: torch.Tensor) -> str:
    """"torch" (blockwise) or "triton" (Liger) for a kernel_backend value and a tensor; ValueError if impossible."""
    resolved = resolve_backend(requested, h)
    if resolved == "torch":
        return "torch"
    if not liger_available():
        if requested == "auto":
            return "torch"  # auto asks for kernels only where they are installed
        raise ValueError("MegaConfig.kernel_backend='triton': the fused LM-head loss needs liger-kernel "
                         "(pip install 'megatrain[gpu]'); use 'auto' or 'torch'")
    return "triton"


def lm_head_ce_sum(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   block: int = 1024, backend: str = "torch") -> torch.Tensor:
    """Sum over targets != -100 of cross-entropy(h @ weight^T + bias, targets); `block` rows at a time on the
    PyTorch path (Liger chunks by itself)."""
    if block < 1:
        raise ValueError(f"block={block}: expected >= 1")
    d = h.shape[-1]
    h2, t2 = h.reshape(-1, d).contiguous(), targets.reshape(-1)
    if t2.shape[0] != h2.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match h {tuple(h.shape)}")
    if h2.shape[0] == 0:
        return (h2.sum() * 0 + weight.sum() * 0).float()
    if loss_backend(backend, h2) == "triton":
        return liger_ce_sum(h2, weight, bias, t2)
    return blockwise_ce_sum(h2, weight, bias, t2, block)
