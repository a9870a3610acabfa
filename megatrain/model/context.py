"""What travels beside the hidden states through every layer of one forward (masks, documents, the EMA boundary),
and the checks of those inputs every family's backbone runs.

    ctx = SeqContext(mask=attention_mask, doc_ids=doc_ids, ema_boundary=boundary)
    h = block(h, ctx)                     # every layer reads the same context; a decoding cache is per layer
    check_ids("input_ids", input_ids, input_ids.shape, vocab_size); check_masks(input_ids, attention_mask, doc_ids)

Bundled so that a new per-sequence input (a segment's incoming EMA state, an attention block mask, ...) is one
field here instead of one more argument threaded through attention.py, blocks.py and backbone.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqContext:
    mask: Optional[torch.Tensor] = None           # [B, L] 1 = real token, 0 = padding
    doc_ids: Optional[torch.Tensor] = None        # [B, L] tokens with different ids never interact
    ema_boundary: Optional[Callable] = None       # sequence parallelism: see megatrain/model/ema.py (Boundary)


def check_ids(name: str, t: Optional[torch.Tensor], shape, upper: int, allow: Optional[int] = None):
    """Shape and dtype always; the values only on the CPU. Reading a device tensor's verdict back would stall the
    host once per forward (a micro-batch's pipeline drained): there the ids were checked where the data entered
    (megatrain/data/shards.py checks every token against the vocabulary as it decodes a shard; prompts come from
    the tokenizer), and the embedding's own bounds check still stops a bad id."""
    if t is None:
        return
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.device.type != "cpu":
        return
    ok = (t >= 0) & (t < upper)
    if allow is not None:
        ok |= t == allow
    if not bool(ok.all()):
        bad = t[~ok][0].item()
        raise ValueError(f"{name} contains {bad}, outside [0, {upper})")


def check_masks(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor]):
    """attention_mask (0/1) and doc_ids shaped like input_ids: one ValueError naming the input otherwise."""
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected {tuple(input_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 and 1")
    if doc_ids is not None and doc_ids.shape != input_ids.shape:
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected {tuple(input_ids.shape)}")


def pad_to_chunks(pad: int, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  token_type_ids: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor], pad_token_id: Optional[int]):
    """The inputs grown by `pad` positions to whole chunks: the padding token, mask 0 (the padding is masked out
    everywhere, so real positions are unaffected), token type 0, the last document id continued."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids = F.pad(input_ids, (0, pad), value=pad_token_id if pad_token_id is not None else 0)
    attention_mask = F.pad(attention_mask, (0, pad), value=0)
    if token_type_ids is not None:
        token_type_ids = F.pad(token_type_ids, (0, pad), value=0)
    if doc_ids is not None:
        doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(-1, pad)], dim=1)
    return input_ids, attention_mask, token_type_ids, doc_ids


def cached_keys(cache, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]):
    """Decoding: the new tokens' keys, values and key mask after the cached ones of their chunk (a layer cache with
    .key, .value, .key_mask): (k, v, key_mask) along dim 1."""
    key_mask = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device) if mask is None else mask.bool()
    if cache.key is None:
        return k, v, key_mask
    return (torch.cat([cache.key, k], dim=1), torch.cat([cache.value, v], dim=1),
            torch.cat([cache.key_mask, key_mask], dim=1))


def keep_current_chunk(cache, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, end: int,
                       chunk: Optional[int]) -> None:
    """After decoding up to position `end` (exclusive): keep in `cache` only the keys the next token can see, those
    of its chunk (everything without chunking), and move cache.pos to `end`. k [B, S, ...] ends at `end`."""
    keep_from = 0 if chunk is None else (end // chunk) * chunk
    first = max(keep_from - (end - k.shape[1]), 0)
    cache.key, cache.value, cache.key_mask = k[:, first:], v[:, first:], key_mask[:, first:]
    cache.pos = end
