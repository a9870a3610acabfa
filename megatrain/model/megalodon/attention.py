"""Megalodon's moving-average gated attention: timestep norm, complex EMA, normalized multi-head chunk attention.

Use (inside a MegalodonBlock; shapes batch-first):
    attn = MegalodonAttention(config)
    y = attn(x, SeqContext(mask, doc_ids, ema_boundary))      # x [B, L, D], L a multiple of chunk_size if > it
    y = attn(x_new, SeqContext(mask=m_new), cache=layer_cache) # incremental decoding (LayerCache below)
Tests: PYTHONPATH=. python -m pytest -q tests/model/test_megalodon.py

The sub-layer, as the reference code computes it (megalodon/modules/moving_average_gated_attention.py):
    xn = TSN(x)                                   timestep norm (statistics carried in the cache / across SP ranks)
    mx = RMSNorm(CEMA(xn))                        complex EMA, then RMS norm with weight + 1; hidden dropout
    z  = RMSNorm_head(W_z mx)                     per head, no affine
    q, k = z (gamma_{q,k} + 1) / sqrt(d_head) + beta_{q,k}     no temperature: softmax(q k^T) at scale 1
    v  = silu(W_v xn),  r = silu(W_r mx)
    out = W_h1 mx + W_h2 (hidden_dropout(attn(q, k, v) * r)) (+ dropout) + x
attn is causal softmax attention within chunks of chunk_size, each head on its own slice of z and v, with RoPE
(base rope_base) at the positions inside the chunk; a query with no valid key (left padding) gets 0. One attention
op serves training and decoding: megatrain.ops.attention.chunk_attention (heads fold into its chunk axis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain.model.context import SeqContext, cached_keys, keep_current_chunk
from megatrain.model.layers import Dropout, rms_normalize
from megatrain.model.megalodon.cema import ComplexEMA
from megatrain.model.megalodon.config import MegalodonConfig
from megatrain.model.megalodon.norms import OffsetRMSNorm, TimestepNorm
from megatrain.model.pieces import Pieces
from megatrain.ops.attention import chunk_attention


def rope(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotate feature pairs (2j, 2j+1) of x [..., T, H, d] by pos[t] * base^(-2j/d) (the reference's interleaved
    pairs); pos [T] (positions inside the chunk). Angles and rotation in fp32 whatever x's dtype (fp64 stays fp64)."""
    d = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    freqs = base ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angle = pos.to(dtype)[:, None, None] * freqs                                          # [T, 1, d/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    pairs = x.to(dtype).unflatten(-1, (d // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


@dataclass
class LayerCache:
    """Decoding state of one layer: timestep-norm statistics, complex EMA state, keys/values of the current chunk."""

    norm_state: Any = None                   # (count [B], mean [B, G], var [B, G])
    ema_state: Optional[Tensor] = None       # [B, D, N] complex
    key: Optional[Tensor] = None             # [B, S, H, d] (rotated)
    value: Optional[Tensor] = None           # [B, S, H, e]
    key_mask: Optional[Tensor] = None        # [B, S] bool, real keys
    pos: int = 0                             # absolute position of the next token


