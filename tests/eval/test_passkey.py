"""Passkey retrieval measured on a tiny MEGA trained here to retrieve: high accuracy where the key is within the
model's reach (inside the question's attention chunk), chance (0 for 5 exact digits) where it is not.

A synthetic retrieval corpus (token level: filler ids, a key marker, 5 digit ids, a question id) in the passkey
format of megatrain/eval/passkey.py, contexts of 32 tokens = one attention chunk; the loss on the 5 answer tokens.
Evaluated at 32 (every depth within the chunk) and 128 tokens (4 chunks: only depth 1 puts the key in the
question's chunk; elsewhere only the EMA could carry 5 random digits across chunks, and it does not).
~40 s of training on one CPU thread.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_passkey.py
"""
import random

import pytest
import torch

from megatrain.eval.passkey import KEY_DIGITS, PasskeyFormat, passkey_cell_forced, passkey_eval
from megatrain.eval.plots import plot_passkey
from megatrain.model import MegaConfig, MegaForCausalLM, MegalodonConfig, MegalodonForCausalLM
from megatrain.ops.lm_loss import IGNORE_INDEX
from tests.dist_util import run_ranks

FMT = PasskeyFormat(filler=list(range(15, 28)), before_key=[28], after_key=[29], question=[30],
                    digits=list(range(5, 15)))
CHUNK = 32


def _corpus_batch(rng, n, length=CHUNK):
    xs, ys = [], []
    for _ in range(n):
        key = str(rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1))
        ids = FMT.prompt(length, rng.random(), key) + [FMT.digits[int(c)] for c in key]
        labels = [IGNORE_INDEX] * (length - KEY_DIGITS - 1) + ids[length - KEY_DIGITS:] + [IGNORE_INDEX]
        xs.append(ids)
        ys.append(labels)
    return torch.tensor(xs), torch.tensor(ys)


def test_prompt_layout():
    p = FMT.prompt(40, 0.5, "31415")
    assert len(p) == 40 - KEY_DIGITS and p[-1] == 30
    i = p.index(28)
    assert p[i + 1:i + 6] == [FMT.digits[int(c)] for c in "31415"] and p[i + 6] == 29
    assert FMT.prompt(40, 0.0, "31415")[0] == 28 and FMT.prompt(40, 1.0, "31415")[-8] == 28
    with pytest.raises(ValueError, match="passkey length 12: shorter"):
        FMT.prompt(12, 0.0, "31415")


def _config():
    return MegaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                     ema_projection_size=8, shared_representation_size=32, nffn_hidden_size=128, use_chunking=True,
                     chunk_size=CHUNK, max_positions=64, is_decoder=True, bidirectional=False,
                     initializer_range=0.1, dropout_prob=0.0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)


def _megalodon():
    return MegalodonForCausalLM(MegalodonConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, shared_representation_size=32,
                                                intermediate_size=64, nffn_hidden_size=128, cema_ndim=4,
                                                chunk_size=CHUNK, norm_num_groups=4))


def _sp_passkey(rank, world, state, lengths, family="mega"):
    from megatrain.parallel.groups import ParallelGroups
    g = ParallelGroups(dp_size=1, sp_size=world)
    model = MegaForCausalLM(_config()) if family == "mega" else _megalodon()
    model.load_state_dict(state)
    return passkey_eval(model, FMT, lengths, trials=20, seed=3, sp_group=g.sp_group)


def _train(model):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(1)
    for step in range(600):
        x, y = _corpus_batch(rng, 32)
        loss = model(x, labels=y, labels_shifted=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 49 and loss.item() < 0.02:
            break
    return model


@pytest.mark.slow
def test_trained_model_retrieves_within_reach_only(tmp_path):
    """Also: the teacher-forced scoring (one rank and SP = 2, contexts sliced like training windows) gives greedy
    decoding's accuracy cell for cell."""
    torch.manual_seed(0)
    model = _train(MegaForCausalLM(_config()))
    rows = passkey_eval(model, FMT, [CHUNK, 4 * CHUNK], trials=20, seed=3)
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
    assert all(r["trials"] == 20 for r in rows) and len(rows) == 10
    assert min(acc[(CHUNK, d)] for d in (0.0, 0.25, 0.5, 0.75, 1.0)) >= 0.7, acc   # within reach
    assert acc[(4 * CHUNK, 1.0)] >= 0.7, acc                                        # key in the question's chunk
    assert max(acc[(4 * CHUNK, d)] for d in (0.0, 0.25, 0.5)) <= 0.1, acc           # beyond reach: chance
    assert open(plot_passkey(rows, str(tmp_path / "pk.png")), "rb").read(4) == b"\x89PNG"
    for r in rows:
        assert passkey_cell_forced(model, FMT, r["length"], r["depth"], 20, seed=3) == r
    lengths = [2 * CHUNK, 4 * CHUNK]  # SP = 2: whole chunks per rank
    greedy = passkey_eval(model, FMT, lengths, trials=20, seed=3)
    for ranks_rows in run_ranks(_sp_passkey, 2, model.state_dict(), lengths):
        assert ranks_rows == greedy


@pytest.mark.slow
def test_megalodon_retrieves_and_every_scoring_path_agrees():
    """The same evaluation, no code special-cased per family: a tiny Megalodon trained here (~15 s) retrieves within
    its attention chunk; greedy decoding with its cache (statistics, EMA state, current-chunk K/V), teacher-forced
    scoring (logits_at through the window forward) and SP = 2 give the same rows."""
    torch.manual_seed(0)
    model = _train(_megalodon())
    rows = passkey_eval(model, FMT, [CHUNK, 4 * CHUNK], trials=20, seed=3)
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in rows}
    assert min(acc[(CHUNK, d)] for d in (0.0, 0.25, 0.5, 0.75, 1.0)) >= 0.7, acc
    assert acc[(4 * CHUNK, 1.0)] >= 0.7, acc
    for r in rows:
        assert passkey_cell_forced(model, FMT, r["length"], r["depth"], 20, seed=3) == r
    lengths = [2 * CHUNK, 4 * CHUNK]
    greedy = passkey_eval(model, FMT, lengths, trials=20, seed=3)
    for ranks_rows in run_ranks(_sp_passkey, 2, model.state_dict(), lengths, "megalodon"):
        assert ranks_rows == greedy
