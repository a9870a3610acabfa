"""Any transformers causal LM behind megatrain's keyword LM API: what evaluation and the bake-off call.

Use:
    from megatrain.hf.causal_lm import CausalLMAdapter, is_transformers_causal_lm
    model = CausalLMAdapter.from_pretrained("some_llama_folder")          # AutoModelForCausalLM, eval mode
    model = CausalLMAdapter(LlamaForCausalLM(LlamaConfig(...)))           # or wrap a model you built
    out = model(input_ids=ids, labels=labels, doc_ids=doc_ids, loss_reduction="sum", return_logits=False)
    out.loss; out.num_loss_tokens                     # "none": out.loss [B, L] fp32 per token, 0 where ignored
    out = model(input_ids=ids, doc_ids=doc_ids, logits_at=pos)            # out.logits [B, len(pos), V]
    model.config.vocab_size
Tests: PYTHONPATH=. python -m pytest -q tests/hf/test_causal_lm.py

The API is megatrain's LM forward (megatrain/model/lm.py), keyword-only:
  * ``labels`` are already shifted when ``labels_shifted=True`` (labels[t] is the target of position t, the
    loader's convention); ``labels_shifted=False`` is the HF convention (labels[t] = input_ids[t], shifted here).
  * ``doc_ids`` [B, L]: tokens of different documents must not see each other. A row holding several documents
    gets a block-diagonal causal 4-D mask (boolean for SDPA/flex, additive for eager: transformers passes a 4-D
    mask through unchanged); rows of one document run with the model's own causal mask. The mask is [B, 1, L, L]:
    fine at evaluation lengths, quadratic memory at very long ones (one document per window avoids it).
    RoPE positions need no reset at a document start: the scores depend on relative positions only.
  * ``ema_boundary`` must be None: a transformers model has no EMA state to hand across sequence-parallel ranks
    (launch/evaluate.py refuses --sp > 1 for such a SOURCE before any work).
  * the loss is the fp32 cross-entropy of the model's logits, summed / averaged over labels != -100 (0, not NaN,
    when none counts).
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.model.lm import MegaOutput as LMOutput
from megatrain.ops.lm_loss import IGNORE_INDEX

REDUCTIONS = ("mean", "sum", "none")


def is_transformers_causal_lm(path: str) -> bool:
    """True when `path` is a transformers model folder of no megatrain family (megatrain's own loader,
    megatrain.hf.load_hf, takes those: native "mega", megatrain's remote-code exports of every family)."""
    import json

    from megatrain.hf.format import family_of_hf_dict
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            d = json.load(f)
        model_type = d.get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(model_type, str) or not model_type:
        return False
    try:  # the families' own model_types (hf/format.py): one list, not a copy of it here
        family_of_hf_dict(d)
    except ValueError:
        return True
    return False


def document_mask(doc_ids: torch.Tensor, additive_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[B, 1, L, L]: query i may see key j when j <= i and both are in the same document. Boolean (True = attend),
    or additive (0 / the dtype's minimum) when `additive_dtype` is given (eager attention adds the mask)."""
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=doc_ids.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


class CausalLMAdapter(nn.Module):
    """A transformers causal LM answering megatrain's keyword LM API (see the module docstring)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self._keeps_positions = "logits_to_keep" in inspect.signature(hf_model.forward).parameters

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "CausalLMAdapter":
        from transformers import AutoModelForCausalLM
        try:
            hf = AutoModelForCausalLM.from_pretrained(path, **kw)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"SOURCE {path}: transformers cannot load it as a causal LM ({e})") from None
        return cls(hf).eval()

    def get_input_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.hf.get_output_embeddings()

    def _mask(self, doc_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if doc_ids is None or bool((doc_ids == doc_ids[:, :1]).all()):
            return None  # one document per row: the model's own causal mask
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        dtype = next(self.hf.parameters()).dtype
        return document_mask(doc_ids, None if impl in ("sdpa", "flex_attention") else dtype)

    def forward(self, *, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, ema_boundary=None, labels_shifted: bool = True,
                loss_reduction: str = "mean", return_logits: bool = True,
                logits_at: Optional[torch.Tensor] = None, **unused) -> LMOutput:
        if ema_boundary is not None:
            raise ValueError("a transformers causal LM has no EMA state to hand across ranks: sequence "
                             "parallelism (--sp > 1) is for megatrain's models only")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r}: expected one of {REDUCTIONS}")
        if unused:
            bad = sorted(k for k, v in unused.items() if v is not None)
            if bad:
                raise ValueError(f"CausalLMAdapter: unsupported argument(s) {bad}")
        mask = self._mask(doc_ids)
        kw = {}
        if logits_at is not None:
            if labels is not None:
                raise ValueError("logits_at and labels together: ask for the loss or for logits at positions")
            if self._keeps_positions:
                kw["logits_to_keep"] = logits_at
        out = self.hf(input_ids=input_ids, attention_mask=mask, use_cache=False, **kw)
        logits = out.logits
        if logits_at is not None and not self._keeps_positions:
            logits = logits[:, logits_at]
        res = LMOutput(logits=logits if (return_logits or labels is None) else None)
        if labels is None:
            return res
        if not labels_shifted:  # HF convention: position t predicts token t + 1
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        V = logits.shape[-1]
        tok = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                              reduction="none").reshape(labels.shape)
        n = (labels != IGNORE_INDEX).sum()
        res.loss = tok if loss_reduction == "none" else tok.sum() if loss_reduction == "sum" \
            else tok.sum() / n.clamp(min=1)
        res.num_loss_tokens = n
        return res
