"""The PyTorch path of the fused LM head + cross-entropy: blockwise, gradients computed in the forward.

    loss = blockwise_ce_sum(h, weight, bias, targets, block)  # h [N, D], weight [V, D], bias [V] or None,
                                                               # targets [N] int (-100 = ignored) -> fp32 scalar
                                                               # (fp64 for fp64 inputs); called by
                                                               # megatrain.ops.lm_loss.lm_head_ce_sum
    losses = blockwise_ce_tokens(h, weight, bias, targets, block)  # [N]: each target's loss (0 where ignored);
                                                                    # megatrain.ops.lm_loss.lm_head_ce_tokens

Why: plain autograd (or a checkpointed F.linear + F.cross_entropy per block, as before) keeps or rebuilds, per
block, the logits, their log-softmax and a zero-filled logits gradient -- three [block, V] tensors and passes
over them -- and runs the head matmul twice (forward, then the recompute in backward): four [N, D]x[D, V]
matmuls. The loss is a scalar, so its gradient is grad_out * d(loss)/d(inputs): when a gradient is wanted the
forward computes d(loss)/d(h, W, b) right away from the block's logits, turned in place into
softmax - onehot(target) in one reused buffer, and keeps only those ([N, D] + [V, D] + [V], the size of h and
the weights); backward just scales them. Three matmuls instead of four, no tensor larger than [block, V], nothing
of that size zero-filled. Without grad (eval, no_grad) only the loss is computed (one matmul).

Precision: the matmuls run in the inputs' dtype, or in the autocast dtype when autocast is on for h's device
(cast explicitly, autocast off inside, so each buffer has one known dtype); the log-sum-exp, the softmax, the
loss and the accumulated weight gradient are at least fp32. Gradients come back in the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatrain.ops.lm_loss.reference import IGNORE_INDEX


def _dtypes(h: torch.Tensor, weight: torch.Tensor):
    """(matmul dtype, softmax/loss dtype): the autocast dtype if autocast is on for h's device, else the promoted
    input dtype; the softmax is at least fp32 (bf16/fp16 logits would lose the log-sum-exp)."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(h.dtype, weight.dtype)
    return cdt, torch.promote_types(cdt, torch.float32)


def _block_logits(h_blk, w, b, out):
    """logits of one block into `out` (a reused buffer: a fresh [block, V] allocation per block is an mmap plus
    page faults that the kernel zero-fills, the 'zero-fill' seen in profiles)."""
    out = out[: h_blk.shape[0]]
    if b is None:
        torch.mm(h_blk, w.t(), out=out)
    else:
        torch.addmm(b, h_blk, w.t(), out=out)
    return out


class _LMHeadCESum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, block, want_grad):
        cdt, sdt = _dtypes(h, weight)
        need_h, need_w, need_b = want_grad and h.requires_grad, want_grad and weight.requires_grad, \
            want_grad and bias is not None and bias.requires_grad
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(cdt), weight.to(cdt)
            bc = None if bias is None else bias.to(cdt)
            n, v = h.shape[0], weight.shape[0]
            loss = torch.zeros((), dtype=sdt, device=h.device)
            # d(loss)/d(input), unscaled; backward multiplies by grad_out once ([N, D] + [V, D] elements)
            gh = torch.empty_like(hc) if need_h else None
            gw = torch.zeros_like(wc, dtype=sdt) if need_w else None
            gb = torch.zeros(v, dtype=sdt, device=h.device) if need_b else None
            buf = torch.empty(min(block, n), v, dtype=cdt, device=h.device)
            f32 = torch.empty(min(block, n), v, dtype=sdt, device=h.device) if cdt != sdt else None
            for s in range(0, n, block):
                e = min(s + block, n)
                hb = hc[s:e]
                z = _block_logits(hb, wc, bc, buf)
                if f32 is not None:
                    z = f32[: e - s].copy_(z)
                t = targets[s:e]
                keep = t != IGNORE_INDEX
                # the target logit is read before z is overwritten; ignored rows read column 0, then masked out
                zt = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
                m = z.amax(1)
                # log-sum-exp in place (torch.logsumexp would allocate a [block, V] temporary)
                se = z.sub_(m.unsqueeze(1)).exp_().sum(1)
                lse = se.log().add_(m)
                loss += torch.where(keep, lse - zt, 0.0).sum()
                if not (need_h or need_w or need_b):
                    continue
                # the logits' gradient, in place: softmax (exp(z - m) / sum) - onehot(target), 0 on ignored rows
                g = z.mul_(se.reciprocal_().unsqueeze(1))
                rows = keep.nonzero().squeeze(1)
                g[rows, t[rows]] -= 1.0
                dropped = (~keep).nonzero().squeeze(1)
                if dropped.numel():
                    g.index_fill_(0, dropped, 0.0)  # only the ignored rows are written
                if need_b:
                    gb += g.sum(0)
                if f32 is not None:
                    g = buf[: e - s].copy_(g)  # matmuls in the compute dtype
                if need_h:
                    torch.mm(g, wc, out=gh[s:e])
                if need_w:
                    if gw.dtype == g.dtype:
                        gw.addmm_(g.t(), hb)
                    else:
                        gw += (g.t() @ hb).to(sdt)
        ctx.grads = (gh, gw, gb)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None  # freed as soon as they are handed over
        out = tuple(None if g is None else (g * grad_out.to(g.dtype)).to(dt) for g, dt in zip(grads, ctx.dtypes))
        return out + (None, None, None)


def blockwise_ce_sum(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                     block: int) -> torch.Tensor:
    """h [N, D] contiguous, targets [N], N >= 1 (the dispatcher checks and flattens)."""
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    return _LMHeadCESum.apply(h, weight, bias, targets, block, want_grad)


def blockwise_ce_tokens(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                        block: int) -> torch.Tensor:
    """Per-token losses [N] (fp32 at least; 0 where the target is ignored), `block` rows at a time: what evaluation
    by position and per-token scoring need. Plain autograd per block (the per-token losses are an evaluation output;
    training takes the summed loss above), the same dtypes as the summed path."""
    cdt, sdt = _dtypes(h, weight)
    out = torch.empty(h.shape[0], dtype=sdt, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        wc = weight.to(cdt)
        bc = None if bias is None else bias.to(cdt)
        for s in range(0, h.shape[0], block):
            z = torch.nn.functional.linear(h[s:s + block].to(cdt), wc, bc).to(sdt)
            out[s:s + block] = torch.nn.functional.cross_entropy(z, targets[s:s + block], ignore_index=IGNORE_INDEX,
                                                                 reduction="none")
    return out
