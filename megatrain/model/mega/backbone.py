"""The MEGA backbone: embeddings + layers -> last hidden state (pure PyTorch; imports nothing distributed).

Use:
    from megatrain.model import MegaConfig, MegaModel
    backbone = MegaModel(MegaConfig(vocab_size=256, hidden_size=64, use_chunking=True, chunk_size=128))
    h = backbone(input_ids, attention_mask=None, token_type_ids=None, doc_ids=None, ema_boundary=None)  # [B, L, D]
    cache = backbone.new_cache(); h = backbone(new_ids, cache=cache)          # incremental decoding (generate.py)
Tests: PYTHONPATH=. python -m pytest -q tests/model

Any length works with chunking: the sequence is padded to a multiple of chunk_size inside (padding masked out of
the EMA, the attention and batch-norm statistics) and the outputs are cut back to L. `doc_ids` resets the EMA and
masks attention between documents. `ema_boundary` (sequence parallelism) is handed to every layer's EMA. With a
`MegaCache` the forward runs incrementally: only the new tokens are fed.
Each layer is the piece "layer" (megatrain/model/pieces.py: activation checkpointing is applied from outside,
megatrain/parallel/checkpointing.py). config.segment_size > 0 runs every layer in segments of that many tokens
instead, each (layer, segment) a piece "segment" (megatrain/model/segments.py): the same result with activation
memory O(segment) inside a layer when checkpointed.
The language models on top (LM heads, loss): megatrain/model/lm.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from megatrain.model.mega.attention import LayerCache, MovingAverageGatedAttention, RotaryRelativeBias, SimpleRelativeBias
from megatrain.model.mega.blocks import MegaBlock
from megatrain.model.mega.config import MegaConfig
from megatrain.model.context import SeqContext, check_ids, check_masks, pad_to_chunks
from megatrain.model.pieces import Pieces
from megatrain.model.segments import forward_segmented


@dataclass
class MegaCache:
    """Incremental-decoding state of a whole model: one LayerCache per layer (EMA state + current-chunk K/V)."""

    layers: list = field(default_factory=list)

    @property
    def pos(self) -> int:
        return self.layers[0].pos if self.layers else 0


@torch.no_grad()
def init_weights_(root: nn.Module, config: MegaConfig) -> None:
    """transformers' MEGA initialisation: normal(0, initializer_range) for linears, embeddings, qk weights and
    relative biases; zero biases; the padding embedding row zero. Norms start at identity and the EMA initialises
    its own parameters (from the ema_*_range options) when built."""
    std = config.initializer_range
    for m in root.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, MovingAverageGatedAttention):
            m.qk_weight.normal_(0.0, std)
            m.qk_bias.zero_()
        elif isinstance(m, SimpleRelativeBias):
            m.weight.normal_(0.0, std)
        elif isinstance(m, RotaryRelativeBias):
            m.alpha.normal_(0.0, std)
            m.beta.normal_(0.0, std)


class MegaEmbeddings(nn.Module):
    def __init__(self, config: MegaConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.add_token_type_embeddings else None
        )

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        return x


class MegaModel(Pieces, nn.Module):
    """Embeddings + num_hidden_layers MegaBlocks -> last hidden state [B, L, D] (no final norm, as transformers)."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = MegaEmbeddings(config)
        self.layers = nn.ModuleList([MegaBlock(config) for _ in range(config.num_hidden_layers)])
        init_weights_(self, config)

    # the segmented forward's interface (megatrain/model/segments.py)
    def segment_stages(self) -> list:
        return list(self.layers)

    def layer_input(self, index: int, inp: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        return self.embeddings(inp, token_type_ids) if index == 0 else inp

    def new_cache(self) -> MegaCache:
        if self.config.bidirectional:
            raise ValueError("incremental decoding needs bidirectional=False (a bidirectional EMA sees the future)")
        return MegaCache([LayerCache() for _ in self.layers])

    def _validate(self, input_ids, attention_mask, token_type_ids, doc_ids):
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        check_ids("input_ids", input_ids, input_ids.shape, cfg.vocab_size)
        if token_type_ids is not None:
            if not cfg.add_token_type_embeddings and bool((token_type_ids != 0).any()):
                raise ValueError("token_type_ids given but config.add_token_type_embeddings=False")
            check_ids("token_type_ids", token_type_ids, input_ids.shape, cfg.type_vocab_size)
        check_masks(input_ids, attention_mask, doc_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        ema_boundary: Optional[Callable] = None,
        cache: Optional[MegaCache] = None,
        final: Optional[Callable] = None,
    ) -> torch.Tensor:
        """-> last hidden state [B, L, D], or `final(last hidden state)`: a per-token function (the LM head's dense
        + tanh) run inside the last layer's piece(s), so that with activation checkpointing neither the backbone
        output nor the function's activations are kept for the whole sequence."""
        cfg = self.config
        self._validate(input_ids, attention_mask, token_type_ids, doc_ids)
        length = input_ids.shape[1]
        if cache is not None:
            if doc_ids is not None or ema_boundary is not None:
                raise ValueError("doc_ids / ema_boundary cannot be combined with an incremental-decoding cache")
            h = self._forward_cached(input_ids, attention_mask, token_type_ids, cache)
            return h if final is None else final(h)

        pad = (-length) % cfg.chunk_size if cfg.use_chunking else 0
        if pad:
            if ema_boundary is not None:
                raise ValueError(f"with ema_boundary (sequence parallelism) every slice must be whole chunks: "
                                 f"length {length} is not a multiple of chunk_size {cfg.chunk_size}")
            input_ids, attention_mask, token_type_ids, doc_ids = pad_to_chunks(
                pad, input_ids, attention_mask, token_type_ids, doc_ids, cfg.pad_token_id)

        ctx = SeqContext(attention_mask, doc_ids, ema_boundary)
        if cfg.segment_size and input_ids.shape[1] > cfg.segment_size:
            h = forward_segmented(self, input_ids, token_type_ids, ctx, final=final)
        else:
            h = self.embeddings(input_ids, token_type_ids)
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                h = self.run_piece("layer", _then, layer, final if i == last else None, h, ctx)
        return h[:, :length] if pad else h

    def _forward_cached(self, input_ids, attention_mask, token_type_ids, cache: MegaCache) -> torch.Tensor:
        cfg = self.config
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, model has {len(self.layers)}")
        length = input_ids.shape[1]
        if cfg.use_chunking and cache.pos == 0 and length > cfg.chunk_size and length % cfg.chunk_size:
            # a long prompt: whole chunks through the chunked path, the rest incrementally (no internal padding,
            # which would decay the EMA state past the last real token)
            head = length - length % cfg.chunk_size
            sl = lambda t, a, b: None if t is None else t[:, a:b]  # noqa: E731
            h1 = self._forward_cached(sl(input_ids, 0, head), sl(attention_mask, 0, head),
                                      sl(token_type_ids, 0, head), cache)
            h2 = self._forward_cached(sl(input_ids, head, None), sl(attention_mask, head, None),
                                      sl(token_type_ids, head, None), cache)
            return torch.cat([h1, h2], dim=1)
        h = self.embeddings(input_ids, token_type_ids)
        ctx = SeqContext(attention_mask)
        for layer, lc in zip(self.layers, cache.layers):
            h = layer(h, ctx, cache=lc)
        return h


def _then(layer: nn.Module, final: Optional[Callable], h: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
    h = layer(h, ctx)
    return h if final is None else final(h)
