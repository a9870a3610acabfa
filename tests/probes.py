"""Test helpers that watch what PyTorch allocates."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MaxNumel(TorchDispatchMode):
    """`with MaxNumel() as probe: ...` -> probe.max_numel, the largest floating tensor any op produced (floating
    only: the Triton interpreter moves kernel arguments as uint8 copies of their storage)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.max_numel = max(self.max_numel, t.numel())
        return out
