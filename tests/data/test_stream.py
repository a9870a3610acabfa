"""ShardStream: packing, exactly-once DP/worker split, equal counts, exact resume, epochs, MLM.
(Elastic resume across layouts: test_elastic.py.)

Run: PYTHONPATH=. python -m pytest -q tests/data/test_stream.py
"""
import itertools

import numpy as np
import pytest
import torch

from megatrain.data import ShardStream
from megatrain.ops.lm_loss import IGNORE_INDEX
from tests.tiny_data import SPECIALS

L = 16
EOD = SPECIALS["eod"]


def windows(stream):
    return [{k: v.clone() for k, v in s.items()} for s in stream]


def as_rows(samples):
    return [tuple(s["input_ids"].tolist()) + tuple(s["labels"].tolist()) + tuple(s["doc_ids"].tolist())
            for s in samples]


@pytest.fixture(scope="module")
def baseline(synthetic):
    man, _ = synthetic
    return windows(ShardStream(man, seq_len=L, seed=7))


def test_packing_covers_every_token_once_in_document_order(synthetic):
    man, docs = synthetic
    baseline = windows(ShardStream(man, seq_len=L, seed=7, lanes=1))  # one lane: windows in stream order
    stream = torch.cat([s["input_ids"] for s in baseline]).numpy()
    ids = torch.cat([s["doc_ids"] for s in baseline]).numpy()
    total = sum(len(d) + 1 for d in docs)
    assert len(baseline) == (total - 1) // L
    content = stream[stream != EOD]
    assert len(np.unique(content)) == len(content), "a token appears twice"
    every = np.concatenate(docs)
    missing = np.setdiff1d(every, content)
    assert len(missing) <= L, "more than the documented final remainder is missing"
    # Each document appears whole and in order, followed by EOD; the doc id changes exactly after each EOD.
    starts = {int(d[0]): d for d in docs}
    pos = 0
    while pos < len(stream):
        doc = starts[int(stream[pos])]
        piece = stream[pos:pos + len(doc)]
        assert np.array_equal(piece, doc[:len(piece)])
        assert len(set(ids[pos:pos + len(doc) + 1].tolist())) == 1
        if pos + len(doc) < len(stream):
            assert stream[pos + len(doc)] == EOD
            if pos + len(doc) + 1 < len(stream):
                assert ids[pos + len(doc) + 1] != ids[pos + len(doc)]
        pos += len(doc) + 1
    # CLM labels are pre-shifted, also across window boundaries.
    for a, b in zip(baseline, baseline[1:]):
        assert torch.equal(a["labels"][:-1], a["input_ids"][1:])
        assert a["labels"][-1] == b["input_ids"][0]
    assert all(s["input_ids"].dtype == torch.long and s["input_ids"].shape == (L,) for s in baseline)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_exactly_once_and_equal_counts(synthetic, baseline, dp_size, num_workers):
    man, _ = synthetic   # 7 shards of unequal size: not divisible by 2 or 3 ranks
    per_rank = [windows(ShardStream(man, seq_len=L, seed=7, dp_rank=r, dp_size=dp_size, num_workers=num_workers))
                for r in range(dp_size)]
    n = len(baseline) // dp_size
    assert [len(w) for w in per_rank] == [n] * dp_size
    assert all(len(ShardStream(man, seq_len=L, seed=7, dp_rank=r, dp_size=dp_size)) == n for r in range(dp_size))
    union = sorted(itertools.chain.from_iterable(as_rows(w) for w in per_rank))
    assert union == sorted(as_rows(baseline[:n * dp_size]))
    for r, w in enumerate(per_rank):  # global window i goes to rank i mod D, in order, whatever the workers
        assert as_rows(w) == as_rows(baseline[r::dp_size][:n])


@pytest.mark.parametrize("num_workers,objective", [(0, "clm"), (2, "clm"), (2, "mlm")])
def test_exact_resume(synthetic, num_workers, objective):
    man, _ = synthetic
    make = lambda: ShardStream(man, seq_len=L, seed=3, dp_rank=1, dp_size=2, num_workers=num_workers,  # noqa: E731
                               objective=objective, loop=True)
    n = len(make())
    full = windows(itertools.islice(make(), n + 5))  # crosses into epoch 1
    for k in (0, 5, n, n + 2):
        s = make()
        it = iter(s)
        head = [next(it) for _ in range(k)]
        state = s.state_dict()
        del it
        s2 = make()
        s2.load_state_dict(state)
        rest = windows(itertools.islice(s2, n + 5 - k))
        assert as_rows(head + rest) == as_rows(full), f"resume after {k} windows differs"


