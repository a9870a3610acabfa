"""One MEGA layer: moving-average gated attention, then the normalized feed-forward network (optional).

Use:
    block = MegaBlock(config)
    y = block(x, SeqContext(mask, doc_ids, ema_boundary), cache=None)     # x [B, L, D]
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatrain.model.mega.attention import LayerCache, MovingAverageGatedAttention
from megatrain.model.mega.config import MegaConfig
from megatrain.model.context import SeqContext
from megatrain.model.layers import Dropout, activation, make_norm
from megatrain.model.pieces import Pieces


class NormalizedFFN(nn.Module):
    """x + dropout(fc2(dropout(act(fc1(norm(x)))))), norm before or after (normalize_before_ffn)."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        self.prenorm = config.normalize_before_ffn
        self.norm = make_norm(config)
        self.fc1 = nn.Linear(config.hidden_size, config.nffn_hidden_size)
        self.fc2 = nn.Linear(config.nffn_hidden_size, config.hidden_size)
        self.act = activation(config.activation)
        self.hidden_dropout = Dropout(config.nffn_activation_dropout_prob, config.use_feature_dropout)
        self.dropout = Dropout(config.dropout_prob, config.use_feature_dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.norm(x, mask) if self.prenorm else x
        h = self.dropout(self.fc2(self.hidden_dropout(self.act(self.fc1(h)))))
        out = h + x
        return out if self.prenorm else self.norm(out, mask)


class MegaBlock(Pieces, nn.Module):
    def __init__(self, config: MegaConfig):
        super().__init__()
        self.config = config
        self.attn = MovingAverageGatedAttention(config)
        self.ffn = NormalizedFFN(config) if config.use_normalized_ffn else None

    # the segmented forward's interface (megatrain/model/segments.py): one pre-pass stage, both EMA directions
    prepass_stages = 1

    def needs_prepass(self, sequence_parallel: bool) -> bool:
        return self.config.bidirectional or sequence_parallel

    def edge_states(self, x: torch.Tensor, ctx: SeqContext, stage: int) -> None:
        """The norm + EMA on one segment, reporting both directions' states to ctx.ema_boundary."""
        self.attn.ema(self.attn.ema_input(x, ctx.mask), mask=ctx.mask, doc_ids=ctx.doc_ids, boundary=ctx.ema_boundary)

    def forward(self, x: torch.Tensor, ctx: SeqContext = SeqContext(),
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        x = self.attn(x, ctx, cache=cache)
        if self.ffn is None:
            return x
        # a piece of its own (nested in the layer's): checkpointed, it keeps only its input while the layer is
        # recomputed in backward
        return self.run_piece("ffn", self.ffn, x, ctx.mask)
