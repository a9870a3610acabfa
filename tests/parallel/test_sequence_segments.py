"""Segmented layers composed with sequence parallelism: SP=2 with segments == SP=1 without (MEGA CLM and MLM;
Megalodon, whose staged pre-pass exchanges the norm's statistics, then the EMA state, then the final norm's).

    PYTHONPATH=. python -m pytest -x -q tests/parallel/test_sequence_segments.py

Each gloo worker builds the same weights and data, runs the unsplit, unsegmented reference itself, then its own
slice (two segments of 8 tokens) with the EMA boundary; losses are summed and gradients all-reduced over the group.
Documents start inside segments, exactly at a segment edge inside a slice and exactly at the slice edge.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.model import MegaConfig, MegaForCausalLM, MegaForMaskedLM, MegalodonConfig, MegalodonForCausalLM
from megatrain.ops.lm_loss import IGNORE_INDEX
from megatrain.parallel.checkpointing import apply_checkpointing, policy_from_config
from megatrain.parallel.protocol import sp_forward_backward
from megatrain.parallel.sequence import sum_grads_over

from tests.dist_util import run_ranks

B, SLICE, SEG = 2, 16, 8


def _config(objective: str, segment_size: int, ckpt: bool) -> MegaConfig:
    return MegaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=32,
                      ema_projection_size=4, shared_representation_size=8, nffn_hidden_size=32,
                      bidirectional=objective == "mlm", is_decoder=objective == "clm", use_chunking=True,
                      chunk_size=4, dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      nffn_activation_dropout_prob=0.0, ema_block_size=3, gradient_checkpointing=ckpt,
                      segment_size=segment_size)


def _batch(objective: str, L: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (B, L), generator=g)
    change = torch.zeros(B, L, dtype=torch.int64)
    change[0, 3] = change[0, SLICE + SEG + 5] = 1      # inside segments (states cross both segments of a slice)
    change[1, SEG] = change[1, SLICE] = 1              # at a segment edge inside slice 0; at the slice edge
    doc_ids = change.cumsum(1)
    if objective == "clm":
        labels = torch.cat([ids[:, 1:], torch.full((B, 1), IGNORE_INDEX)], dim=1)
    else:
        masked = torch.rand(B, L, generator=g) < 0.4
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
        ids = torch.where(masked, torch.ones_like(ids), ids)
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _megalodon(segment_size: int, ckpt: bool) -> MegalodonForCausalLM:
    # fp64: the staged pre-pass (the norm's statistics, then the EMA state, then the final norm's) is exact
    return MegalodonForCausalLM(MegalodonConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, shared_representation_size=8,
        intermediate_size=16, nffn_hidden_size=32, cema_ndim=3, chunk_size=4, norm_num_groups=4, ema_block_size=3,
        gradient_checkpointing=ckpt, segment_size=segment_size)).double()


def _check(rank, P, group, objective, ckpt, family="mega"):
    cls = MegaForCausalLM if objective == "clm" else MegaForMaskedLM
    models = []
    for seg in (0, SEG):
        torch.manual_seed(0)
        model = cls(_config(objective, seg, ckpt)) if family == "mega" else _megalodon(seg, ckpt)
        models.append(apply_checkpointing(model.train(), policy_from_config(ckpt)))
    plain, segmented = models
    batch = _batch(objective, P * SLICE, 64)
    kw = dict(labels_shifted=True) if objective == "clm" else {}

    out = plain(batch["input_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"], loss_reduction="sum",
                return_logits=False, **kw)
    ref_loss = out.loss / out.num_loss_tokens
    ref_loss.backward()
    ref = _grads(plain)

    loss = sp_forward_backward(segmented, batch, group, causal=objective == "clm")
    sum_grads_over(segmented.parameters(), group)
    grads = _grads(segmented)

    what = f"{family} {objective} P={P} rank={rank} ckpt={ckpt}"
    rel = abs(loss.mean_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert rel <= 1e-6, f"{what}: loss {loss.mean_loss.item()!r} vs {ref_loss.item()!r} (rel {rel:.2e})"
    worst = (grads - ref).abs().max().item()
    assert worst <= 1e-5, f"{what}: max grad difference {worst:.2e}"
    assert ref.abs().max() > 0


def _worker(rank, world_size):
    group = dist.group.WORLD
    for objective in ("clm", "mlm"):
        _check(rank, world_size, group, objective, ckpt=True)
    _check(rank, world_size, group, "mlm", ckpt=False)
    _check(rank, world_size, group, "clm", ckpt=True, family="megalodon")


def test_sp2_with_segments_matches_sp1_without():
    run_ranks(_worker, 2)
