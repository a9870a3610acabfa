"""The Megalodon backbone: embeddings + layers + the final timestep norm -> last hidden state (pure PyTorch;
imports nothing distributed).

Use:
    from megatrain.model import MegalodonConfig, MegalodonModel
    backbone = MegalodonModel(MegalodonConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, chunk_size=16,
                                              norm_num_groups=4, shared_representation_size=32,
                                              intermediate_size=64, nffn_hidden_size=128))
    h = backbone(input_ids, attention_mask=None, doc_ids=None, ema_boundary=None)   # [B, L, D]
    cache = backbone.new_cache(); h = backbone(new_ids, cache=cache)   # incremental decoding (model/generate.py)
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_megalodon.py

One layer (MegalodonBlock), the reference code's two-hop residual: y = Attn(x) (its own "+ x" inside: timestep
norm, complex EMA, gated normalized attention, megalodon/attention.py), then out = FFN(LayerNorm(y)) + x (the
layer's *input* again, not y), the FFN silu or SwiGLU, optionally rescaled per layer (rescale_nffn). The backbone
embeds (times sqrt(D) with scale_embedding; dropout), runs the layers, and applies the final timestep norm.
Any length works: the input is padded to whole chunks inside (padding counts nowhere: not in the statistics, not
in the EMA's input, not as a key) and cut back. `doc_ids` restarts every layer's statistics and EMA state and
masks attention between documents. `ema_boundary` (sequence parallelism) carries, per layer, the timestep norm's
statistics and the complex EMA's state, and the final norm's statistics, between slices. With a `MegalodonCache`
only the new tokens are fed (each layer keeps its statistics, EMA state and current-chunk keys/values).
Each layer is the piece "layer" (megatrain/model/pieces.py); config.segment_size > 0 runs every layer in segments
(megatrain/model/segments.py), each (layer, segment) a piece "segment": the same result with activation memory
O(segment) inside a layer when checkpointed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain.model.context import SeqContext, check_ids, check_masks, pad_to_chunks
from megatrain.model.layers import Dropout
from megatrain.model.megalodon.attention import LayerCache, MegalodonAttention
from megatrain.model.megalodon.config import MegalodonConfig
from megatrain.model.megalodon.norms import OffsetLayerNorm, TimestepNorm
from megatrain.model.pieces import Pieces
from megatrain.model.segments import forward_segmented


@dataclass
class MegalodonCache:
    """Incremental-decoding state of a whole model: one LayerCache per layer + the final norm's statistics."""

    layers: list = field(default_factory=list)
    final_state: Any = None

    @property
    def pos(self) -> int:
        return self.layers[0].pos if self.layers else 0


class MegalodonFFN(nn.Module):
    """fc2(dropout(act(fc1(LN(y))) [* fc3(LN(y))])) (* alpha) + residual; no biases (as the reference)."""

    def __init__(self, config: MegalodonConfig, layer_index: int):
        super().__init__()
        d, f = config.hidden_size, config.nffn_hidden_size
        self.norm = OffsetLayerNorm(d, config.norm_eps, config.norm_affine)
        self.fc1 = nn.Linear(d, f, bias=False)
        self.fc2 = nn.Linear(f, d, bias=False)
        self.fc3 = nn.Linear(d, f, bias=False) if config.swiglu else None
        self.alpha = nn.Parameter(torch.full((d,), 0.1 * 0.5 ** layer_index)) if config.rescale_nffn else None
        self.hidden_dropout = Dropout(config.hidden_dropout_prob)
        self.dropout = Dropout(config.dropout_prob)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        h = self.norm(y)
        hidden = F.silu(self.fc1(h))
        if self.fc3 is not None:
            hidden = hidden * self.fc3(h)
        out = self.dropout(self.fc2(self.hidden_dropout(hidden)))
        return (out if self.alpha is None else out * self.alpha) + residual


