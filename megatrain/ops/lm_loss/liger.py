"""The kernel path of the fused LM head + cross-entropy: Liger-Kernel's fused linear cross-entropy (Triton).

    loss = liger_ce_sum(h, weight, bias, targets)   # as megatrain.ops.lm_loss.lm_head_ce_sum; needs liger-kernel
                                                    # (pip install 'megatrain[gpu]') and CUDA or TRITON_INTERPRET=1

Liger does what our blockwise path does (chunks of rows, gradients computed in the forward, never the [N, V]
logits) in Triton kernels: the softmax and its gradient in one pass over each chunk's logits, in place. It takes
the bias directly, ignore_index -100, reduction "sum". Precision as the blockwise path: the matmuls in the inputs'
dtype or the autocast dtype (cast here, autocast off inside: Liger does not follow autocast), the weight gradient
accumulated in fp32 (accum_dtype), the loss fp32. Tied weights: the head weight's gradient is an ordinary autograd
gradient, added to the embedding's by autograd.

Under TRITON_INTERPRET=1 (CPU tests) the variable must be set before liger_kernel is first imported: Triton decides
at decoration time whether a kernel is interpreted.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megatrain.ops.lm_loss.reference import IGNORE_INDEX


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # not installed, or an install that fails at import
        return False
    return True


def liger_ce_sum(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(h.dtype, weight.dtype)
    with torch.autocast(dev, enabled=False):
        hc, wc = h.to(cdt).contiguous(), weight.to(cdt)
        bc = None if bias is None else bias.to(cdt)
        loss = liger_fused_linear_cross_entropy(hc, wc, targets, bias=bc, ignore_index=IGNORE_INDEX, reduction="sum",
                                                accum_dtype=torch.float32)
    return loss.to(torch.promote_types(cdt, torch.float32))
