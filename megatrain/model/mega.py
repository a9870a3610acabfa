"""MEGA backbone and language-model heads (pure PyTorch; imports nothing distributed).

Use:
    from megatrain.model import MegaConfig, MegaForCausalLM
    model = MegaForCausalLM(MegaConfig(vocab_size=256, hidden_size=64, is_decoder=True, bidirectional=False,
                                       use_chunking=True, chunk_size=128))
    out = model(input_ids, attention_mask=None, token_type_ids=None, labels=None, doc_ids=None,
                ema_boundary=None, labels_shifted=False, loss_reduction="mean")
    out.logits [B, L, V]; out.loss; out.num_loss_tokens
    out = model(input_ids, labels=labels, return_logits=False)   # training: blockwise loss, no [B, L, V] logits
                                                                   # (LMHead's forward: works under ZeRO-3 too)

Any length works with chunking: the sequence is padded to a multiple of chunk_size inside (padding masked out of
the EMA, the attention and batch-norm statistics) and the outputs are cut back to L. `doc_ids` resets the EMA and
masks attention between documents. `ema_boundary` (sequence parallelism) is handed to every layer's EMA. With a
`MegaCache` (see generate.py) the forward runs incrementally: only the new tokens are fed.
config.gradient_checkpointing recomputes each layer in backward (the EMA and the NFFN as nested checkpoints).
config.segment_size > 0 runs every layer in segments of that many tokens, each (layer, segment) its own checkpoint
(megatrain/model/segments.py): the same result with activation memory O(segment) inside a layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.model.attention import LayerCache, MovingAverageGatedAttention, RotaryRelativeBias, SimpleRelativeBias
from megatrain.model.blocks import MegaBlock
from megatrain.model.config import MegaConfig
from megatrain.model.context import SeqContext
from megatrain.model.layers import checkpointed
from megatrain.model.segments import forward_segmented
from megatrain.ops.lm_loss import IGNORE_INDEX, lm_head_ce_sum

# positions per block of the fused LM-head loss (return_logits=False): one [block, V] buffer; at V=8K, 1024 is
# as fast as 2048/4096 (single-thread CPU, 16K tokens) with a quarter of 4096's 128 MB
LOSS_BLOCK_TOKENS = 1024


@dataclass
class MegaCache:
    """Incremental-decoding state of a whole model: one LayerCache per layer (EMA state + current-chunk K/V)."""

    layers: list = field(default_factory=list)

    @property
    def pos(self) -> int:
        return self.layers[0].pos if self.layers else 0


@dataclass
class MegaOutput:
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    num_loss_tokens: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    cache: Optional[MegaCache] = None


def _check_ids(name: str, t: Optional[torch.Tensor], shape, upper: int, allow: Optional[int] = None):
    if t is None:
        return
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    ok = (t >= 0) & (t < upper)
    if allow is not None:
        ok |= t == allow
    if not bool(ok.all()):
        bad = t[~ok][0].item()
        raise ValueError(f"{name} contains {bad}, outside [0, {upper})")


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


class MegaModel(nn.Module):
    """Embeddings + num_hidden_layers MegaBlocks -> last hidden state [B, L, D] (no final norm, as transformers)."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = MegaEmbeddings(config)
        self.layers = nn.ModuleList([MegaBlock(config) for _ in range(config.num_hidden_layers)])
        init_weights_(self, config)

    def new_cache(self) -> MegaCache:
        if self.config.bidirectional:
            raise ValueError("incremental decoding needs bidirectional=False (a bidirectional EMA sees the future)")
        return MegaCache([LayerCache() for _ in self.layers])

    def _validate(self, input_ids, attention_mask, token_type_ids, doc_ids):
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        _check_ids("input_ids", input_ids, input_ids.shape, cfg.vocab_size)
        if token_type_ids is not None:
            if not cfg.add_token_type_embeddings and bool((token_type_ids != 0).any()):
                raise ValueError("token_type_ids given but config.add_token_type_embeddings=False")
            _check_ids("token_type_ids", token_type_ids, input_ids.shape, cfg.type_vocab_size)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {tuple(input_ids.shape)}")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must contain only 0 and 1")
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected {tuple(input_ids.shape)}")

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
        + tanh) run inside the last layer's checkpoints, so that with gradient checkpointing neither the backbone
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
            # pad to whole chunks; the padding is masked out everywhere, so real positions are unaffected
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            input_ids = F.pad(input_ids, (0, pad), value=cfg.pad_token_id if cfg.pad_token_id is not None else 0)
            attention_mask = F.pad(attention_mask, (0, pad), value=0)
            if token_type_ids is not None:
                token_type_ids = F.pad(token_type_ids, (0, pad), value=0)
            if doc_ids is not None:
                doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(-1, pad)], dim=1)

        ctx = SeqContext(attention_mask, doc_ids, ema_boundary)
        use_ckpt = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if cfg.segment_size and input_ids.shape[1] > cfg.segment_size:
            h = forward_segmented(self, input_ids, token_type_ids, ctx, checkpoint=use_ckpt, final=final)
        else:
            h = self.embeddings(input_ids, token_type_ids)
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                h = checkpointed(_then, layer, final if i == last else None, h, ctx, enabled=use_ckpt)
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


