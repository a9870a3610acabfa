"""Which implementation an op runs: a ``MegaConfig.kernel_backend`` value -> "torch" | "triton", per call, by tensor.

    from megatrain.ops.backend import check_backend, resolve_backend
    check_backend(config.kernel_backend)                    # the one check of the value (MegaConfig.validate)
    backend = resolve_backend(config.kernel_backend, x)     # "torch" or "triton"; ValueError if impossible

The one ``backend`` contract of the op dispatchers (``ops.ema.ema_scan``, ``ops.attention.chunk_attention``,
``ops.lm_loss.lm_head_ce_sum``): each takes the config's string ("auto" | "torch" | "triton") and resolves it
once, here, against its own input tensor; the model passes ``config.kernel_backend`` through unchanged.
- ``auto``: Triton kernels for CUDA tensors when Triton is importable, the PyTorch path otherwise (CPU).
- ``torch``: always the PyTorch path.
- ``triton``: always the kernel; on a CPU tensor only under the Triton interpreter (``TRITON_INTERPRET=1``, how CI
  tests kernels). Where it cannot run, a one-line ValueError naming the field -- never a silent fallback.
(An op whose kernel covers only some inputs says which in its own docstring: attention's covers softmax without
attention dropout; the fused LM-head loss also needs liger-kernel, and "auto" uses it only where it is installed.)
"""
from __future__ import annotations

import functools
import os

import torch

KERNEL_BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(requested: str) -> str:
    """`requested` if it is a kernel_backend value, else the one-line ValueError naming the field."""
    if requested not in KERNEL_BACKENDS:
        raise ValueError(f"MegaConfig.kernel_backend={requested!r}: must be one of {', '.join(KERNEL_BACKENDS)}")
    return requested


def resolve_backend(requested: str, tensor: torch.Tensor) -> str:
    """The implementation that runs `requested` on `tensor`'s device: "torch" or "triton" (see the module docstring)."""
    if check_backend(requested) == "torch":
        return "torch"
    runs_here = triton_available() and (tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpreted()))
    if requested == "auto":
        return "triton" if runs_here and tensor.is_cuda else "torch"
    if not runs_here:
        why = ("triton is not installed" if not triton_available() else
               f"the tensors are on {tensor.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 on CPU)")
        raise ValueError(f"MegaConfig.kernel_backend='triton': cannot run here: {why}; use 'auto' or 'torch'")
    return "triton"
