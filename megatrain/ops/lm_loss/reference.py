"""Oracle of the fused LM head + cross-entropy: plain F.linear + F.cross_entropy on the full [N, V] logits.

    loss = lm_head_ce_sum_ref(h, weight, bias, targets)   # sum over targets != -100, fp32 (fp64 for fp64 inputs)
    losses = lm_head_ce_tokens_ref(h, weight, bias, targets)  # [N] per target, 0 where it is -100
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_head_ce_sum_ref(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       targets: torch.Tensor) -> torch.Tensor:
    """Oracle: sum of CE(h @ W^T + b, targets) over targets != -100, in fp32 (plain autograd, [N, V] logits)."""
    logits = F.linear(h, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays fp64
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def lm_head_ce_tokens_ref(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor) -> torch.Tensor:
    """Oracle of the per-token losses: CE(h @ W^T + b, targets) per row, 0 where the target is -100, fp32 at least."""
    logits = F.linear(h, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
