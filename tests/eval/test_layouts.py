"""Evaluation under DP x SP equals one rank: SP=2 and DP=2 give the one-rank loss, bpb and position bins (1e-6),
for MEGA and (SP=2) Megalodon: the one window forward, no evaluation code per family.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_layouts.py
"""
import os

import pytest

from megatrain.eval.heldout import load_heldout
from megatrain.eval.loss import evaluate_windows
from tests.dist_util import run_ranks
from tests.eval.test_heldout import _tiny_model


def _eval_on_ranks(rank, world, held_dir, vocab, sp, family):
    from megatrain.parallel.groups import ParallelGroups
    g = ParallelGroups(dp_size=world // sp, sp_size=sp)
    model = _tiny_model(vocab, family)
    held = load_heldout(held_dir, 64, 64 * 5)  # 5 windows: DP=2 ranks get 3 and 2 (+ a dummy)
    out = []
    for positions in (False, True):
        r = evaluate_windows(model, held, 2, positions=positions, sp_group=g.sp_group, dp_rank=g.dp_rank,
                             dp_size=g.dp_size)
        out.append((r.summary(), r.bin_loss, r.bin_tokens))
    return out


@pytest.mark.parametrize("sp,family", [(2, "mega"), pytest.param(1, "mega", marks=pytest.mark.slow),
                                       (2, "megalodon")], ids=["sp2", "dp2", "megalodon-sp2"])
def test_layouts_equal_one_rank(split_shards, tokenizer_dir, sp, family):
    from megatrain.data.tokenizer import load_tokenizer
    held_dir = os.path.join(split_shards[0], "heldout")
    vocab = load_tokenizer(tokenizer_dir).vocab_size()
    model = _tiny_model(vocab, family)
    held = load_heldout(held_dir, 64, 64 * 5)
    ref = [evaluate_windows(model, held, 2, positions=p) for p in (False, True)]
    got = run_ranks(_eval_on_ranks, 2, held_dir, vocab, sp, family)
    for rank_out in got:
        for r, (summary, bin_loss, bin_tokens) in zip(ref, rank_out):
            want = r.summary()
            assert summary["tokens"] == want["tokens"] and summary["bpb"] is not None
            for k in ("loss", "ppl", "bpb"):
                assert summary[k] == pytest.approx(want[k], rel=1e-6, abs=0), k
            if r.bin_loss is not None:
                assert bin_tokens == r.bin_tokens
                assert bin_loss == pytest.approx(r.bin_loss, rel=1e-6)
