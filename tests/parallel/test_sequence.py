"""EMA boundary exchange == unsplit EMA (fwd, grads, bytes), on 2 and 4 gloo CPU processes.

    PYTHONPATH=. python -m pytest -x -q tests/parallel/test_sequence.py

The EMA here is the op on plain tensors: each slice scanned from zero by the fp64-capable reference scan
(ema_scan_ref) with crossing_decay and incoming_contribution, as docs/CONTRACTS.md ("EMA boundary exchange") asks
the model to; the unsplit reference is the same scan over the whole window. test_sequence_model.py checks the real
model. Every worker also recomputes the unsplit reference itself, so one spawn covers a whole grid of cases.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatrain.ops.ema import crossing_decay, ema_scan_ref, incoming_contribution
from megatrain.parallel.sequence import (COMM_STATS, make_ema_boundary, reduce_sp_loss, reset_comm_stats,
                                         sum_grads_over, validate_sp)

from tests.dist_util import run_ranks

B, D, N = 2, 3, 2


def _doc_ids(L: int, slice_len: int) -> torch.Tensor:
    """Row 0: one change at t=3, then a document spanning every later slice (state crosses several ranks).
    Row 1: changes exactly at odd slice edges and one inside slice 1 (so slice 1 has both)."""
    change = torch.zeros(2, L, dtype=torch.int64)
    change[0, 3] = 1
    change[1, slice_len:L:2 * slice_len] = 1
    change[1, slice_len + slice_len // 2 + 1] = 1
    return change.cumsum(1) + 7


def _make_params(bidirectional: bool, dtype, seed: int) -> dict:
    """One EMA layer y = silu(ema_fwd(x) [+ ema_bwd(x)] + omega * x): (a, c, logq) [D, N] per direction."""
    g = torch.Generator().manual_seed(seed)
    params = {"omega": torch.randn(D, generator=g, dtype=dtype)}
    for d in ("forward", "backward")[:2 if bidirectional else 1]:
        params[d + ".a"] = torch.randn(D, N, generator=g, dtype=dtype)
        params[d + ".c"] = torch.randn(D, N, generator=g, dtype=dtype)
        params[d + ".logq"] = torch.log(torch.rand(D, N, generator=g, dtype=dtype) * 0.6 + 0.35)
    for p in params.values():
        p.requires_grad_(True)
    return params


def _resets(doc_ids):
    return None if doc_ids is None else F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=False)


def _in_direction(x, doc_ids, direction):
    if direction == "forward":
        return x, doc_ids
    return x.flip(1), None if doc_ids is None else doc_ids.flip(1)


def _directions(params):
    return [d for d in ("forward", "backward") if d + ".a" in params]


def _coeffs(params, direction):
    return params[direction + ".a"], params[direction + ".c"], params[direction + ".logq"]


def _full(x, params, doc_ids):
    y = x * params["omega"]
    for d in _directions(params):
        xs, ds = _in_direction(x, doc_ids, d)
        ema, _ = ema_scan_ref(xs, *_coeffs(params, d), _resets(ds))
        y = y + (ema if d == "forward" else ema.flip(1))
    return F.silu(y)


def _sliced(x, params, boundary, doc_ids, two_phase=False):
    """`two_phase`: use `boundary.start(...)` / `handle.wait()` as the model does -- every direction's exchange is
    started before any is waited for, and they are waited for in reverse order."""
    L = x.shape[1]
    y = x * params["omega"]
    pending = []
    for d in _directions(params):
        xs, ds = _in_direction(x, doc_ids, d)
        a, c, logq = _coeffs(params, d)
        ema, local_state = ema_scan_ref(xs, a, c, logq, _resets(ds))
        decay = crossing_decay(logq, x.shape[0], L, _resets(ds))
        if two_phase:
            pending.append((d, ema, ds, c, logq, boundary.start(local_state, decay, d)))
            continue
        ema = ema + incoming_contribution(boundary(local_state, decay, d), c, logq, L, _resets(ds), block=4)
        y = y + (ema if d == "forward" else ema.flip(1))
    for d, ema, ds, c, logq, handle in reversed(pending):
        ema = ema + incoming_contribution(handle.wait(), c, logq, L, _resets(ds), block=4)
        y = y + (ema if d == "forward" else ema.flip(1))
    return F.silu(y)


def _run_case(sp_rank, P, group, dtype, bidirectional, use_docs, slice_len, use_checkpoint=False, seed=0,
              two_phase=False):
    """One configuration on this rank; returns (COMM_STATS after fwd, after bwd) for the byte checks."""
    L = P * slice_len
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g, dtype=dtype)
    w = torch.randn(B, L, D, generator=g, dtype=dtype)
    doc_ids = _doc_ids(L, slice_len) if use_docs else None
    layers = [_make_params(bidirectional, dtype, seed=seed + k) for k in range(2)]

    # Unsplit reference, two stacked EMA layers.
    x_full = x.clone().requires_grad_(True)
    y = x_full
    for params in layers:
        y = _full(y, params, doc_ids)
    loss_full = (y * w).sum()
    loss_full.backward()
    y_full = y.detach()
    ref_grads = [p.grad.clone() for params in layers for p in params.values()]
    for params in layers:
        for p in params.values():
            p.grad = None

    # This rank's slice.
    sl = slice(sp_rank * slice_len, (sp_rank + 1) * slice_len)
    x_loc = x[:, sl].clone().requires_grad_(True)
    boundary = make_ema_boundary(group, doc_ids=None if doc_ids is None else doc_ids[:, sl])
    reset_comm_stats()
    h = x_loc
    for params in layers:
        fn = lambda inp, params=params: _sliced(inp, params, boundary,  # noqa: E731
                                                None if doc_ids is None else doc_ids[:, sl], two_phase)
        h = checkpoint(fn, h, use_reentrant=False) if use_checkpoint else fn(h)
    loss_loc = (h * w[:, sl]).sum()
    after_fwd = (COMM_STATS.forward_bytes, COMM_STATS.forward_calls, COMM_STATS.backward_bytes)
    loss_loc.backward()
    after_bwd = (COMM_STATS.forward_bytes, COMM_STATS.forward_calls, COMM_STATS.backward_bytes,
                 COMM_STATS.backward_calls)

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    what = (f"P={P} rank={sp_rank} {dtype} bidi={bidirectional} docs={use_docs} ckpt={use_checkpoint} "
            f"two_phase={two_phase}")
    torch.testing.assert_close(h.detach(), y_full[:, sl], **tol, msg=lambda m: f"{what} output: {m}")
    total = loss_loc.detach().clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, loss_full.detach(), **tol, msg=lambda m: f"{what} loss: {m}")
    # Input gradients need no reduction: the boundary's backward already brought other ranks' contributions.
    torch.testing.assert_close(x_loc.grad, x_full.grad[:, sl], **tol, msg=lambda m: f"{what} dL/dx: {m}")
    split_params = [p for params in layers for p in params.values()]
    sum_grads_over(split_params, group)
    for p, want in zip(split_params, ref_grads):
        torch.testing.assert_close(p.grad, want, **tol, msg=lambda m: f"{what} param grad: {m}")
    return after_fwd, after_bwd


def _ema_worker(rank, world_size):
    P, group = world_size, dist.group.WORLD
    for dtype in (torch.float64, torch.float32):
        for bidirectional in (False, True):
            for use_docs in (False, True):
                fwd, bwd = _run_case(rank, P, group, dtype, bidirectional, use_docs, slice_len=8)
                # Bytes: layers x directions x (state + decay = 2*B*D*N elements) x itemsize x (P-1), each way.
                dirs = 2 if bidirectional else 1
                per_way = 2 * dirs * (2 * B * D * N) * torch.finfo(dtype).bits // 8 * (P - 1)
                assert fwd == (per_way, 2 * dirs, 0), (fwd, per_way)
                assert bwd == (per_way, 2 * dirs, per_way, 2 * dirs), (bwd, per_way)
    # Bytes do not depend on the sequence length.
    short = _run_case(rank, P, group, torch.float64, True, True, slice_len=4)
    long = _run_case(rank, P, group, torch.float64, True, True, slice_len=12)
    assert short == long, (short, long)
    # Activation checkpointing: the recompute calls the boundary again during backward, same result.
    fwd, bwd = _run_case(rank, P, group, torch.float64, True, True, slice_len=8, use_checkpoint=True)
    assert bwd[0] == 2 * fwd[0] and bwd[2] == fwd[0], (fwd, bwd)
    # Two-phase start()/wait() (as the model uses it): both directions in flight at once, waited in reverse
    # order; with and without checkpointing. Same results and the same collectives.
    for use_checkpoint in (False, True):
        two = _run_case(rank, P, group, torch.float64, True, True, slice_len=8, use_checkpoint=use_checkpoint,
                        two_phase=True)
        one = _run_case(rank, P, group, torch.float64, True, True, slice_len=8, use_checkpoint=use_checkpoint)
        assert two == one, (two, one)
    _check_handle(group)
    _check_backward_overlap(group)
    _check_bad_inputs(group)
    _check_loss_helper(rank, P, group)
    if world_size == 4:
        _check_dp_sp_groups(rank, world_size)


def _check_loss_helper(rank, P, group):
    """reduce_sp_loss: rank r holds a summed loss r+1 over r+2 tokens -> mean = sum(r+1)/sum(r+2), grad W/T."""
    T = sum(r + 2 for r in range(P))
    for W in (1, 3):
        loss_sum = torch.tensor(rank + 1.0, requires_grad=True)
        out = reduce_sp_loss(loss_sum, torch.tensor(rank + 2), group, grad_average_size=W)
        out.backward_loss.backward()
        assert out.total_tokens.item() == T
        assert out.mean_loss.item() == pytest.approx(sum(r + 1 for r in range(P)) / T, rel=1e-7)
        assert loss_sum.grad.item() == pytest.approx(W / T, rel=1e-7)
    empty = reduce_sp_loss(torch.tensor(0.0, requires_grad=True), 0, group)      # every label ignored
    assert empty.mean_loss.item() == 0.0 and empty.total_tokens.item() == 0
    with pytest.raises(ValueError, match="grad_average_size must be a positive integer, got 0"):
        reduce_sp_loss(torch.tensor(1.0), 1, group, grad_average_size=0)
    with pytest.raises(ValueError, match="scalar"):
        reduce_sp_loss(torch.ones(2), 1, group)


def _check_handle(group):
    """The exchange starts at start() (counted then), h_in exists only at wait(), and wait() is idempotent."""
    boundary = make_ema_boundary(group)
    reset_comm_stats()
    s = torch.ones(B, D, N, dtype=torch.float64)
    handle = boundary.start(s, s * 0.5, "forward")
    assert COMM_STATS.forward_calls == 1
    h_in = handle.wait()
    assert handle.wait() is h_in and COMM_STATS.forward_calls == 1
    rank = dist.get_rank(group)
    # h_in = sum over earlier slices j of 0.5^(r-1-j) * 1
    torch.testing.assert_close(h_in, torch.full_like(s, sum(0.5 ** (rank - 1 - j) for j in range(rank))))


def _check_backward_overlap(group):
    """Backward mirrors the forward overlap: the reduce-scatter starts (behind the recurrence's backward) before
    the gradient of the local output -- created between start() and wait() -- and is waited for after it."""
    from megatrain.parallel import sequence
    events = []

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            events.append("local output")
            return grad

    start, wait = sequence._Exchange.start_scatter, sequence._Exchange.wait_scatter
    sequence._Exchange.start_scatter = lambda ex, g: (events.append("start"), start(ex, g))[1]
    sequence._Exchange.wait_scatter = lambda ex: (events.append("wait"), wait(ex))[1]
    try:
        s = torch.randn(B, D, N, dtype=torch.float64, requires_grad=True)
        x = torch.randn(B, 4, D, dtype=torch.float64, requires_grad=True)
        handle = make_ema_boundary(group).start(s * 1.0, torch.sigmoid(s), "forward")
        local = Mark.apply(x * 2.0)
        (local.sum() + handle.wait().sum()).backward()
    finally:
        sequence._Exchange.start_scatter, sequence._Exchange.wait_scatter = start, wait
    assert events == ["start", "local output", "wait"], events


def _check_bad_inputs(group):
    boundary = make_ema_boundary(group)
    s = torch.zeros(B, D, N)
    with pytest.raises(ValueError, match="direction"):
        boundary(s, s, "left")
    with pytest.raises(ValueError, match="direction"):
        boundary.start(s, s, "left")
    with pytest.raises(ValueError, match=r"same shape \[B, D, N\]"):
        boundary(s, torch.zeros(B, D, N + 1), "forward")
    with pytest.raises(ValueError, match="dtype"):
        boundary(s, s.double(), "forward")
    with pytest.raises(ValueError, match="doc_ids must be"):
        make_ema_boundary(group, doc_ids=torch.zeros(B, dtype=torch.int64))
    with_docs = make_ema_boundary(group, doc_ids=torch.zeros(B, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch size 2"):
        with_docs(torch.zeros(B + 1, D, N), torch.zeros(B + 1, D, N), "forward")


def _check_dp_sp_groups(rank, world_size):
    """World 4 = 2 DP replicas x SP 2 (consecutive ranks): each SP group only talks inside itself."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    assert make_ema_boundary(group).rank == rank % 2
    # Different data per replica (seed), and a one-rank group gives no boundary at all.
    _run_case(rank % 2, 2, group, torch.float64, True, True, slice_len=4, seed=10 * (rank // 2))
    singles = [dist.new_group([r]) for r in range(world_size)]
    assert make_ema_boundary(singles[rank]) is None


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.timeout(300)
def test_ema_boundary_matches_unsplit(world_size):
    """SP=2 and SP=4 (the latter also as DP 2 x SP 2 groups) == unsplit, bytes, checkpointing, bad inputs."""
    run_ranks(_ema_worker, world_size)


def test_validate_sp_accepts_and_returns_slice_length():
    assert validate_sp(4096, 4, 128, True) == 1024
    assert validate_sp(100, 1, -1, False) == 100          # SP=1 needs nothing of the model


@pytest.mark.parametrize("args, kwargs, message", [
    ((1000, 3, 8, True), {}, r"data.seq_len=1000 is not divisible by parallel.sequence_parallel_size=3"),
    ((96, 2, 32, True), {}, r"slice length .* = 48 is not a multiple of model.chunk_size=32"),
    ((64, 2, -1, False), {}, r"needs model.use_chunking=True"),
    ((64, 2, -1, True), {}, r"model.chunk_size must be a positive integer"),
    ((64, 0, 8, True), {}, r"parallel.sequence_parallel_size must be a positive integer, got 0"),
    ((0, 2, 8, True), {}, r"data.seq_len must be a positive integer, got 0"),
    ((64, 2, 8, True), {"truncation": 16}, r"model.truncation=16 is not supported"),
    ((64, 2, 8, True), {"normalization_type": "batchnorm"}, r"model.normalization_type='batchnorm' is not"),
])
def test_validate_sp_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_sp(*args, **kwargs)


def test_make_boundary_needs_distributed():
    if dist.is_initialized():
        pytest.skip("another test initialized torch.distributed in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_ema_boundary(None)