def test_epochs_reshuffle_and_state_rules(synthetic):
    man, _ = synthetic
    s = ShardStream(man, seq_len=L, seed=3)
    e0 = windows(s)
    e1 = windows(s)  # the next loop is the next epoch
    assert s.epoch == 1
    assert as_rows(e0) != as_rows(e1)
    c0 = torch.cat([w["input_ids"] for w in e0])
    assert len(e0) == len(e1) and abs(len(set(c0.tolist())) - len(set(torch.cat([w["input_ids"] for w in e1]).tolist()))) <= L

    half = ShardStream(man, seq_len=L, seed=3, dp_size=2, num_workers=2)
    it = iter(half)
    next(it)
    state = half.state_dict()
    assert state["position"] == 2 and state["epoch"] == 0 and "dp_size" not in state  # layout-free
    for kwargs, word in (({"seed": 4}, "seed"), ({"lanes": 3}, "lanes"), ({"objective": "mlm"}, "objective")):
        with pytest.raises(ValueError, match=word):
            ShardStream(man, seq_len=L, **{"seed": 3, **kwargs}).load_state_dict(state)
    with pytest.raises(ValueError, match="windows_per_epoch"):
        ShardStream(man, seq_len=L, seed=3).load_state_dict({**state, "windows_per_epoch": 5})
    # Version-1 states (per-rank order) still load at an epoch boundary, and only there.
    v1 = {"version": 1, "epoch": 0, "consumed": 4, "windows": 4, "skipped": 0, "dp_size": 2, "dp_rank": 1,
          "workers": 1, **{k: state[k] for k in ("data", "seq_len", "seed", "objective")}}
    s1 = ShardStream(man, seq_len=L, seed=3)
    s1.load_state_dict(v1)
    assert s1.position == len(s1)
    with pytest.raises(ValueError, match="version-1 state saved in the middle of epoch 0"):
        s1.load_state_dict({**v1, "consumed": 2})


def test_mlm_masking(synthetic):
    man, _ = synthetic
    a = windows(ShardStream(man, seq_len=L, seed=5, objective="mlm"))
    b = windows(ShardStream(man, seq_len=L, seed=5, objective="mlm", dp_size=1, num_workers=2))
    assert sorted(as_rows(a)) == sorted(as_rows(b))  # masks depend on the window, not on workers
    c = windows(ShardStream(man, seq_len=L, seed=6, objective="mlm"))
    assert as_rows(a) != as_rows(c)
    clm = windows(ShardStream(man, seq_len=L, seed=5))
    inputs = torch.stack([s["input_ids"] for s in a])
    labels = torch.stack([s["labels"] for s in a])
    orig = torch.stack([s["input_ids"] for s in clm])
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], orig[selected])
    assert torch.equal(inputs[~selected], orig[~selected])
    assert not selected[orig == EOD].any(), "special tokens must never be masked"
    frac = selected.float().mean().item()
    assert 0.10 < frac < 0.20
    masked = (inputs[selected] == SPECIALS["mask"]).float().mean().item()
    kept = (inputs[selected] == orig[selected]).float().mean().item()
    assert 0.7 < masked < 0.9 and 0.03 < kept < 0.2
    assert not torch.isin(inputs[selected & (inputs != SPECIALS["mask"]) & (inputs != orig)],
                          torch.tensor([0, 1, 2, 3])).any()


def test_dataloader_batches(synthetic, baseline):
    man, _ = synthetic
    loader = torch.utils.data.DataLoader(ShardStream(man, seq_len=L, seed=7), batch_size=4, num_workers=0)
    batches = list(loader)
    assert batches[0]["input_ids"].shape == (4, L)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.stack([s["input_ids"] for s in baseline]))


def test_refuses_dataloader_workers(synthetic):
    man, _ = synthetic
    with pytest.raises(ValueError, match="num_workers=0"):
        next(iter(torch.utils.data.DataLoader(ShardStream(man, seq_len=L), batch_size=2, num_workers=1)))


def test_bad_arguments(synthetic):
    man, _ = synthetic
    with pytest.raises(ValueError, match="lanes"):
        ShardStream(man, seq_len=L, lanes=0)
    with pytest.raises(ValueError, match="objective"):
        ShardStream(man, seq_len=L, objective="t5")
    with pytest.raises(ValueError, match="dp_rank"):
        ShardStream(man, seq_len=L, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        ShardStream(man, seq_len=100000)
    with pytest.raises(ValueError, match="vocab_size=123 is smaller"):
        ShardStream(man, seq_len=L, vocab_size=123)
    assert ShardStream(man, seq_len=L, vocab_size=8192).vocab_size == 4000  # padded model vocab is fine
    with pytest.raises(ValueError, match="mask_token_id"):
        ShardStream(man, seq_len=L, mask_token_id=7)
    with pytest.raises(ValueError, match="empty list"):
        ShardStream([], seq_len=L, vocab_size=10, eod_token_id=2)
