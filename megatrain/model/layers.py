"""Small building blocks: activations, (feature) dropout, MEGA's five sequence norms (shared by the families).

Use:
    act = activation("gelu_accurate"); drop = Dropout(0.1, featurewise=True); norm = make_norm(config)
    y = norm(x, mask)          # x [B, L, D]; mask [B, L] (1 = real token) is only used by the batch norms

Parameter/buffer names match transformers' modules (after `MegaSequenceNorm.norm`), so the HF key map only has to
rename module paths, never leaf names: ScaleNorm.scalar, RMSNorm.weight, LayerNorm.weight/bias,
BatchNorm.weight/bias/running_mean/running_var/num_batches_tracked.

Differences from transformers 4.57.6 (each on purpose, each tested):
- RMSNorm normalizes (HF's multiplies by the weight and discards the normalization) unless
  `config.hf_rmsnorm_noop` asks for HF's behaviour (set by load_hf on HF rmsnorm checkpoints).
- Batch norm statistics in training use real tokens only (HF averages padding in, so a padded batch shifts the
  statistics of every sample). "syncbatchnorm" is the same module: statistics are per process (the model imports
  nothing distributed); with one process that is exactly SyncBatchNorm.
- Feature dropout drops whole feature channels of a sample ([B, 1, F] mask). HF applies dropout2d to the 4-D
  value tensor [B, chunks, E, C], where the "channel" axis is the chunk index: it drops whole chunks of values
  (without chunking, the whole value tensor of a sample) instead of features.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.ops.attention.activations import laplace, relu2


def _gelu_accurate(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of GELU as used by MEGA/fairseq ("gelu_accurate")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "linear": lambda x: x,
    "gelu": F.gelu,
    "gelu_accurate": _gelu_accurate,
    "laplace": laplace,
    "relu2": relu2,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class Dropout(nn.Module):
    """Standard dropout, or feature dropout: one keep/drop decision per (sample, feature) for all positions."""

    def __init__(self, p: float, featurewise: bool = False):
        super().__init__()
        self.p = p
        self.featurewise = featurewise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.featurewise:
            return F.dropout(x, self.p, training=True)
        # x is [B, ..., F]: the same mask for every position of a sample
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, featurewise={self.featurewise}"


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32 also for bf16/fp16 activations (a no-op cast for fp32; fp64 stays fp64)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(torch.mean(torch.square(xf), dim=-1, keepdim=True) + eps)).to(x.dtype)


class ScaleNorm(nn.Module):
    """x * scalar / rms(x): one learned scalar for all features."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.scalar = nn.Parameter(torch.ones(1)) if affine else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = rms_normalize(x, self.eps)
        return y * self.scalar if self.scalar is not None else y


class RMSNorm(nn.Module):
    """x * weight / rms(x). `hf_noop=True` reproduces transformers' MegaRMSNorm: x * weight, no normalization."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, hf_noop: bool = False):
        super().__init__()
        self.eps = eps
        self.hf_noop = hf_noop
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.hf_noop:
            x = rms_normalize(x, self.eps)
        return x * self.weight if self.weight is not None else x

    def extra_repr(self) -> str:
        return f"eps={self.eps}, hf_noop={self.hf_noop}"


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


class BatchNorm(nn.Module):
    """Per-feature batch norm over all real tokens of the batch (padding excluded); running stats in eval.
    `update_stats = False` normalizes with the batch's statistics without updating the running ones: an activation
    checkpoint's recompute sets it (megatrain/parallel/checkpointing.py), so a recomputed forward does not count
    the batch twice."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.update_stats = True
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training:
            xf = x.float().reshape(-1, x.shape[-1])
            if mask is not None:
                w = mask.reshape(-1, 1).to(xf.dtype)
            else:
                w = torch.ones_like(xf[:, :1])
            n = w.sum()
            if n < 2:
                raise ValueError("BatchNorm in training needs at least 2 real tokens in the batch")
            mean = (xf * w).sum(0) / n
            var = (torch.square(xf - mean) * w).sum(0) / n  # biased, used to normalize (as nn.BatchNorm1d)
            if self.update_stats:
                self._update_running_stats(mean, var, n)
        else:
            mean, var = self.running_mean, self.running_var
        y = ((x.float() - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.to(self.running_mean.dtype))
        unbiased = var * n / (n - 1)  # running variance is unbiased, as nn.BatchNorm1d
        self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.to(self.running_var.dtype))
        self.num_batches_tracked.add_(1)


def make_norm(config) -> nn.Module:
    """The norm named by config.normalization_type, eps=1e-5 for all (as transformers' MegaSequenceNorm)."""
    dim, affine, kind = config.hidden_size, config.norm_affine, config.normalization_type
    if kind == "scalenorm":
        return ScaleNorm(dim, affine=affine)
    if kind == "layernorm":
        return LayerNorm(dim, affine=affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, affine=affine, hf_noop=config.hf_rmsnorm_noop)
    if kind in ("batchnorm", "syncbatchnorm"):
        return BatchNorm(dim, affine=affine)
    raise ValueError(f"unknown normalization_type {kind!r}")
