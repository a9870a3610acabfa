"""Sequence parallelism with the real model: SP=2/4 slices == the unsplit window (MEGA's EMA layer and LMs;
Megalodon's timestep norm, complex EMA and LM).

    PYTHONPATH=. python -m pytest -x -q tests/parallel/test_sequence_model.py

Each gloo worker builds the same weights and data (fixed seeds), runs the unsplit reference itself, then its own
slice with the EMA boundary; losses are summed and gradients all-reduced over the SP group and compared.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from megatrain.model import MegaConfig, MegaForCausalLM, MegaForMaskedLM, MegalodonConfig, MegalodonForCausalLM
from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.model.megalodon.cema import ComplexEMA
from megatrain.model.megalodon.norms import TimestepNorm
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


def _check_megalodon_layers(rank, P, group):
    """Megalodon's two carried states alone, fp64, through the real boundary: the timestep norm's statistics (in
    additive form) and the complex EMA's state cross the slices; outputs and all gradients equal the unsplit."""
    torch.manual_seed(0)
    D, L = 8, P * SLICE
    for module in (TimestepNorm(D, 2).double(), ComplexEMA(D, 3, block_size=3).double()):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(B, L, D, dtype=torch.float64) + 2
        w = torch.randn(B, L, D, dtype=torch.float64)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, :3] = mask[0, SLICE + 1] = 0
        doc_ids = _packed_doc_ids(L, SLICE)
        x_full = x.clone().requires_grad_(True)
        (module(x_full, mask, doc_ids)[0] * w).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        module.zero_grad(set_to_none=True)
        sl = slice(rank * SLICE, (rank + 1) * SLICE)
        x_loc = x[:, sl].clone().requires_grad_(True)
        y_loc, _ = module(x_loc, mask[:, sl], doc_ids[:, sl], boundary=make_ema_boundary(group, doc_ids[:, sl]))
        (y_loc * w[:, sl]).sum().backward()
        what = f"{type(module).__name__} P={P} rank={rank}"
        torch.testing.assert_close(x_loc.grad, x_full.grad[:, sl], rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{what} dL/dx: {m}")
        sum_grads_over(module.parameters(), group)
        for n, p in module.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"{what} grad {n}: {m}")


def _check_megalodon_lm(rank, P, group, gradient_checkpointing, dtype):
    """The Megalodon LM through the protocol's train step: SP=P == SP=1 (the loss, fp32 from the head, to 1e-6;
    every gradient: fp64 to 1e-10, fp32 to 3e-6 of the largest -- measured 1.1e-6: fp32 rounding of the statistics, the
    fp64 run shows the algorithm exact), and only the small states crossed ranks: per layer the norm's statistics
    ([B, G, 3] float64) and the complex EMA's state ([B, D, N] complex as (re, im) pairs), plus the final norm's."""
    torch.manual_seed(0)
    cfg = MegalodonConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          shared_representation_size=8, intermediate_size=16, nffn_hidden_size=32, cema_ndim=3,
                          chunk_size=4, norm_num_groups=4, ema_block_size=4,
                          gradient_checkpointing=gradient_checkpointing)
    model = MegalodonForCausalLM(cfg).to(dtype).train()
    apply_checkpointing(model, policy_from_config(gradient_checkpointing))
    batch = _batch("clm", P * SLICE, cfg.vocab_size)
    out = model(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"], loss_reduction="sum",
                labels_shifted=True, return_logits=False)
    ref_loss = out.loss / out.num_loss_tokens
    ref_loss.backward()
    ref_grads = _flat_grads(model)
    model.zero_grad(set_to_none=True)
    reset_comm_stats()
    loss = sp_forward_backward(model, batch, group, causal=True)
    sum_grads_over(model.parameters(), group)
    grads = _flat_grads(model)
    what = f"megalodon P={P} rank={rank} ckpt={gradient_checkpointing} {dtype}"
    fp64 = dtype == torch.float64
    rel = abs(loss.mean_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert rel <= 1e-6, f"{what}: SP loss {loss.mean_loss.item()!r} vs {ref_loss.item()!r}"   # (an fp32 loss)
    worst = (grads - ref_grads).abs().max().item()
    assert worst <= (1e-10 if fp64 else 3e-6) * ref_grads.abs().max().item(), f"{what}: max grad diff {worst:.2e}"
    stats = 2 * B * cfg.norm_num_groups * 3 * 8
    ema = 2 * B * cfg.hidden_size * cfg.cema_ndim * 2 * (8 if fp64 else 4)
    per_way = (cfg.num_hidden_layers * (stats + ema) + stats) * (P - 1)
    recompute = 2 if gradient_checkpointing else 1
    assert COMM_STATS.forward_bytes == recompute * per_way, (what, COMM_STATS, per_way)
    assert COMM_STATS.backward_bytes == per_way, (what, COMM_STATS, per_way)


def _worker(rank, world_size):
    group = dist.group.WORLD
    _check_ema_layer(rank, world_size, group)
    for objective in ("clm", "mlm"):
        _check_lm(rank, world_size, group, objective, gradient_checkpointing=False)
    _check_lm(rank, world_size, group, "mlm", gradient_checkpointing=True)
    _check_megalodon_layers(rank, world_size, group)
    _check_megalodon_lm(rank, world_size, group, False, torch.float64)
    _check_megalodon_lm(rank, world_size, group, True, torch.float32)


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.timeout(300)
def test_sp_model_matches_unsplit(world_size):
    run_ranks(_worker, world_size)
