"""MEGA's non-softmax attention activations (also in megatrain.model.layers.activation's table).

    from megatrain.ops.attention.activations import ATTENTION_ACTIVATIONS   # {"laplace": laplace, "relu2": relu2}
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    # MEGA's Laplace attention activation: a bounded, smooth stand-in for relu^2 (constants from the paper)
    return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * math.sqrt(2.0))))


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


ATTENTION_ACTIVATIONS = {"laplace": laplace, "relu2": relu2}
