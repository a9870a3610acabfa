"""Incremental decoding for any family's causal LM: its cache carries the per-layer states (MEGA: EMA state;
Megalodon: timestep-norm statistics and complex EMA state) and the current chunk's keys/values.

Use:
    import megatrain
    ids = megatrain.generate(model, input_ids, max_new_tokens=20)                          # greedy
    ids = megatrain.generate(model, input_ids, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=50,
                             top_p=0.95, generator=torch.Generator().manual_seed(0))
    ids, logits = megatrain.generate(model, input_ids, max_new_tokens=20, return_logits=True)
    # ids [B, prompt + new]; logits [B, new, V]: the distribution each new token was drawn from

The prompt goes through the model once (whole chunks on the chunked path, the remainder incrementally), then one
token per step: each step costs O(chunk_size) attention + O(D*N) EMA, independent of the generated length when
chunking. Prompts of different lengths: left-pad them and pass `attention_mask` (0 = padding); the padding is
masked out of the EMA and the attention, so each row continues exactly as its unpadded prompt would
(without chunking; with chunking the padding shifts the chunk boundaries, as it does in the full forward).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatrain.model.lm import LanguageModel


def _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask):
    if not isinstance(model, LanguageModel) or not model.causal:
        raise ValueError(f"generate needs a causal language model (MegaForCausalLM, MegalodonForCausalLM), got "
                         f"{type(model).__name__}")
    if model.config.truncation is not None:
        raise ValueError(f"generate: config.truncation={model.config.truncation} has no finite EMA state to carry")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be [batch, prompt_length >= 1], got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p!r}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"generate: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        m = attention_mask.long()
        # left padding only: once a row has a real token, everything after it is real
        if bool((m[:, 1:] < m[:, :-1]).any()):
            raise ValueError("generate: attention_mask must be left padding (0s before 1s in every row)")
        if bool((m[:, -1] == 0).any()):
            raise ValueError("generate: every prompt needs at least one real token at the end")


def _filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: LanguageModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    attention_mask: Optional[torch.Tensor] = None,
    eos_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_logits: bool = False,
):
    """Extend `input_ids` [B, P] by `max_new_tokens` tokens -> ids [B, P + max_new_tokens] (and logits if asked).

    After `eos_token_id` a row keeps emitting config.pad_token_id (the length stays fixed).
    """
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        # the prompt's last position only: no [B, P, V] logits for a long prompt
        last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_at=last).logits[:, -1].float()
        ids, picked_from = [input_ids], []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        for step in range(max_new_tokens):
            picked_from.append(logits)
            if do_sample:
                probs = torch.softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done |= nxt == eos_token_id
            ids.append(nxt[:, None])
            if step + 1 < max_new_tokens:
                logits = model(nxt[:, None], cache=cache).logits[:, -1].float()
    finally:
        model.train(was_training)
    out = torch.cat(ids, dim=1)
    if return_logits:
        empty = input_ids.new_zeros((input_ids.shape[0], 0, model.config.vocab_size), dtype=torch.float32)
        return out, (torch.stack(picked_from, dim=1) if picked_from else empty)
    return out
