"""Fused LM head + cross-entropy, summed over non-ignored positions (or per token): the entry points the model calls.

    from megatrain.ops.lm_loss import lm_head_ce_sum, lm_head_ce_sum_ref, lm_head_ce_tokens
    loss = lm_head_ce_sum(h, weight, bias, targets, block=1024, backend="torch")
        # h [N, D] or [..., D] (flattened with targets), weight [V, D], bias [V] or None, targets int (-100 =
        # ignored) -> fp32 scalar (fp64 for fp64 inputs on the PyTorch path)
    losses = lm_head_ce_tokens(h, weight, bias, targets, block=1024)
        # the same inputs -> per-token losses shaped like targets (0 where ignored): evaluation by position

Paths (megatrain.ops.lm_loss.*): reference.lm_head_ce_sum_ref (plain F.linear + F.cross_entropy, the oracle),
blockwise.blockwise_ce_sum (PyTorch, `block` rows at a time; see its docstring), liger.liger_ce_sum (Liger-Kernel's
Triton fused linear cross-entropy; optional dependency: pip install 'megatrain[gpu]').
`backend` is a MegaConfig.kernel_backend value, resolved here once (megatrain.ops.backend.resolve_backend, then
Liger's availability): "torch" the blockwise path; "triton" Liger (a one-line ValueError when Liger or Triton
cannot run); "auto" Liger on CUDA when liger-kernel is installed, else blockwise. The per-token losses have one
implementation, the PyTorch one (blockwise.blockwise_ce_tokens; oracle reference.lm_head_ce_tokens_ref): they are
an evaluation output, never a training step's.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatrain.ops.backend import resolve_backend
from megatrain.ops.lm_loss.blockwise import blockwise_ce_sum, blockwise_ce_tokens
from megatrain.ops.lm_loss.liger import liger_available, liger_ce_sum
from megatrain.ops.lm_loss.reference import IGNORE_INDEX, lm_head_ce_sum_ref, lm_head_ce_tokens_ref

__all__ = ["IGNORE_INDEX", "lm_head_ce_sum", "lm_head_ce_sum_ref", "lm_head_ce_tokens", "lm_head_ce_tokens_ref",
           "loss_backend"]


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


def _flat(h: torch.Tensor, targets: torch.Tensor, block: int):
    if block < 1:
        raise ValueError(f"block={block}: expected >= 1")
    d = h.shape[-1]
    h2, t2 = h.reshape(-1, d).contiguous(), targets.reshape(-1)
    if t2.shape[0] != h2.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match h {tuple(h.shape)}")
    return h2, t2


def lm_head_ce_sum(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   block: int = 1024, backend: str = "torch") -> torch.Tensor:
    """Sum over targets != -100 of cross-entropy(h @ weight^T + bias, targets); `block` rows at a time on the
    PyTorch path (Liger chunks by itself)."""
    h2, t2 = _flat(h, targets, block)
    if h2.shape[0] == 0:
        return (h2.sum() * 0 + weight.sum() * 0).float()
    if loss_backend(backend, h2) == "triton":
        return liger_ce_sum(h2, weight, bias, t2)
    return blockwise_ce_sum(h2, weight, bias, t2, block)


def lm_head_ce_tokens(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      block: int = 1024) -> torch.Tensor:
    """cross-entropy(h @ weight^T + bias, targets) per target, shaped like `targets` (0 where it is -100), fp32 at
    least; `block` rows at a time: never more than one [block, V] logits buffer."""
    h2, t2 = _flat(h, targets, block)
    return blockwise_ce_tokens(h2, weight, bias, t2, block).reshape(targets.shape)
