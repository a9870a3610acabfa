"""The language model contract every family answers: vocabulary head + loss over a backbone (pure PyTorch).

Use (any family's LM: megatrain/model/mega/lm.py, megatrain/model/megalodon/lm.py; build one with
megatrain.model.build_model(config), which dispatches on config.model_type):
    out = model(input_ids, attention_mask=None, token_type_ids=None, labels=None, doc_ids=None,
                ema_boundary=None, labels_shifted=False, loss_reduction="mean")
    out.logits [B, L, V]; out.loss; out.num_loss_tokens
    # the keyword-only API every caller outside model/ uses (training, evaluation, scoring), never the submodules:
    out = model(input_ids=x, labels=y, loss_reduction="sum", return_logits=False)   # training: blockwise fused
                                        # loss, no [B, L, V] logits (LMHead's forward: works under ZeRO-3 too)
    out = model(input_ids=x, labels=y, loss_reduction="none", return_logits=False)  # out.loss [B, L] fp32: each
                                        # token's loss (0 where the label is -100), LOSS_BLOCK_TOKENS at a time
    out = model(input_ids=x, logits_at=torch.tensor([5, 9]))  # out.logits [B, 2, V]: only those positions' logits
    out = model(input_ids=x, cache=model.new_cache())         # incremental decoding (megatrain/model/generate.py)
Tests: PYTHONPATH=. python -m pytest -q tests/model

`LanguageModel` owns the forward contract once (label shift, the three reductions, logits_at, the fused loss) and
`LMHead` the vocabulary projection with its loss; a family supplies its backbone (`backbone_forward`) and, if it
has one, a per-token function before the head (`pre_head`: MEGA's dense + tanh), which the training loss runs
inside the last layer's piece(s) so that with activation checkpointing its activations are not kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.model.context import check_ids
from megatrain.ops.lm_loss import IGNORE_INDEX, lm_head_ce_sum, lm_head_ce_tokens

# positions per block of the fused LM-head loss (return_logits=False): one [block, V] buffer; at V=8K, 1024 is
# as fast as 2048/4096 (single-thread CPU, 16K tokens) with a quarter of 4096's 128 MB
LOSS_BLOCK_TOKENS = 1024


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    num_loss_tokens: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    cache: Any = None           # the family's decoding cache, filled by the forward


MegaOutput = LMOutput           # the name MEGA's callers know


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

    def __init__(self, hidden_size: int, vocab_size: int, kernel_backend: str = "auto", bias: bool = True):
        super().__init__(hidden_size, vocab_size, bias=bias)
        self.kernel_backend = kernel_backend  # MegaConfig.kernel_backend: blockwise (CPU) or Liger (CUDA) loss

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None, per_token: bool = False,
                block: int = LOSS_BLOCK_TOKENS) -> torch.Tensor:
        """labels None: logits [..., V]. labels [...] (IGNORE_INDEX = no loss): the fp32 sum of the token
        cross-entropies, computed `block` positions at a time (megatrain.ops.lm_loss): no [..., V] tensor;
        `per_token`: each token's loss instead, shaped like labels (0 where ignored)."""
        if labels is None:
            return super().forward(h)
        if per_token:
            return lm_head_ce_tokens(h, self.weight, self.bias, labels, block).float()
        return lm_head_ce_sum(h, self.weight, self.bias, labels, block, backend=self.kernel_backend).float()


class LanguageModel(nn.Module):
    """A family's language model: `backbone_forward` + optional `pre_head` + `lm_head`, and the one forward contract
    (see the module docstring). Subclasses set `causal`, build `self.config` and `self.lm_head` and implement
    backbone_forward / new_cache / get_input_embeddings."""

    causal: bool

    def backbone_forward(self, input_ids, attention_mask, token_type_ids, doc_ids, ema_boundary, cache,
                         final: Optional[Callable]) -> torch.Tensor:
        """-> last hidden state [B, L, D], or final(it) computed inside the last layer's piece(s)."""
        raise NotImplementedError

    def new_cache(self):
        raise NotImplementedError

    @property
    def has_pre_head(self) -> bool:
        return False

    def pre_head(self, h: torch.Tensor) -> torch.Tensor:
        """The per-token function before the head (only called where has_pre_head)."""
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.pre_head(h) if self.has_pre_head else h)

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
        cache: Any = None,
        return_logits: bool = True,
        *,
        logits_at: Optional[torch.Tensor] = None,
    ) -> LMOutput:
        """See the module docstring. `return_logits=False` (needs labels) computes the loss in blocks of
        LOSS_BLOCK_TOKENS positions with the fused head + cross-entropy of megatrain.ops.lm_loss (the gradient
        of h and the head is formed block by block during the forward): the [B, L, V] logits (and their
        log-softmax and gradient) never exist at once -- at L=32K, V=8K that is ~1 GB each. out.logits is None.
        `loss_reduction="none"`: out.loss is each token's loss [B, L] (fp32; 0 where the label is ignored).
        `logits_at` (1-D positions of this input): out.logits [B, len(logits_at), V] at those positions only (the
        head runs on them alone); no labels then."""
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: expected 'mean', 'sum' or 'none'")
        if not return_logits and labels is None and logits_at is None:
            raise ValueError("return_logits=False only makes sense with labels (the loss is all that is computed)")
        if logits_at is not None:
            if labels is not None:
                raise ValueError("logits_at gives logits at chosen positions; pass labels without it for a loss")
            if logits_at.dim() != 1 or logits_at.dtype.is_floating_point:
                raise ValueError(f"logits_at must be a 1-D integer tensor of positions, got {logits_at.dtype}"
                                 f"{list(logits_at.shape)}")
        # the loss alone: the pre-head function (MEGA's dense + tanh) runs inside the last layer's piece(s) (per
        # segment when segmented),
        # so its input and output are not kept for the whole sequence (2 of ~7 [L, D] tensors at a step's peak)
        fold_dense = not return_logits and labels is not None and self.has_pre_head
        h = self.backbone_forward(input_ids, attention_mask, token_type_ids, doc_ids, ema_boundary, cache,
                                  self.pre_head if fold_dense else None)
        out = LMOutput(last_hidden_state=None if fold_dense else h, cache=cache)
        if logits_at is not None:
            out.logits = self._logits(h[:, logits_at.to(h.device)])
            return out
        if return_logits:
            out.logits = self._logits(h)
        if labels is None:
            return out
        check_ids("labels", labels, input_ids.shape, self.config.vocab_size, allow=IGNORE_INDEX)
        if self.causal and not labels_shifted:
            # HF style: position t predicts token t+1. Shift the labels, not the logits (no [B, L-1, V] copy).
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        n = (labels != IGNORE_INDEX).sum()
        if return_logits:
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none" if loss_reduction == "none" else "sum")
            if loss_reduction == "none":
                loss = loss.reshape(labels.shape)
        else:
            # h is already pre_head(h) (folded into the last layer's checkpoint); the head + CE is fused and
            # blockwise, inside the head module's forward (see LMHead: ZeRO-3 gathers the weight for it)
            loss = self.lm_head(h, labels, per_token=loss_reduction == "none")
        # mean over counted tokens; 0 (not NaN) when every label is ignored
        out.loss = loss / n.clamp(min=1) if loss_reduction == "mean" else loss
        out.num_loss_tokens = n
        return out
