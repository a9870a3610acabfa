"""Held-out loss of a model on fixed windows: loss, perplexity, bits per byte, and loss by position.

Use (any layout: every rank calls it with its DP rank / SP group; one process: the defaults):
    from megatrain.eval.loss import evaluate_windows
    res = evaluate_windows(model, heldout, micro_batch_size=2, positions=True)      # plain model or engine
    res.summary()   # {"loss", "ppl", "bpb", "tokens"}; res.by_position() -> log-spaced bins (positions=True)

Per micro-batch: this DP rank's windows -> the window protocol (megatrain/parallel/protocol.py ``forward_window``:
this SP rank's slice, the EMA boundary, the model's keyword API), without gradients, in eval mode (dropout off) ->
sums of the token losses, the counted tokens and their UTF-8 bytes, all-reduced over every rank (SP slices and DP
windows are disjoint, so the sums are the one-rank sums: SP = 1 to fp rounding).
``positions=False`` asks the model for the summed loss (the training forward: fused blockwise head, no [B, L, V]
logits); ``positions=True`` for each token's loss (the head blockwise too), binned by position: [1, 2), [2, 4),
..., [L/2, L] (``positions`` of megatrain/eval/heldout.py). Either works through a DeepSpeed engine (ZeRO-3 gathers
the weights in the modules' own forwards).
Bits per byte = summed token loss (nats) / ln 2 / bytes of the target tokens: tokenizer-independent.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatrain.eval.heldout import HeldOut, rank_batches
from megatrain.ops.lm_loss import IGNORE_INDEX
from megatrain.parallel.protocol import forward_window, sp_place


def position_bins(seq_len: int) -> list:
    """Log-spaced [lo, hi) bins covering positions 1..seq_len: [1, 2), [2, 4), ..., [2^k, L + 1) (the last one
    takes L itself: L/2..L for a power of two)."""
    bins, lo = [], 1
    while lo <= seq_len:
        hi = 2 * lo if 2 * lo < seq_len else seq_len + 1
        bins.append((lo, hi))
        lo = hi
    return bins


def summarize(loss_sum: float, tokens: int, nbytes: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bpb": loss_sum / math.log(2) / nbytes if nbytes > 0 else None, "tokens": int(tokens)}


@dataclass
class EvalResult:
    seq_len: int
    loss_sum: float
    tokens: int
    bytes: int
    seconds: float
    bin_loss: Optional[list] = None     # per position_bins(seq_len): summed loss
    bin_tokens: Optional[list] = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"seq_len": self.seq_len, **summarize(self.loss_sum, self.tokens, self.bytes)}

    def by_position(self) -> list:
        return [{"lo": lo, "hi": hi, "tokens": int(n), "loss": (s / n if n else None)}
                for (lo, hi), s, n in zip(position_bins(self.seq_len), self.bin_loss, self.bin_tokens)]


def _layout(dp_rank, dp_size, sp_size):
    if dp_size is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        dp_size, dp_rank = world // sp_size, (dist.get_rank() // sp_size if dist.is_initialized() else 0)
    return dp_rank, dp_size


@torch.no_grad()
def evaluate_windows(model, heldout: HeldOut, micro_batch_size: int = 1, *, positions: bool = False,
                     reset_at_doc_boundaries: bool = True, sp_group=None, dp_rank: Optional[int] = None,
                     dp_size: Optional[int] = None, device=None, progress=None) -> EvalResult:
    """Evaluate every window of `heldout` once (see the module docstring); collective over all ranks when a
    process group exists. `sp_group`: this rank's SP group (None: no SP). `progress(n)`: called with the windows
    done after each micro-batch (rank 0's progress bar). Restores the model's train/eval mode and the torch RNG
    state: evaluation leaves training exactly as it found it."""
    _, sp_size = sp_place(sp_group)
    dp_rank, dp_size = _layout(dp_rank, dp_size, sp_size)
    device = device or next(model.parameters()).device
    was_training = model.training
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    t0 = time.time()
    L = heldout.seq_len
    nb = len(position_bins(L))
    sums = torch.zeros(3, dtype=torch.float64)        # loss, tokens, bytes
    bins = torch.zeros(2, nb, dtype=torch.float64)    # loss, tokens per position bin
    # bin index of each position: floor(log2(p)) (position L falls in the last, closed bin)
    pos_bin = (torch.arange(1, L + 1, dtype=torch.float64).log2().floor().long()).clamp(max=nb - 1)
    try:
        for rows in rank_batches(heldout.num_windows, dp_rank, dp_size, micro_batch_size):
            window = {k: v.to(device) for k, v in heldout.batch(rows).items()}
            f = forward_window(model, window, sp_group, causal=True, reset_at_doc_boundaries=reset_at_doc_boundaries,
                               loss_reduction="none" if positions else "sum")
            piece = f.piece
            counted = piece["labels"] != IGNORE_INDEX
            if positions:
                tl = f.out.loss.double().cpu()
                b = pos_bin[(piece["positions"] - 1).cpu()]
                c = counted.cpu()
                bins[0].index_add_(0, b[c], tl[c])
                bins[1].index_add_(0, b[c], torch.ones_like(tl[c]))
                loss_sum = tl.sum()
            else:
                loss_sum = f.out.loss.detach().double().cpu()
            sums += torch.stack([loss_sum, counted.sum().double().cpu(),
                                 piece["target_bytes"].sum().double().cpu()])
            if progress is not None:
                progress(sum(r is not None for r in rows) * dp_size)
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    if dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([sums, bins.reshape(-1)])
        dist.all_reduce(flat)
        sums, bins = flat[:3], flat[3:].reshape(2, nb)
    return EvalResult(seq_len=L, loss_sum=float(sums[0]), tokens=int(sums[1]), bytes=int(sums[2]),
                      seconds=time.time() - t0,
                      bin_loss=bins[0].tolist() if positions else None,
                      bin_tokens=[int(x) for x in bins[1].tolist()] if positions else None)