class MegalodonAttention(Pieces, nn.Module):
    def __init__(self, config: MegalodonConfig):
        super().__init__()
        self.config = config
        d, z, e, h = (config.hidden_size, config.shared_representation_size, config.intermediate_size,
                      config.num_attention_heads)
        self.heads, self.z_head, self.v_head = h, z // h, e // h
        self.chunk = config.chunk_size
        self.timenorm = TimestepNorm(d, config.norm_num_groups, config.norm_eps, config.kernel_backend)
        self.cema = ComplexEMA(d, config.cema_ndim, config.ema_block_size, config.kernel_backend)
        self.rmsnorm = OffsetRMSNorm(d, config.norm_eps, config.norm_affine)
        self.wv = nn.Linear(d, e)
        self.wz = nn.Linear(d, z)
        self.wr = nn.Linear(d, e)
        self.wh1 = nn.Linear(d, d)
        self.wh2 = nn.Linear(e, d, bias=False)
        self.gamma = nn.Parameter(torch.zeros(2, z))
        self.beta = nn.Parameter(torch.zeros(2, z))
        self.dropout = Dropout(config.dropout_prob)
        self.hidden_dropout = Dropout(config.hidden_dropout_prob)
        self.attention_dropout = Dropout(config.attention_probs_dropout_prob)

    # ---- attention core (megatrain.ops.attention) ---------------------------------------------------------------
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, **mask) -> Tensor:
        """q [B, n, Tq, H, d], k [B, n, Tk, H, d], v [B, n, Tk, H, e] -> [B, n, Tq, H, e]; the heads fold into the
        op's chunk axis; mask: chunk_attention's mask args per chunk ([B, n, ...]), repeated for every head."""
        b, n, tq, h = q.shape[:4]
        tk = k.shape[2]
        fold = lambda t: t.permute(0, 1, 3, 2, 4).reshape(b, n * h, t.shape[2], t.shape[4])  # noqa: E731
        per_head = {key: None if m is None else m.unsqueeze(2).expand(b, n, h, *m.shape[2:]).reshape(
            b, n * h, *m.shape[2:]) for key, m in mask.items() if key != "causal"}
        bias = q.new_zeros(tq, tk)
        out = chunk_attention(fold(q), fold(k), fold(v), bias, scale=1.0, causal=mask.get("causal", False),
                              dropout_p=self.attention_dropout.p if self.training else 0.0,
                              backend=self.config.kernel_backend, **per_head)
        return out.reshape(b, n, h, tq, -1).permute(0, 1, 3, 2, 4)

    def _full_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], doc_ids: Optional[Tensor]):
        """Training / scoring over a whole (chunk-aligned) sequence: [B, L, H, *] -> [B, L, E]."""
        b, length = q.shape[:2]
        c = self.chunk if length > self.chunk else length
        if length % c:
            raise ValueError(f"sequence length {length} is not a multiple of chunk_size {c} (MegalodonModel pads)")
        n = length // c
        pos = torch.arange(c, device=q.device)
        q, k, v = (t.reshape(b, n, c, *t.shape[2:]) for t in (q, k, v))
        q, k = rope(q, pos, self.config.rope_base), rope(k, pos, self.config.rope_base)
        key_mask = None if mask is None else mask.reshape(b, n, c).bool()
        doc = None if doc_ids is None else doc_ids.reshape(b, n, c)
        out = self._attend(q, k, v, causal=True, key_mask=key_mask, doc_ids=doc)
        return out.reshape(b, length, -1)

    def _cached_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cache: LayerCache):
        """Decoding: new tokens at positions [P, P+T) attend to the cached keys of their chunk and to each other."""
        b, t = q.shape[:2]
        p0 = cache.pos
        qpos = torch.arange(p0, p0 + t, device=q.device)
        q, k = rope(q, qpos % self.chunk, self.config.rope_base), rope(k, qpos % self.chunk, self.config.rope_base)
        k, v, key_mask = cached_keys(cache, k, v, mask)
        s = k.shape[1]
        kpos = torch.arange(p0 + t - s, p0 + t, device=q.device)
        valid = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] // self.chunk == qpos[:, None] // self.chunk)
        valid = valid[None] & key_mask[:, None, :]                                           # [B, T, S]
        out = self._attend(q[:, None], k[:, None], v[:, None], valid=valid[:, None])[:, 0]
        keep_current_chunk(cache, k, v, key_mask, p0 + t, self.chunk)
        return out.reshape(b, t, -1)

    # ---- the sub-layer ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: SeqContext = SeqContext(), cache: Optional[LayerCache] = None) -> Tensor:
        mask, doc_ids, boundary = ctx.mask, ctx.doc_ids, ctx.ema_boundary
        b, length, _ = x.shape
        if cache is None:
            xn, _ = self.timenorm(x, mask, doc_ids, boundary=boundary)
        else:
            xn, cache.norm_state = self.timenorm(x, mask, state=cache.norm_state)
        if cache is None and boundary is None:
            # a piece of its own (nested in the layer's): checkpointed, the EMA's internals are not kept while the
            # layer is recomputed. (Not with a boundary: a recompute would run the sequence-parallel exchange again.)
            ema_out, _ = self.run_piece("ema", self.cema, xn, mask, doc_ids)
        elif cache is None:
            ema_out, _ = self.cema(xn, mask, doc_ids, boundary=boundary)
        else:
            ema_out, cache.ema_state = self.cema(xn, mask, state=cache.ema_state)
        mx = self.hidden_dropout(self.rmsnorm(ema_out))

        z = rms_normalize(self.wz(mx).unflatten(-1, (self.heads, self.z_head)), self.config.norm_eps)
        scale = (self.gamma + 1.0) / math.sqrt(self.z_head)
        q = z * scale[0].view(self.heads, self.z_head) + self.beta[0].view(self.heads, self.z_head)
        k = z * scale[1].view(self.heads, self.z_head) + self.beta[1].view(self.heads, self.z_head)
        v = F.silu(self.wv(xn)).unflatten(-1, (self.heads, self.v_head))
        r = F.silu(self.wr(mx))

        if cache is None:
            attn = self._full_attention(q, k, v, mask, doc_ids)
        elif cache.pos == 0 and length % self.chunk == 0:
            # a prompt of whole chunks: the chunked path; the next token opens a new chunk, so no K/V to keep
            attn = self._full_attention(q, k, v, mask, None)
            cache.pos = length
        else:
            attn = self._cached_attention(q, k, v, mask, cache)
        h = self.wh1(mx) + self.wh2(self.hidden_dropout(attn * r))
        return self.dropout(h) + x
