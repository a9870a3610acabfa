"""The sequence-parallel step protocol, once: window -> this rank's slice -> EMA boundary -> forward -> loss reduction
(-> backward). Training, evaluation, the SP tests and bench/bench_sp.py all call these two functions.

Usage (every rank of the SP group calls them with the same whole window; ``model`` is the model or the DeepSpeed
engine, anything called like ``MegaForCausalLM``/``MegaForMaskedLM``)::

    from megatrain.parallel.protocol import sp_forward, sp_forward_backward
    loss = sp_forward_backward(engine, window, groups.sp_group, causal=True, backward=engine.backward)
    with torch.no_grad():                                  # evaluation: no backward, same numbers
        loss = sp_forward(model, window, sp_group, causal=True)
    loss.mean_loss      # 0-dim, on the model's device: the window's mean token loss (identical on every SP rank)
    loss.total_tokens   # 0-dim float64: the window's label tokens (summed over the SP group)
    loss.mean_loss.double() * loss.total_tokens            # the window's summed token loss (to pool windows)

The steps, per SP rank (P ranks in ``sp_group``, P = 1 included: then it is the plain unsplit computation):
  1. ``sp_slice``: this rank's contiguous 1/P of every key of the window ([B, L] -> [B, L/P]); CLM labels are
     already shifted by the loader, so the slice edges need nothing from the neighbours;
  2. ``make_ema_boundary``: one per window (it cuts the state where a document starts at a slice edge);
  3. the forward with the summed loss, no logits (the head's fused blockwise loss: no [B, L, V] tensor);
  4. ``reduce_sp_loss``: one all-reduce of (loss sum, label count) over the SP group; this rank backpropagates its
     own sum / the window's count, so the gradients *summed* over the SP group equal the unsplit mean's gradient
     (``grad_average_size`` W: the gradient reduction afterwards averages over W ranks instead, e.g. W = 1 for
     DeepSpeed, whose SP gradient reduction is a sum, see parallel/groups.py);
  5. (``sp_forward_backward``) ``backward(loss.backward_loss)``.
Nothing here moves a tensor to the host: a caller that logs the loss accumulates ``mean_loss`` on the device and
reads it once per step.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatrain.data.sp import sp_slice
from megatrain.parallel.sequence import SPLoss, make_ema_boundary, reduce_sp_loss


def sp_forward(model, window: dict, sp_group, *, causal: bool, reset_at_doc_boundaries: bool = True,
               grad_average_size: int = 1) -> SPLoss:
    """Steps 1-4 on this rank: the window's loss, reduced over ``sp_group`` (see the module docstring).

    ``window``: ``input_ids``, ``labels`` (CLM: already shifted, labels[t] is the target of position t) and
    optionally ``doc_ids``, each [B, L] with L a multiple of the group size. ``reset_at_doc_boundaries=False``
    ignores ``doc_ids`` (one document per row)."""
    size = torch.distributed.get_world_size(sp_group)
    piece = sp_slice(window, torch.distributed.get_rank(sp_group), size)
    doc_ids = piece.get("doc_ids") if reset_at_doc_boundaries else None
    boundary = make_ema_boundary(sp_group, doc_ids=doc_ids) if size > 1 else None
    out = model(input_ids=piece["input_ids"], labels=piece["labels"], doc_ids=doc_ids, ema_boundary=boundary,
                loss_reduction="sum", return_logits=False, **({"labels_shifted": True} if causal else {}))
    return reduce_sp_loss(out.loss, out.num_loss_tokens, sp_group, grad_average_size=grad_average_size)


def sp_forward_backward(model, window: dict, sp_group, *, causal: bool, reset_at_doc_boundaries: bool = True,
                        grad_average_size: int = 1,
                        backward: Optional[Callable[[torch.Tensor], object]] = None) -> SPLoss:
    """``sp_forward`` then ``backward(loss.backward_loss)`` (default ``Tensor.backward``; pass ``engine.backward``
    for DeepSpeed). The gradients still need the SP reduction (DeepSpeed's step, or ``sum_grads_over``)."""
    loss = sp_forward(model, window, sp_group, causal=causal, reset_at_doc_boundaries=reset_at_doc_boundaries,
                      grad_average_size=grad_average_size)
    (backward or torch.Tensor.backward)(loss.backward_loss)
    return loss
