"""Exact sequence parallelism (SP) for MEGA: hand the EMA boundary state from rank to rank.

Use (one SP group = ranks that each hold one contiguous slice of the same window, in slice order):

    from megatrain.parallel.sequence import make_ema_boundary, validate_sp, reduce_sp_loss
    from megatrain.parallel.protocol import sp_slice         # the slicer: step 1 of the window protocol

    validate_sp(seq_len, sp_size, cfg.chunk_size, cfg.use_chunking,                # once, before any work
                truncation=cfg.truncation, normalization_type=cfg.normalization_type)
    piece = sp_slice(batch, sp_rank, sp_size)                                  # this rank's slice, every key
    boundary = make_ema_boundary(sp_group, doc_ids=piece.get("doc_ids"))       # once per micro-batch
    # (the model calls boundary.start(local_state, decay, direction).wait() per EMA layer/direction; see Overlap)
    out = model(piece["input_ids"], labels=piece["labels"], doc_ids=piece.get("doc_ids"),
                labels_shifted=True, loss_reduction="sum", ema_boundary=boundary)
    loss = reduce_sp_loss(out.loss, out.num_loss_tokens, sp_group)         # see "Loss normalisation"
    loss.backward_loss.backward()          # then gradients are summed over SP (DeepSpeed + groups.py do it)
    log(loss.mean_loss)

Tests: PYTHONPATH=. python -m pytest -q tests/parallel/test_sequence.py tests/parallel/test_sequence_model.py
Benchmark: python bench/bench_sp.py

Why it is exact: the EMA is linear in its incoming state. Every SP rank runs its slice with zero incoming state
and reports, per EMA layer and direction, two small tensors [B, D, N]: `local_state` (the state its slice produces
at its far edge) and `decay` (what an incoming state is multiplied by when crossing the whole slice). The boundary
all-gathers both and runs the state recurrence over the slices locally (megatrain/ops/ema/state.py: `prefix`, the
argument for exactness is there), so rank r receives (forward direction)

    h_in_r = sum_{j<r} (prod_{j<i<r} decay_i) local_j          ("backward" direction: mirrored, j > r)

and the model adds the closed-form contribution of h_in_r to its slice. This file is communication only; the
backward of the recurrence is autograd's. Only these small tensors cross ranks
(never sequence activations): per EMA layer and direction one all-gather in forward and one reduce-scatter in
backward (the adjoint of the all-gather), each rank sending (P-1) * 2*B*D*N * itemsize bytes per collective (ring
model), independent of the sequence length. `COMM_STATS` counts them.

Overlap: the boundary is two-phase. The EMA calls `handle = boundary.start(local_state, decay, direction)` as
soon as its slice's end state is known -- the all-gather starts asynchronously -- then computes its local output
(which needs no incoming state), and only then `h_in = handle.wait()`. In backward the mirror image happens by
itself: the wait's backward (after the recurrence's) starts the reduce-scatter and the all-gather's backward,
which autograd runs after the gradient of the local output (created between the two in forward), waits for it.
`boundary(...)` is start + wait at once (no overlap).

Document boundaries (packed windows): the model zeroes `decay` for rows whose slice contains a doc change, but a
change exactly *at* a slice edge is invisible to both neighbours. So `make_ema_boundary(group, doc_ids=...)`
all-gathers each slice's first/last doc id once per micro-batch (tiny, B*2 int64) and cuts the state at edges where
they differ. Without doc_ids every row is one document.

Rules every SP rank must follow (else the collectives mismatch and hang):
- the same model, the same number of EMA layers/directions, calling the boundary in the same order;
- the same activation-checkpointing setting: a recompute calls the boundary again during backward, which is fine
  because every rank recomputes at the same point of its (identical) backward graph;
- SP rank order = slice order (`dist.get_rank(sp_group)` is the slice index).

Loss normalisation (the trainer's job; `reduce_sp_loss` helps): each rank computes the *sum* of its slice's token
losses (`loss_reduction="sum"`) and its token count n_r. With T = sum of n_r over the ranks whose tokens form the
batch the loss averages over, the mean loss is sum_r loss_r / T and its gradient is sum_r grad(loss_r / T): each
rank backprops x_r = loss_r / T and the gradients are *summed* over those ranks. An engine that instead averages
gradients over W ranks computes (1/W) sum_r grad(x_r), so there each rank backprops x_r = W * loss_r / T
(`grad_average_size=W`). With megatrain.parallel.groups as DeepSpeed's mpu, gradients are summed over the SP ranks
of a window and averaged over DP replicas, so the trainer uses `reduce_sp_loss(loss, n, sp_group)` (T = the
window's tokens, W = 1): exactly the SP=1 gradient of each window, averaged over DP as without SP. Tests and
benchmarks without DeepSpeed sum over the SP group with `sum_grads_over`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterable, NamedTuple, Optional

import torch
import torch.distributed as dist

from megatrain.model.mega.config import MegaConfig
from megatrain.ops.ema.state import DIRECTIONS, prefix, traversal

__all__ = [
    "COMM_STATS",
    "CommStats",
    "BoundaryHandle",
    "EMABoundary",
    "SPLoss",
    "make_ema_boundary",
    "reduce_sp_loss",
    "reset_comm_stats",
    "sum_grads_over",
    "check_window",
    "validate_sp",
]

# torch >= 2.13 names; the older *_tensor names are the same collectives (deprecated there).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------------------------------------------
# Validation (the trainer calls this before building anything)
# ----------------------------------------------------------------------------------------------------------------
def check_window(seq_len: int, sp_size: int, model, *, key: str = "data.seq_len", shown=None,
                 sp_key: str = "parallel.sequence_parallel_size") -> int:
    """The window rule, once (training stages, in-training evaluation and SP all obey it): a window of
    ``seq_len`` tokens splits into ``sp_size`` contiguous slices of whole chunks (windows are never padded; SP > 1
    also needs the model's state-carry rule), and the attention span at the slice length fits the model. Returns
    the slice length; ValueError naming ``key`` (shown as ``shown``, default the length) and what is expected.
    ``model``: a family's config (its chunking fields; ``check_attention_span`` when it has one). ``sp_key``: how
    the SP size is named (the run config's key, or a command-line flag)."""
    shown = seq_len if shown is None else shown
    for name, value in ((key, seq_len), (sp_key, sp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {shown if name == key else value!r}")
    chunk, chunking = model.chunk_size, model.use_chunking
    if seq_len % sp_size:
        raise ValueError(f"{key}={shown} is not divisible by {sp_key}={sp_size}")
    slice_len = seq_len // sp_size
    if sp_size > 1:
        rule = getattr(model, "state_carry_problem", MegaConfig.state_carry_problem)  # the family's own rule
        problem = rule(chunking, getattr(model, "truncation", None), getattr(model, "normalization_type", None))
        if problem is not None:
            field, why = problem
            if field == "use_chunking":
                raise ValueError(f"{sp_key}={sp_size} needs model.use_chunking=True "
                                 f"(got use_chunking={chunking!r}): {why}")
            raise ValueError(f"model.{field}={getattr(model, field)!r} is not supported with sequence "
                             f"parallelism: {why}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"model.chunk_size must be a positive integer with sequence parallelism, got {chunk!r}")
    if chunking and slice_len % chunk:
        raise ValueError(f"{key}={shown}: must be a multiple of model.chunk_size={chunk}" if sp_size == 1 else
                         f"{key}={shown}: SP slice length {seq_len}/{sp_size} = {slice_len} is not a multiple of "
                         f"model.chunk_size={chunk} (must be a multiple of model.chunk_size x "
                         f"{sp_key} = {chunk} x {sp_size})")
    if hasattr(model, "check_attention_span"):
        try:
            model.check_attention_span(slice_len)
        except ValueError as e:
            raise ValueError(f"{key}={shown}: {e}") from None
    return slice_len


def validate_sp(seq_len: int, sp_size: int, chunk_size: int, use_chunking: bool,
                *, truncation: Optional[int] = None, normalization_type: Optional[str] = None) -> int:
    """``check_window`` for a layout given field by field (no attention-span check); returns the slice length."""
    return check_window(seq_len, sp_size, SimpleNamespace(chunk_size=chunk_size, use_chunking=use_chunking,
                                                          truncation=truncation,
                                                          normalization_type=normalization_type))


# ----------------------------------------------------------------------------------------------------------------
# Communication accounting
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes this process sent for SP boundary exchange (ring model: a collective over P ranks on a chunk of c
    bytes sends (P-1)*c per rank for both all-gather and reduce-scatter)."""
    forward_bytes: int = 0      # all-gathers of (local_state, decay)
    backward_bytes: int = 0     # reduce-scatters of their gradients
    forward_calls: int = 0
    backward_calls: int = 0
    setup_bytes: int = 0        # per-micro-batch doc-id edge exchange

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes + self.setup_bytes


COMM_STATS = CommStats()


def reset_comm_stats() -> CommStats:
    """Zero the counters; return a copy of what they held."""
    old = CommStats(**vars(COMM_STATS))
    for name in vars(COMM_STATS):
        setattr(COMM_STATS, name, 0)
    return old


# ----------------------------------------------------------------------------------------------------------------
# The exchange: communication only (the math is ops/ema/state.py's prefix over the gathered slices)
# ----------------------------------------------------------------------------------------------------------------
def _gather_flat(t: torch.Tensor, group, size: int, async_op: bool = True):
    """All-gather a contiguous tensor from every rank of `group` -> (work or None, flat [P * t.numel()] buffer,
    rank order). Flat buffers: gloo wants the concatenation along dim 0, not a stacked extra dim."""
    flat = t.new_empty(size * t.numel())
    return _all_gather(flat, t.reshape(-1), group=group, async_op=async_op), flat


def _gather_stacked(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """All-gather a contiguous tensor from every rank of `group` into [P, *t.shape] (rank order), blocking: a
    plain synchronous collective, as before the helper was shared (no work object outlives the call)."""
    _, flat = _gather_flat(t, group, size, async_op=False)
    return flat.view((size,) + tuple(t.shape))


class _Exchange:
    """One boundary exchange in flight (one EMA layer, one direction, one forward call), shared by its two autograd
    nodes. Forward: _Launch starts the all-gather of (local_state, decay) without waiting; _Wait waits for it.
    Backward, mirrored: _Wait's backward starts the reduce-scatter of the gathered tensors' gradient (autograd's,
    through state.py's prefix); _Launch's backward waits for it. Between the two the caller computes what needs no
    incoming state (the slice's local EMA output, forward; its gradient, backward), so the collectives overlap
    with that work."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size
        self.gather = self.scatter = None          # (work, buffer) of the collective in flight
        self.complex = False                       # a complex state, sent as real (re, im) pairs

    def start_gather(self, payload: torch.Tensor) -> torch.Tensor:
        work, flat = _gather_flat(payload, self.group, self.size)
        COMM_STATS.forward_bytes += (self.size - 1) * payload.numel() * payload.element_size()
        COMM_STATS.forward_calls += 1
        # the payload is kept alive with the work: the collective reads it in the background
        self.gather = (work, flat, payload)
        self.shape = (self.size,) + tuple(payload.shape)
        # the flat buffer itself, not a view of it: autograd forbids writing to the base of a view that a custom
        # Function returned, and the collective's wait() counts as a write (see _Wait.forward)
        return flat

    def wait_gather(self) -> None:
        work = self.gather[0]
        self.gather = None
        work.wait()

    def start_scatter(self, contributions: torch.Tensor) -> None:
        mine = contributions.new_empty(contributions.shape[1:])
        work = _reduce_scatter(mine.view(-1), contributions.view(-1), op=dist.ReduceOp.SUM, group=self.group,
                               async_op=True)
        COMM_STATS.backward_bytes += (self.size - 1) * mine.numel() * mine.element_size()
        COMM_STATS.backward_calls += 1
        self.scatter = (work, mine, contributions)

    def wait_scatter(self) -> torch.Tensor:
        work, mine, _ = self.scatter
        self.scatter = None
        work.wait()
        return mine


class _Launch(torch.autograd.Function):
    """(local_state, decay) -> the flat [P * 2*B*D*N] all-gather buffer, still being filled (read it only through
    _Wait). Backward: the adjoint of an all-gather, a reduce-scatter of the buffer's gradient -- started early by
    _Wait's backward, only waited for here."""

    @staticmethod
    def forward(ctx, local_state, decay, ex: _Exchange):
        payload = torch.stack([local_state.detach(), decay.detach()])                   # [2, B, D, N]
        ex.complex = payload.is_complex()
        if ex.complex:          # a complex state (Megalodon's CEMA) travels as its (re, im) pairs
            payload = torch.view_as_real(payload)
        ctx.ex = ex
        return ex.start_gather(payload.contiguous())

    @staticmethod
    def backward(ctx, grad_gathered):
        mine = ctx.ex.wait_scatter()
        if ctx.ex.complex:
            mine = torch.view_as_complex(mine)
        return mine[0], mine[1], None


class _Wait(torch.autograd.Function):
    """Wait for the all-gather: the flat buffer -> [P, 2, B, D, N] (every slice's local state and decay).
    Backward: start the reduce-scatter of the gradient that reached them (each rank's h_in depends on every slice;
    slice j's gradient is the sum over ranks), waited for in _Launch's backward: autograd runs the gradient of the
    slice's local output (created between the two nodes in forward) in between."""

    @staticmethod
    def forward(ctx, flat, ex: _Exchange):
        # wait() counts as the collective's in-place write (bumps the buffer's version): the view is taken after it
        ex.wait_gather()
        ctx.ex = ex
        return flat.view(ex.shape)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        ctx.ex.start_scatter(grad)
        return grad.view(-1), None


# ----------------------------------------------------------------------------------------------------------------
# The boundary handed to the model
# ----------------------------------------------------------------------------------------------------------------
class BoundaryHandle:
    """An exchange in flight: `wait()` -> h_in [B, D, N] (differentiable; call it once the local work is done)."""

    def __init__(self, gathered: torch.Tensor, ex: _Exchange, rank: int, direction: str,
                 edges: Optional[torch.Tensor]):
        self._gathered, self._ex, self._h_in = gathered, ex, None
        self._rank, self._direction, self._edges = rank, direction, edges

    def wait(self) -> torch.Tensor:
        if self._h_in is None:
            gathered = _Wait.apply(self._gathered, self._ex)                         # [P, 2, B, D, N]
            if self._ex.complex:
                gathered = torch.view_as_complex(gathered)
            local, decay, keep = traversal(self._direction, gathered[:, 0], gathered[:, 1], self._edges)
            # the state entering every slice (P is small); this rank's entry. Every slice's entry, so that h_in
            # depends on the gathered buffer on every rank: _Wait's backward (the reduce-scatter) runs everywhere
            position = self._rank if self._direction == "forward" else self._ex.size - 1 - self._rank
            self._h_in = prefix(local, decay, keep)[position]
            self._gathered = None
        return self._h_in


class EMABoundary:
    """The `ema_boundary` for one SP group and one micro-batch (see module doc). Two-phase, so the exchange overlaps
    the slice's local EMA output: `handle = boundary.start(local_state, decay, direction)` as soon as the local
    end state is known, then `h_in = handle.wait()`. `boundary(local_state, decay, direction) -> h_in` is both at
    once (no overlap)."""

    def __init__(self, group, rank: int, size: int, edges: Optional[torch.Tensor]):
        self.group, self.rank, self.size = group, rank, size
        self._edges = edges      # [P+1, B] bool: False where a document starts exactly at slice edge e

    def start(self, local_state: torch.Tensor, decay: torch.Tensor, direction: str) -> BoundaryHandle:
        if direction not in DIRECTIONS:
            raise ValueError(f"EMA boundary direction must be one of {DIRECTIONS}, got {direction!r}")
        if local_state.dim() != 3 or decay.shape != local_state.shape:
            raise ValueError(f"EMA boundary expects local_state and decay of the same shape [B, D, N], got "
                             f"{tuple(local_state.shape)} and {tuple(decay.shape)}")
        if not (local_state.is_floating_point() or local_state.is_complex()) or decay.dtype != local_state.dtype:
            raise ValueError(f"EMA boundary expects floating (or complex) local_state and decay of one dtype, got "
                             f"{local_state.dtype} and {decay.dtype}")
        edges = self._edges
        if edges is not None:
            if edges.shape[1] != local_state.shape[0]:
                raise ValueError(f"EMA boundary was made for batch size {edges.shape[1]} (doc_ids) but got "
                                 f"local_state with batch size {local_state.shape[0]}")
            edges = edges.to(device=local_state.device)
        ex = _Exchange(self.group, self.size)
        return BoundaryHandle(_Launch.apply(local_state, decay, ex), ex, self.rank, direction, edges)

    def __call__(self, local_state: torch.Tensor, decay: torch.Tensor, direction: str) -> torch.Tensor:
        return self.start(local_state, decay, direction).wait()


def make_ema_boundary(sp_group, doc_ids: Optional[torch.Tensor] = None) -> Optional[EMABoundary]:
    """The `ema_boundary` for `model(...)` on this rank of `sp_group`; None when the group has one rank (then the
    model runs the plain unsplit computation). Pass this slice's `doc_ids` [B, L_slice] (packed windows) and make a
    new boundary per micro-batch: one tiny all-gather finds documents that start exactly at a slice edge."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("make_ema_boundary needs torch.distributed to be initialized (init_process_group)")
    size = dist.get_world_size(sp_group)
    if size == 1:
        return None
    rank = dist.get_rank(sp_group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given sp_group")
    edges = None
    if doc_ids is not None:
        if doc_ids.dim() != 2 or doc_ids.shape[1] < 1:
            raise ValueError(f"doc_ids must be [B, L_slice] with L_slice >= 1, got shape {tuple(doc_ids.shape)}")
        ends = torch.stack([doc_ids[:, 0], doc_ids[:, -1]], dim=1).to(torch.int64).contiguous()   # [B, 2]
        gathered = _gather_stacked(ends, sp_group, size)                                  # [P, B, 2]
        COMM_STATS.setup_bytes += (size - 1) * ends.numel() * ends.element_size()
        # Edge e (between slices e-1 and e) carries state only if the document continues across it; the outer
        # edges 0 and P have no neighbour (nothing crosses them).
        edges = torch.ones((size + 1, ends.shape[0]), dtype=torch.bool, device=doc_ids.device)
        edges[1:size] = gathered[:-1, :, 1] == gathered[1:, :, 0]
    return EMABoundary(sp_group, rank, size, edges)


# ----------------------------------------------------------------------------------------------------------------
# Loss and gradient reduction helpers (see "Loss normalisation" in the module docstring)
# ----------------------------------------------------------------------------------------------------------------
class SPLoss(NamedTuple):
    backward_loss: torch.Tensor   # call .backward() on this (carries the graph of this rank's slice)
    mean_loss: torch.Tensor       # detached global mean token loss, identical on every rank of the group
    total_tokens: torch.Tensor    # T: loss tokens summed over the group


def reduce_sp_loss(loss_sum: torch.Tensor, num_loss_tokens, group, grad_average_size: int = 1) -> SPLoss:
    """Normalise this rank's summed slice loss by the group's total token count (one all-reduce).

    `group` is every rank whose tokens form the batch the loss averages over (the SP group, or DP x SP; None: this
    process alone, no collective); `grad_average_size` W is the number of ranks the gradient reduction later
    *averages* over (1 for a plain sum).
    """
    if loss_sum.dim() != 0:
        raise ValueError(f"reduce_sp_loss expects a scalar summed loss, got shape {tuple(loss_sum.shape)}")
    if isinstance(grad_average_size, bool) or not isinstance(grad_average_size, int) or grad_average_size < 1:
        raise ValueError(f"grad_average_size must be a positive integer, got {grad_average_size!r}")
    tokens = torch.as_tensor(num_loss_tokens, device=loss_sum.device).to(torch.float64).reshape(())
    # float64 keeps the summed loss and integer token counts exact enough for the 1e-6 SP == unsplit check.
    totals = torch.stack([loss_sum.detach().to(torch.float64), tokens])
    if group is not None:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    total_tokens = totals[1]
    # As the model's "mean": 0 (not NaN) when every label of the group is ignored; no host sync needed.
    denom = total_tokens.clamp(min=1)
    backward_loss = loss_sum * (grad_average_size / denom).to(loss_sum.dtype)
    return SPLoss(backward_loss, (totals[0] / denom).to(loss_sum.dtype), total_tokens)


def sum_grads_over(parameters: Iterable[torch.nn.Parameter], group) -> None:
    """All-reduce-sum `.grad` of every parameter over `group` (one flat collective; parameters without grad are
    treated as zero so every rank sends the same layout). For tests/benchmarks without DeepSpeed."""
    params = list(parameters)
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype, copy=True)   # cat promoted mixed dtypes
        offset += n

