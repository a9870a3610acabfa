"""Moving-average gated attention (the MEGA sub-layer): EMA, gates, single-head chunked attention.

Use (inside a MegaBlock; shapes batch-first):
    attn = MovingAverageGatedAttention(config)
    y = attn(x, SeqContext(mask, doc_ids, ema_boundary))   # x [B, L, D], L a multiple of chunk_size if chunking
    y = attn(x_new, SeqContext(mask=m_new), cache=layer_cache)  # incremental decoding (LayerCache below)

One attention op serves training and decoding: megatrain.ops.attention.chunk_attention (the PyTorch path, or
FlexAttention kernels per `config.kernel_backend`), masked by "query i may look at key j" (causal, same chunk,
real key, same document). Differences from transformers:
- A query with no valid key gets zero attention (HF's softmax turns it into NaN, which the next EMA spreads over
  the whole sample: left padding in a causal LM).
- laplace/relu2 divide by the number of valid keys of the query (HF: i+1 when causal, real keys of the chunk
  otherwise); equal for every HF-supported input, and correct with left padding and packed documents.
- The relative bias takes query/key positions, so decoding reuses it with absolute positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.model.mega.config import MegaConfig
from megatrain.model.context import SeqContext, cached_keys, keep_current_chunk
from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.model.layers import Dropout, activation, make_norm
from megatrain.model.pieces import Pieces
from megatrain.ops.attention import chunk_attention


class SimpleRelativeBias(nn.Module):
    """bias[i, j] = weight[center + j - i]; the table has 2 * max_positions - 1 entries (as transformers)."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        # transformers centres the table on chunk_size whenever chunk_size > 0 (even without use_chunking) and
        # then limits the attention span to it; keep that so HF checkpoints compute the same thing.
        self.span = config.chunk_size if config.chunk_size > 0 else config.max_positions
        self.weight = nn.Parameter(torch.zeros(2 * config.max_positions - 1))

    def forward(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        span = int(torch.max(qpos.max(), kpos.max())) + 1
        if span > self.span:
            raise ValueError(
                f"attention span {span} exceeds the simple relative bias limit {self.span} "
                "(max_positions, or chunk_size when set); use chunking or relative_positional_bias='rotary'"
            )
        return self.weight[self.span - 1 + kpos[None, :] - qpos[:, None]]


class RotaryRelativeBias(nn.Module):
    """bias[i, j] = rot(alpha, i) . rot(beta, j), rot = rotation of feature pairs (k, k + Z/2) by pos * theta_k."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        z = config.shared_representation_size
        self.alpha = nn.Parameter(torch.zeros(1, z))
        self.beta = nn.Parameter(torch.zeros(1, z))
        self.half = z // 2

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # frequencies and angles in fp32 whatever the model dtype (not a buffer: model.to(bf16) would round it)
        steps = torch.arange(self.half, device=x.device, dtype=torch.float32)
        angle = pos.to(torch.float32)[:, None] * torch.exp(steps * -(math.log(10000) / self.half))[None, :]
        sin, cos = torch.sin(angle), torch.cos(angle)
        x1, x2 = torch.chunk(x.float(), 2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def forward(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return self._rotate(self.alpha, qpos) @ self._rotate(self.beta, kpos).transpose(0, 1)


@dataclass
class LayerCache:
    """Decoding state of one layer: EMA state + keys/values of the current chunk (all keys without chunking)."""

    ema_state: Optional[torch.Tensor] = None  # [B, D, N] fp32
    key: Optional[torch.Tensor] = None  # [B, S, Z]
    value: Optional[torch.Tensor] = None  # [B, S, E]
    key_mask: Optional[torch.Tensor] = None  # [B, S] bool, real keys
    pos: int = 0  # absolute position of the next token


def _build_ema(config: MegaConfig) -> MultiDimDampedEMA:
    ema = MultiDimDampedEMA(config.hidden_size, config.ema_projection_size, config.bidirectional,
                            truncation=config.truncation, block_size=config.ema_block_size,
                            kernel_backend=config.kernel_backend)
    ema.reset_parameters(config.ema_delta_alpha_range, config.ema_beta_range, config.ema_gamma_omega_range)
    return ema


class MovingAverageGatedAttention(Pieces, nn.Module):
    def __init__(self, config: MegaConfig):
        super().__init__()
        self.config = config
        d, z, e = config.hidden_size, config.shared_representation_size, config.intermediate_size
        self.causal = config.is_decoder
        self.chunk = config.chunk_size if config.use_chunking else None
        self.act = activation(config.activation)
        self.attn_act_name = config.attention_activation
        self.scaling = z**-0.5

        self.norm = make_norm(config)
        self.ema = _build_ema(config)
        self.v_proj = nn.Linear(d, e)
        self.mx_proj = nn.Linear(d, z + e + 2 * d)
        self.h_proj = nn.Linear(e, d)
        self.qk_weight = nn.Parameter(torch.zeros(2, z))
        self.qk_bias = nn.Parameter(torch.zeros(2, z))
        self.rel_pos = (
            RotaryRelativeBias(config) if config.relative_positional_bias == "rotary" else SimpleRelativeBias(config)
        )
        featurewise = config.use_feature_dropout
        self.dropout = Dropout(config.dropout_prob, featurewise)
        self.hidden_dropout = Dropout(config.hidden_dropout_prob, featurewise)
        self.attention_dropout = Dropout(config.attention_probs_dropout_prob)

    # ---- attention core (megatrain.ops.attention) ---------------------------------------------------------------
    def _attend(self, q, k, v, bias, **mask) -> torch.Tensor:
        """q [B, n, Tq, Z], k [B, n, Tk, Z], v [B, n, Tk, E] -> [B, n, Tq, E]; mask: chunk_attention's mask args."""
        return chunk_attention(q, k, self.hidden_dropout(v), bias, scale=self.scaling, activation=self.attn_act_name,
                               dropout_p=self.attention_dropout.p if self.training else 0.0,
                               backend=self.config.kernel_backend, **mask)

    def _full_attention(self, q, k, v, mask, doc_ids):
        """Training / scoring path over a whole (chunk-aligned) sequence."""
        b, length, _ = q.shape
        c = self.chunk if self.chunk is not None and length > self.chunk else length
        if length % c:
            raise ValueError(f"sequence length {length} is not a multiple of chunk_size {c} (pad it: MegaModel does)")
        n = length // c
        q, k, v = (t.reshape(b, n, c, t.shape[-1]) for t in (q, k, v))
        pos = torch.arange(c, device=q.device)
        bias = self.rel_pos(pos, pos).to(q.dtype)
        key_mask = None if mask is None else mask.reshape(b, n, c).bool()
        doc = None if doc_ids is None else doc_ids.reshape(b, n, c)
        return self._attend(q, k, v, bias, causal=self.causal, key_mask=key_mask, doc_ids=doc).reshape(b, length, -1)

    def _cached_attention(self, q, k, v, mask, cache: LayerCache):
        """Decoding path: new tokens at positions [P, P+T) attend to cached keys of their chunk and to each other."""
        b, t, _ = q.shape
        p0 = cache.pos
        k, v, key_mask = cached_keys(cache, k, v, mask)
        s = k.shape[1]
        qpos = torch.arange(p0, p0 + t, device=q.device)
        kpos = torch.arange(p0 + t - s, p0 + t, device=q.device)
        valid = (kpos[None, :] <= qpos[:, None])[None] & key_mask[:, None, :]
        if self.chunk is not None:
            valid = valid & (kpos[None, :] // self.chunk == qpos[:, None] // self.chunk)[None]
            bias = self.rel_pos(qpos % self.chunk, kpos % self.chunk)
        else:
            bias = self.rel_pos(qpos, kpos)
        out = self._attend(q[:, None], k[:, None], v[:, None], bias.to(q.dtype), valid=valid[:, None])[:, 0]
        keep_current_chunk(cache, k, v, key_mask, p0 + t, self.chunk)
        return out

    # ---- the sub-layer ----------------------------------------------------------------------------------------
    def ema_input(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """What the EMA (and the value projection) read: the normed input with pre-norm, else the input.
        (Also used by the segmented layers' state pre-pass, megatrain/model/segments.py.)"""
        return self.norm(x, mask) if self.config.normalize_before_mega else x

    def forward(self, x: torch.Tensor, ctx: SeqContext = SeqContext(),
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        cfg = self.config
        mask, doc_ids, ema_boundary = ctx.mask, ctx.doc_ids, ctx.ema_boundary
        d, z, e = cfg.hidden_size, cfg.shared_representation_size, cfg.intermediate_size
        residual = x
        x = self.ema_input(x, mask)
        value = self.act(self.v_proj(x))

        if cache is None and ema_boundary is None:
            # a piece of its own (nested in the layer's): checkpointed, the EMA's internals are not kept while the
            # layer is recomputed. (Not with a boundary: a recompute would run the sequence-parallel exchange again.)
            ema_out, _ = self.run_piece("ema", self.ema, x, mask, doc_ids)
        elif cache is None:
            ema_out, _ = self.ema(x, mask=mask, doc_ids=doc_ids, boundary=ema_boundary)
        else:
            ema_out, cache.ema_state = self.ema(x, mask=mask, state=cache.ema_state)
        ema_out = self.dropout(ema_out)

        gate_u, qk_gates, hx = torch.split(self.mx_proj(ema_out), [d, z + e, d], dim=-1)
        gate_u = torch.sigmoid(gate_u)
        qk, gate_r = torch.split(F.silu(qk_gates), [z, e], dim=-1)
        q = qk * self.qk_weight[0] + self.qk_bias[0]
        k = qk * self.qk_weight[1] + self.qk_bias[1]

        if cache is None:
            h = self._full_attention(q, k, value, mask, doc_ids)
        elif cache.pos == 0 and self.chunk is not None and x.shape[1] % self.chunk == 0:
            # a prompt of whole chunks: the chunked path; the next token opens a new chunk, so no K/V to keep
            h = self._full_attention(q, k, value, mask, None)
            cache.pos = x.shape[1]
        else:
            h = self._cached_attention(q, k, value, mask, cache)

        out = self.dropout(self.act(hx + self.h_proj(h * gate_r)))
        out = torch.addcmul(residual, gate_u, out - residual)  # gated residual: (1 - u) * residual + u * out
        if not cfg.normalize_before_mega:
            out = self.norm(out, mask)
        return out