class LMHead(nn.Linear):
    """The vocabulary projection [D] -> [V] (an nn.Linear: same parameter names, tied or not). Its forward also owns
    the fused blockwise loss (`labels` given): the head weight is then read inside this module's forward.

    Why here and not as `lm_head_ce_sum(h, self.lm_head.weight, ...)` in the LM's forward: wrappers that shard
    parameters and gather them around each module's forward (DeepSpeed ZeRO-3, FSDP) only materialise a weight
    while its module runs. A tied weight is the embedding's parameter too, and such wrappers gather a parameter for
    every module that holds it, so it is whole inside this forward either way. The alternative -- registering the
    weight as a ZeRO-3 "external parameter" of the root module from megatrain/parallel/ -- would keep the
    [V, D] weight gathered for the whole model forward and would teach the parallel code about the model's
    layout; this keeps the model free of distributed code and works for any per-module wrapper."""

    def __init__(self, hidden_size: int, vocab_size: int, kernel_backend: str = "auto"):
        super().__init__(hidden_size, vocab_size)
        self.kernel_backend = kernel_backend  # MegaConfig.kernel_backend: blockwise (CPU) or Liger (CUDA) loss

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None,
                block: int = LOSS_BLOCK_TOKENS) -> torch.Tensor:
        """labels None: logits [..., V]. labels [...] (IGNORE_INDEX = no loss): the fp32 sum of the token
        cross-entropies, computed `block` positions at a time (megatrain.ops.lm_loss): no [..., V] tensor."""
        if labels is None:
            return super().forward(h)
        return lm_head_ce_sum(h, self.weight, self.bias, labels, block, backend=self.kernel_backend).float()


class _MegaLM(nn.Module):
    """Shared by the causal and masked LM: backbone, optional dense+tanh, vocabulary head (tied or not), loss."""

    causal: bool

    def __init__(self, config: MegaConfig):
        super().__init__()
        if config.is_decoder != self.causal:
            raise ValueError(f"{type(self).__name__} needs config.is_decoder={self.causal}")
        self.config = config
        self.mega = MegaModel(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size) if config.add_lm_hidden_dense_layer else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, config.kernel_backend)
        self.init_weights()

    def init_weights(self) -> None:
        init_weights_(self, self.config)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.mega.embeddings.word_embeddings.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.mega.embeddings.word_embeddings

    def new_cache(self) -> MegaCache:
        return self.mega.new_cache()

    def _dense_tanh(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h if self.dense is None else self._dense_tanh(h))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        ema_boundary: Optional[Callable] = None,
        labels_shifted: bool = False,
        loss_reduction: str = "mean",
        cache: Optional[MegaCache] = None,
        return_logits: bool = True,
    ) -> MegaOutput:
        """See the module docstring. `return_logits=False` (needs labels) computes the loss in blocks of
        LOSS_BLOCK_TOKENS positions with the fused head + cross-entropy of megatrain.ops.lm_loss (the gradient
        of h and the head is formed block by block during the forward): the [B, L, V] logits (and their
        log-softmax and gradient) never exist at once -- at L=32K, V=8K that is ~1 GB each. out.logits is None."""
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: expected 'mean' or 'sum'")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False only makes sense with labels (the loss is all that is computed)")
        # the loss alone: the dense + tanh runs inside the last layer's checkpoint(s) (per segment when segmented),
        # so its input and output are not kept for the whole sequence (2 of ~7 [L, D] tensors at a step's peak)
        fold_dense = not return_logits and self.dense is not None
        h = self.mega(input_ids, attention_mask, token_type_ids, doc_ids, ema_boundary, cache,
                      final=self._dense_tanh if fold_dense else None)
        out = MegaOutput(last_hidden_state=None if fold_dense else h, cache=cache)
        if return_logits:
            out.logits = self._logits(h)
        if labels is None:
            return out
        _check_ids("labels", labels, input_ids.shape, self.config.vocab_size, allow=IGNORE_INDEX)
        if self.causal and not labels_shifted:
            # HF style: position t predicts token t+1. Shift the labels, not the logits (no [B, L-1, V] copy).
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        n = (labels != IGNORE_INDEX).sum()
        if return_logits:
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            # h is already dense + tanh (folded into the last layer's checkpoint); the head + CE is fused and
            # blockwise, inside the head module's forward (see LMHead: ZeRO-3 gathers the weight for it)
            loss = self.lm_head(h, labels)
        # mean over counted tokens; 0 (not NaN) when every label is ignored
        out.loss = loss if loss_reduction == "sum" else loss / n.clamp(min=1)
        out.num_loss_tokens = n
        return out


class MegaForCausalLM(_MegaLM):
    causal = True


class MegaForMaskedLM(_MegaLM):
    causal = False


def build_model(config: MegaConfig) -> _MegaLM:
    """The language model of a run: causal if ``config.is_decoder``, else masked. (In a run config the objective
    decides ``is_decoder``: see megatrain/config.py.)"""
    return (MegaForCausalLM if config.is_decoder else MegaForMaskedLM)(config)