class MegalodonBlock(Pieces, nn.Module):
    def __init__(self, config: MegalodonConfig, layer_index: int = 0):
        super().__init__()
        self.config = config
        self.attn = MegalodonAttention(config)
        self.ffn = MegalodonFFN(config, layer_index)

    # the segmented forward's interface (megatrain/model/segments.py): the norm's statistics (stage 0), then the
    # EMA state, whose input needs the norm's incoming statistics (stage 1)
    prepass_stages = 2

    def needs_prepass(self, sequence_parallel: bool) -> bool:
        return sequence_parallel

    def edge_states(self, x: Tensor, ctx: SeqContext, stage: int) -> None:
        xn, _ = self.attn.timenorm(x, ctx.mask, ctx.doc_ids, boundary=ctx.ema_boundary)
        if stage == 1:
            self.attn.cema(xn, ctx.mask, ctx.doc_ids, boundary=ctx.ema_boundary)

    def forward(self, x: Tensor, ctx: SeqContext = SeqContext(), cache: Optional[LayerCache] = None) -> Tensor:
        y = self.attn(x, ctx, cache=cache)
        # a piece of its own (nested in the layer's): checkpointed, it keeps only its inputs while the layer is
        # recomputed in backward
        return self.run_piece("ffn", self.ffn, y, x)


@torch.no_grad()
def init_weights_(root: nn.Module, config: MegalodonConfig) -> None:
    """The reference code's init: every linear by init_mode ("he": kaiming normal with a = sqrt(5), i.e. std
    1/sqrt(3 fan_in); "bert": normal(0, 0.02); "xavier": uniform; "gaussian": truncated normal(0, 1/sqrt(fan_in)))
    with zero biases; the embedding (and an untied head) truncated normal(0, 1/sqrt(D), +-3 std). Norm weights start
    at 0 (their "+1"), the complex EMA initialises itself."""
    for m in root.modules():
        if isinstance(m, nn.Linear):
            if config.init_mode == "he":
                nn.init.kaiming_normal_(m.weight, a=math.sqrt(5.0))
            elif config.init_mode == "bert":
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif config.init_mode == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                std = m.weight.shape[1] ** -0.5
                nn.init.trunc_normal_(m.weight, 0.0, std, -3 * std, 3 * std)
            if m.bias is not None:
                m.bias.zero_()


def init_embedding_(weight: Tensor, dim: int) -> None:
    std = dim ** -0.5
    with torch.no_grad():
        nn.init.trunc_normal_(weight, 0.0, std, -3 * std, 3 * std)


