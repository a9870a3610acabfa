"""Sequence parallelism with the real model: SP=2/4 slices == the unsplit window (EMA layer and full LMs).

    PYTHONPATH=. python -m pytest -x -q tests/parallel/test_sequence_model.py

Each gloo worker builds the same weights and data (fixed seeds), runs the unsplit reference itself, then its own
slice with the EMA boundary; losses are summed and gradients all-reduced over the SP group and compared.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from megatrain.model import MegaConfig, MegaForCausalLM, MegaForMaskedLM
from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.ops.lm_loss import IGNORE_INDEX
from megatrain.parallel.checkpointing import apply_checkpointing, policy_from_config
from megatrain.parallel.protocol import sp_forward_backward
from megatrain.parallel.sequence import COMM_STATS, make_ema_boundary, reset_comm_stats, sum_grads_over, validate_sp

from tests.dist_util import run_ranks

B, SLICE = 2, 8


def _packed_doc_ids(L: int, slice_len: int) -> torch.Tensor:
    """Row 0: one document spanning everything after t=3. Row 1: starts at every odd slice edge and inside slice 1."""
    change = torch.zeros(B, L, dtype=torch.int64)
    change[0, 3] = 1
    change[1, slice_len:L:2 * slice_len] = 1
    change[1, slice_len + slice_len // 2 + 1] = 1
    return change.cumsum(1)


def _check_ema_layer(rank, P, group):
    """MultiDimDampedEMA alone, fp64, small blocks so a slice holds several: outputs and all gradients."""
    for bidirectional in (False, True):
        torch.manual_seed(0)
        D, N, L = 4, 3, P * SLICE
        ema = MultiDimDampedEMA(D, N, bidirectional, block_size=3).double()
        x = torch.randn(B, L, D, dtype=torch.float64)
        w = torch.randn(B, L, D, dtype=torch.float64)
        doc_ids = _packed_doc_ids(L, SLICE)
        x_full = x.clone().requires_grad_(True)
        y_full, _ = ema(x_full, doc_ids=doc_ids)
        (y_full * w).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in ema.named_parameters()}
        ema.zero_grad(set_to_none=True)

        sl = slice(rank * SLICE, (rank + 1) * SLICE)
        x_loc = x[:, sl].clone().requires_grad_(True)
        y_loc, _ = ema(x_loc, doc_ids=doc_ids[:, sl], boundary=make_ema_boundary(group, doc_ids[:, sl]))
        (y_loc * w[:, sl]).sum().backward()
        what = f"EMA P={P} rank={rank} bidirectional={bidirectional}"
        torch.testing.assert_close(y_loc, y_full[:, sl].detach(), rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(x_loc.grad, x_full.grad[:, sl], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{what} dL/dx: {m}")
        sum_grads_over(ema.parameters(), group)
        for n, p in ema.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{what} grad {n}: {m}")


def _tiny_config(objective: str, gradient_checkpointing: bool) -> MegaConfig:
    return MegaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=32,
                      ema_projection_size=4, shared_representation_size=8, nffn_hidden_size=32,
                      bidirectional=objective == "mlm", is_decoder=objective == "clm", use_chunking=True,
                      chunk_size=4, dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      nffn_activation_dropout_prob=0.0, ema_block_size=4,
                      gradient_checkpointing=gradient_checkpointing)


def _batch(objective: str, L: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (B, L), generator=g)
    if objective == "clm":
        # pre-shifted as the loader makes them: labels[t] is the token after t (the last one has none here)
        labels = torch.cat([ids[:, 1:], torch.full((B, 1), IGNORE_INDEX)], dim=1)
    else:
        masked = torch.rand(B, L, generator=g) < 0.3
        masked[:, :SLICE] = False     # SP rank 0 has no loss tokens: it must still run every boundary backward
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
        ids = torch.where(masked, torch.ones_like(ids), ids)          # token 1 plays [MASK]
    return {"input_ids": ids, "labels": labels, "doc_ids": _packed_doc_ids(L, SLICE)}


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _check_lm(rank, P, group, objective, gradient_checkpointing):
    torch.manual_seed(0)
    cfg = _tiny_config(objective, gradient_checkpointing)
    model = (MegaForCausalLM if objective == "clm" else MegaForMaskedLM)(cfg).train()
    apply_checkpointing(model, policy_from_config(gradient_checkpointing))   # as the trainer applies it
    L = P * SLICE
    assert validate_sp(L, P, cfg.chunk_size, cfg.use_chunking) == SLICE
    batch = _batch(objective, L, cfg.vocab_size)
    kw = dict(labels_shifted=True) if objective == "clm" else {}

    # SP=1 on the whole window: mean token loss, its gradient.
    out = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"], loss_reduction="sum", **kw)
    ref_loss = out.loss / out.num_loss_tokens
    ref_loss.backward()
    ref_grads = _flat_grads(model)
    model.zero_grad(set_to_none=True)

    reset_comm_stats()
    # the protocol train_step runs (slice, boundary, forward, loss reduction, backward), without DeepSpeed
    loss = sp_forward_backward(model, batch, group, causal=objective == "clm")
    sum_grads_over(model.parameters(), group)
    grads = _flat_grads(model)

    what = f"{objective} P={P} rank={rank} ckpt={gradient_checkpointing}"
    rel = abs(loss.mean_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert rel <= 1e-6, f"{what}: SP loss {loss.mean_loss.item()!r} vs SP=1 {ref_loss.item()!r} (rel {rel:.2e})"
    norm_gap = abs(grads.norm().item() - ref_grads.norm().item())
    assert norm_gap <= 1e-5, f"{what}: grad norm {grads.norm().item()} vs {ref_grads.norm().item()}"
    worst = (grads - ref_grads).abs().max().item()
    # elementwise too (fp32 summation order differs; measured ~1e-7 of the largest gradient)
    assert worst <= 1e-6 * ref_grads.abs().max().item(), f"{what}: max grad difference {worst:.2e}"

    # Only the small states crossed ranks: layers x directions x (state + decay) x (P-1), fp32, each way.
    dirs = 2 if cfg.bidirectional else 1
    per_way = cfg.num_hidden_layers * dirs * 2 * B * cfg.hidden_size * cfg.ema_projection_size * 4 * (P - 1)
    recompute = 2 if gradient_checkpointing else 1       # the checkpointed forward runs again in backward
    assert COMM_STATS.forward_bytes == recompute * per_way, (what, COMM_STATS, per_way)
    assert COMM_STATS.backward_bytes == per_way, (what, COMM_STATS, per_way)
    assert COMM_STATS.setup_bytes == B * 2 * 8 * (P - 1), (what, COMM_STATS)


def _worker(rank, world_size):
    group = dist.group.WORLD
    _check_ema_layer(rank, world_size, group)
    for objective in ("clm", "mlm"):
        _check_lm(rank, world_size, group, objective, gradient_checkpointing=False)
    _check_lm(rank, world_size, group, "mlm", gradient_checkpointing=True)


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.timeout(300)
def test_sp_model_matches_unsplit(world_size):
    run_ranks(_worker, world_size)
