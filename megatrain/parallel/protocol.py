"""The one forward over a window, for training and every evaluation: window -> this rank's slice -> EMA boundary
-> the model's keyword API. Training (the trainer, bench/bench_sp.py), in-training and standalone evaluation
(megatrain/eval/loss.py) and passkey scoring (megatrain/eval/passkey.py) all call ``forward_window`` (or
``sp_forward`` / ``sp_forward_backward``, which add the SP loss reduction and the backward); nothing outside
megatrain/model/ calls the model any other way.

Usage (every rank of the SP group calls them with the same whole window; ``model`` is the model or the DeepSpeed
engine, anything called like ``MegaForCausalLM``/``MegaForMaskedLM`` -- a transformers causal LM through
megatrain/hf/causal_lm.py's adapter too; ``sp_group`` None = one process, no SP)::

    from megatrain.parallel.protocol import forward_window, sp_forward, sp_forward_backward, sp_slice
    loss = sp_forward_backward(engine, window, groups.sp_group, causal=True, backward=engine.backward)
    loss.mean_loss      # 0-dim, on the model's device: the window's mean token loss (identical on every SP rank)
    loss.total_tokens   # 0-dim float64: the window's label tokens (summed over the SP group)
    with torch.no_grad():                                  # evaluation: the same forward, other outputs
        f = forward_window(model, window, sp_group, causal=True, loss_reduction="sum")   # f.out.loss: this
                                                           # slice's summed loss (reduce it yourself)
        f = forward_window(model, window, sp_group, causal=True, loss_reduction="none")  # f.out.loss [B, l]:
                                                           # each token of this slice; f.piece: the slice's keys
        f = forward_window(model, {"input_ids": ids}, sp_group, causal=True, logits_at=pos)  # pos: positions
                                                           # of the whole window; f.out.logits [B, k, V] for the
                                                           # f.positions (of pos) that lie in this rank's slice

The steps, per SP rank (P ranks in ``sp_group``, P = 1 included: then it is the plain unsplit computation):
  1. ``sp_slice``: this rank's contiguous 1/P of every key of the window ([B, L] -> [B, L/P]); CLM labels are
     already shifted by the loader, so the slice edges need nothing from the neighbours;
  2. ``make_ema_boundary``: one per window (it cuts the state where a document starts at a slice edge);
  3. the forward through the model's keyword API: the summed loss (training: the head's fused blockwise loss, no
     [B, L, V] tensor), each token's loss, or logits at chosen positions;
  4. (``sp_forward``) ``reduce_sp_loss``: one all-reduce of (loss sum, label count) over the SP group; this rank
     backpropagates its own sum / the window's count, so the gradients *summed* over the SP group equal the
     unsplit mean's gradient (``grad_average_size`` W: the gradient reduction afterwards averages over W ranks
     instead, e.g. W = 1 for DeepSpeed, whose SP gradient reduction is a sum, see parallel/groups.py);
  5. (``sp_forward_backward``) ``backward(loss.backward_loss)``.
Every rank of the group runs step 3 even when none of the asked positions is its own (the boundary exchange is
collective). Nothing here moves a tensor to the host: a caller that logs the loss accumulates ``mean_loss`` on the
device and reads it once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatrain.parallel.sequence import SPLoss, make_ema_boundary, reduce_sp_loss


# ----------------------------------------------------------------------------------------------------------------
# Step 1: the slice
# ----------------------------------------------------------------------------------------------------------------
def _slice(t: torch.Tensor, sp_rank: int, sp_size: int, name: str) -> torch.Tensor:
    length = t.shape[-1]
    if length % sp_size:
        raise ValueError(f"sp_slice: {name} has length {length}, not divisible by sp_size={sp_size}")
    n = length // sp_size
    return t[..., sp_rank * n:(sp_rank + 1) * n]


def sp_slice(sample_or_batch, sp_rank: int, sp_size: int):
    """A tensor, or every tensor of a dict, cut to the contiguous block ``[sp_rank * L/P, (sp_rank + 1) * L/P)`` of
    its last dimension (other dict values pass through). Because CLM labels are pre-shifted by the loader
    (labels[t] = token t+1), the last label of slice r is the first input of slice r+1: no label exchange."""
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_slice: need 0 <= sp_rank < sp_size, got sp_rank={sp_rank}, sp_size={sp_size}")
    if isinstance(sample_or_batch, torch.Tensor):
        return _slice(sample_or_batch, sp_rank, sp_size, "tensor")
    if not isinstance(sample_or_batch, dict):
        raise TypeError(f"sp_slice: expected a tensor or a dict of tensors, got {type(sample_or_batch).__name__}")
    return {k: _slice(v, sp_rank, sp_size, repr(k)) if isinstance(v, torch.Tensor) else v
            for k, v in sample_or_batch.items()}


def sp_place(sp_group) -> tuple:
    """(rank, size) of this process in ``sp_group``; (0, 1) for None (one process, no SP)."""
    if sp_group is None:
        return 0, 1
    return dist.get_rank(sp_group), dist.get_world_size(sp_group)


# ----------------------------------------------------------------------------------------------------------------
# Steps 2-3: the forward
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class WindowForward:
    piece: dict                 # this rank's slice of every key of the window
    out: Any                    # the model's output (.loss, .num_loss_tokens, .logits)
    offset: int                 # the slice's first position in the window
    positions: Optional[torch.Tensor] = None  # logits_at: the window positions out.logits holds, in order


def forward_window(model, window: dict, sp_group, *, causal: bool, reset_at_doc_boundaries: bool = True,
                   loss_reduction: str = "sum", logits_at: Optional[torch.Tensor] = None) -> WindowForward:
    """Steps 1-3 on this rank (see the module docstring). ``window``: ``input_ids`` and, for a loss, ``labels``
    (CLM: already shifted, labels[t] is the target of position t), optionally ``doc_ids``, each [B, L] with L a
    multiple of the group size; other keys are sliced and handed back in ``piece``. ``reset_at_doc_boundaries=False``
    ignores ``doc_ids`` (one document per row). ``logits_at``: 1-D positions of the whole window; then no loss."""
    rank, size = sp_place(sp_group)
    piece = sp_slice(window, rank, size)
    offset = rank * (window["input_ids"].shape[-1] // size)
    doc_ids = piece.get("doc_ids") if reset_at_doc_boundaries else None
    boundary = make_ema_boundary(sp_group, doc_ids=doc_ids) if size > 1 else None
    kwargs = {"input_ids": piece["input_ids"], "doc_ids": doc_ids, "ema_boundary": boundary}
    if logits_at is not None:
        local = piece["input_ids"].shape[-1]
        mine = logits_at[(logits_at >= offset) & (logits_at < offset + local)]
        return WindowForward(piece, model(**kwargs, logits_at=mine - offset), offset, mine)
    kwargs.update(labels=piece["labels"], loss_reduction=loss_reduction, return_logits=False,
                  **({"labels_shifted": True} if causal else {}))
    return WindowForward(piece, model(**kwargs), offset)


# ----------------------------------------------------------------------------------------------------------------
# Steps 4-5: the training step's loss
# ----------------------------------------------------------------------------------------------------------------
def sp_forward(model, window: dict, sp_group, *, causal: bool, reset_at_doc_boundaries: bool = True,
               grad_average_size: int = 1) -> SPLoss:
    """Steps 1-4 on this rank: the window's loss, reduced over ``sp_group`` (see the module docstring)."""
    f = forward_window(model, window, sp_group, causal=causal, reset_at_doc_boundaries=reset_at_doc_boundaries)
    return reduce_sp_loss(f.out.loss, f.out.num_loss_tokens, sp_group, grad_average_size=grad_average_size)


def sp_forward_backward(model, window: dict, sp_group, *, causal: bool, reset_at_doc_boundaries: bool = True,
                        grad_average_size: int = 1,
                        backward: Optional[Callable[[torch.Tensor], object]] = None) -> SPLoss:
    """``sp_forward`` then ``backward(loss.backward_loss)`` (default ``Tensor.backward``; pass ``engine.backward``
    for DeepSpeed). The gradients still need the SP reduction (DeepSpeed's step, or ``sum_grads_over``)."""
    loss = sp_forward(model, window, sp_group, causal=causal, reset_at_doc_boundaries=reset_at_doc_boundaries,
                      grad_average_size=grad_average_size)
    (backward or torch.Tensor.backward)(loss.backward_loss)
    return loss