class MegalodonModel(Pieces, nn.Module):
    """Embeddings + num_hidden_layers MegalodonBlocks + the final timestep norm -> last hidden state [B, L, D]."""

    def __init__(self, config: MegalodonConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_scale = math.sqrt(config.hidden_size) if config.scale_embedding else None
        self.dropout = Dropout(config.dropout_prob)
        self.layers = nn.ModuleList([MegalodonBlock(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = TimestepNorm(config.hidden_size, config.norm_num_groups, config.norm_eps,
                                       config.kernel_backend)
        init_weights_(self, config)
        init_embedding_(self.embed.weight, config.hidden_size)

    def new_cache(self) -> MegalodonCache:
        return MegalodonCache([LayerCache() for _ in self.layers])

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        return self.dropout(x if self.emb_scale is None else x * self.emb_scale)

    # the segmented forward's interface (megatrain/model/segments.py): the layers, then the final norm
    def segment_stages(self) -> list:
        return list(self.layers) + [_FinalNorm(self.final_norm)]

    def layer_input(self, index: int, inp: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        return self.embed_tokens(inp) if index == 0 else inp

    def finish(self, h: Tensor, ctx: SeqContext, final: Optional[Callable], state=None):
        """The final norm (and `final`) on the last layer's output: (output, the norm's state)."""
        h, state = self.final_norm(h, ctx.mask, ctx.doc_ids, state=state, boundary=ctx.ema_boundary)
        return (h if final is None else final(h)), state

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
                ema_boundary: Optional[Callable] = None, cache: Optional[MegalodonCache] = None,
                final: Optional[Callable] = None) -> Tensor:
        """-> last hidden state [B, L, D] (after the final norm), or `final(it)`."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        check_ids("input_ids", input_ids, input_ids.shape, cfg.vocab_size)
        if token_type_ids is not None:
            raise ValueError("token_type_ids: Megalodon has no token type embeddings")
        check_masks(input_ids, attention_mask, doc_ids)
        length = input_ids.shape[1]
        if cache is not None:
            if doc_ids is not None or ema_boundary is not None:
                raise ValueError("doc_ids / ema_boundary cannot be combined with an incremental-decoding cache")
            h = self._forward_cached(input_ids, attention_mask, cache)
            return h if final is None else final(h)

        pad = (-length) % cfg.chunk_size if length > cfg.chunk_size else 0
        if pad:
            if ema_boundary is not None:
                raise ValueError(f"with ema_boundary (sequence parallelism) every slice must be whole chunks: "
                                 f"length {length} is not a multiple of chunk_size {cfg.chunk_size}")
            input_ids, attention_mask, _, doc_ids = pad_to_chunks(pad, input_ids, attention_mask, None, doc_ids,
                                                                  cfg.pad_token_id)

        ctx = SeqContext(attention_mask, doc_ids, ema_boundary)
        if cfg.segment_size and input_ids.shape[1] > cfg.segment_size:
            # the final norm is the last stage there
            h = forward_segmented(self, input_ids, None, ctx, final=final)
        else:
            h = self.embed_tokens(input_ids)
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                h = self.run_piece("layer", _then, self, layer, i == last, final, h, ctx)
        return h[:, :length] if pad else h

    def _forward_cached(self, input_ids: Tensor, attention_mask: Optional[Tensor], cache: MegalodonCache) -> Tensor:
        cfg = self.config
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, model has {len(self.layers)}")
        length = input_ids.shape[1]
        if cache.pos == 0 and length > cfg.chunk_size and length % cfg.chunk_size:
            # a long prompt: whole chunks through the chunked path, the rest incrementally
            head = length - length % cfg.chunk_size
            sl = lambda t, a, b: None if t is None else t[:, a:b]  # noqa: E731
            h1 = self._forward_cached(sl(input_ids, 0, head), sl(attention_mask, 0, head), cache)
            h2 = self._forward_cached(sl(input_ids, head, None), sl(attention_mask, head, None), cache)
            return torch.cat([h1, h2], dim=1)
        h = self.embed_tokens(input_ids)
        ctx = SeqContext(attention_mask)
        for layer, lc in zip(self.layers, cache.layers):
            h = layer(h, ctx, cache=lc)
        h, cache.final_state = self.final_norm(h, attention_mask, state=cache.final_state)
        return h


class _FinalNorm:
    """The final timestep norm as the segmented forward's last stage (one slot: its statistics)."""

    prepass_stages = 1

    def __init__(self, norm: TimestepNorm):
        self.norm = norm

    def needs_prepass(self, sequence_parallel: bool) -> bool:
        return sequence_parallel

    def edge_states(self, x: Tensor, ctx: SeqContext, stage: int) -> None:
        self(x, ctx)

    def __call__(self, x: Tensor, ctx: SeqContext) -> Tensor:
        return self.norm(x, ctx.mask, ctx.doc_ids, boundary=ctx.ema_boundary)[0]


def _then(model: MegalodonModel, layer: nn.Module, last: bool, final: Optional[Callable], h: Tensor,
          ctx: SeqContext) -> Tensor:
    """One layer; the last one also runs the final norm (and `final`) inside its piece."""
    h = layer(h, ctx)
    return model.finish(h, ctx, final)[0] if last else h
