"""Mixtures and the token-counted position: weighted schedule, per-source epochs, resume (bitwise, elastic, new
weights), seq_len changes that neither skip nor repeat a token, window-counted (version-2) states.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_mixture.py
"""
import itertools
import os

import numpy as np
import pytest

from megatrain.data import ShardStream
from megatrain.data.mixture import Plan, Source
from tests.data.synthetic import FIRST_ID, make_docs, write_synthetic
from tests.tiny_data import SPECIALS

L = 16
B_OFFSET = 2500  # source b's token ids start here: every content token says which source it came from


@pytest.fixture(scope="module")
def two(synthetic, tmp_path_factory):
    """Sources a (the 23-document synthetic corpus) and b (a small one, ids >= B_OFFSET)."""
    man_a, _ = synthetic
    out = tmp_path_factory.mktemp("b")
    docs = [d + B_OFFSET - FIRST_ID for d in make_docs(6, seed=2, max_len=40)]
    write_synthetic(out, docs, shard_bytes=3000)
    return man_a, os.path.join(out, "index.json")


def mixed(two, weights=(3.0, 1.0), **kw):
    a, b = two
    kw = {"seq_len": L, "seed": 5, "loop": True, **kw}
    return ShardStream(sources=[Source("a", a, weights[0]), Source("b", b, weights[1])], **kw)


def rows(stream, n):
    return [tuple(s["input_ids"].tolist() + s["labels"].tolist() + s["doc_ids"].tolist())
            for s in itertools.islice(stream, n)]


def source_of(row) -> str:
    content = [t for t in row[:L] if t >= FIRST_ID]
    assert content, "a window without content"
    kinds = {"b" if t >= B_OFFSET else "a" for t in content}
    assert len(kinds) == 1, "a window mixes two sources"
    return kinds.pop()


def test_schedule_shares_within_one_window_over_every_prefix():
    rng = np.random.default_rng(0)
    for trial in range(30):
        k = int(rng.integers(2, 6))
        weights = list(rng.uniform(0.05, 1.0, size=k))
        plan = Plan([f"s{i}" for i in range(k)], [int(x) for x in rng.integers(200, 5000, size=k)], weights, 4)
        lens = [16, 32, 8, 64]
        longest = 0
        for step in range(600):
            seq_len = lens[(step // 150) % len(lens)]  # the length changes on the way: shares count tokens
            longest = max(longest, seq_len)
            plan.take(seq_len)
            total = plan.tokens
            for w, st in zip(plan.weights, plan.states):
                assert abs(st.tokens - w * total) <= longest, (trial, step, weights)


def test_mixture_windows_per_source_epochs_and_layout_free(two):
    a, b = two
    ref_stream = mixed(two)
    ref = rows(ref_stream, 120)
    kinds = [source_of(r) for r in ref]
    assert abs(kinds.count("a") / len(kinds) - 0.75) <= 1 / len(kinds)
    # each source's windows are exactly that source's own stream (a mixture only interleaves them)
    for name, path in (("a", a), ("b", b)):
        own = rows(ShardStream(sources=[Source(name, path, 1.0)], seq_len=L, seed=5, loop=True), kinds.count(name))
        assert [r for r, k in zip(ref, kinds) if k == name] == own
    stats = ref_stream.source_stats()
    assert stats["b"]["epoch"] >= 1 and stats["a"]["epoch"] == 0  # the small source repeats, the big does not
    assert stats["a"]["tokens"] + stats["b"]["tokens"] == 120 * L == ref_stream.tokens
    # layout-free: DP 2 with 2 workers each hands out the same global order
    per_rank = [rows(mixed(two, dp_rank=r, dp_size=2, num_workers=2), 60) for r in range(2)]
    assert [per_rank[i % 2][i // 2] for i in range(120)] == ref


def test_mixture_resume_bitwise_elastic_and_with_new_weights(two):
    ref = rows(mixed(two), 90)
    seen = []
    s = mixed(two, dp_size=2)
    s2 = mixed(two, dp_rank=1, dp_size=2)
    head = list(zip(rows(s, 15), rows(s2, 15)))
    seen += [r for pair in head for r in pair]
    state = s.state_dict()
    assert state == s2.state_dict() and state["position"] == 30 and state["tokens"] == 30 * L
    one = mixed(two, num_workers=2)  # resumed on one rank with two workers
    one.load_state_dict(state)
    assert one.resume_note is None
    seen += rows(one, 60)
    assert seen == ref
    # new weights: continue from the per-source positions (no window repeated), say so, steer to the new shares
    new = mixed(two, weights=(1.0, 1.0))
    new.load_state_dict(state)
    assert "weights" in new.resume_note and "a 0.75 -> 0.5" in new.resume_note
    after = rows(new, 60)
    for name in ("a", "b"):
        own = rows(ShardStream(sources=[Source(name, two[0] if name == "a" else two[1], 1.0)], seq_len=L, seed=5,
                               loop=True), 200)
        mine = [r for r in ref[:30] + after if source_of(r) == name]
        assert mine == own[:len(mine)]  # per source: its own order, continued, nothing twice
    st = new.source_stats()
    assert abs(st["a"]["tokens"] - st["b"]["tokens"]) <= 30 * L  # moving towards 1:1 from 3:1
    with pytest.raises(ValueError, match="sources"):
        ShardStream(sources=[Source("a", two[0], 1.0)], seq_len=L, seed=5, loop=True).load_state_dict(state)


def test_bad_sources_named():
    for sources, word in (([Source("a", "x", 0.0)], "weight=0.0"), ([Source("a", "x", "lots")], "weight='lots'"),
                          ([Source("a", "x", 1.0), Source("a", "y", 1.0)], "duplicate")):
        with pytest.raises(ValueError, match=word):
            ShardStream(sources=sources, seq_len=L, loop=True)


def content_tokens(samples):
    """The real (trained) input tokens of each window: labels != -100, content ids only."""
    out = []
    for s in samples:
        keep = np.asarray(s["labels"]) != -100
        out += [int(t) for t in np.asarray(s["input_ids"])[keep] if t >= FIRST_ID]
    return out


@pytest.mark.parametrize("lanes", [1, 3])
def test_seq_len_change_neither_skips_nor_repeats_a_token(synthetic, lanes):
    man, docs = synthetic
    make = lambda seq_len: ShardStream(man, seq_len=seq_len, seed=2, lanes=lanes, loop=True)  # noqa: E731
    s = make(16)
    it = iter(s)
    got = [next(it) for _ in range(7)]
    it.close()
    state = s.state_dict()
    r = make(48)                      # resumed with another data.seq_len
    r.load_state_dict(state)
    assert "seq_len 16 -> 48" in r.resume_note
    it = iter(r)
    for _ in range(5):
        got.append(next(it))
    it.close()
    r.set_seq_len(24)                 # a schedule stage inside the run: lanes' rests are not whole 24s
    it = iter(r)
    while r.epoch == 0:
        got.append(next(it))
    it.close()
    epoch0 = got[:-1] if r.source_stats()["main"]["epoch"] == 1 else got
    seen = content_tokens(epoch0)
    assert len(seen) == len(set(seen)), "a token trained twice"
    everything = sorted(int(t) for d in docs for t in d)
    missing = sorted(set(everything) - set(seen))
    # epoch 0 was laid out at seq_len 16: only the stream's tail after its last whole 16-token window is unplanned
    # (without the short padded last window per lane, each lane would lose its last < 24 tokens here)
    assert len(missing) <= 16, missing
    # and a resume inside the new stage is bitwise
    st = r.state_dict()
    cont = rows(r, 20)
    r2 = make(24)
    r2.load_state_dict(st)
    assert rows(r2, 20) == cont


def test_window_counted_state_still_resumes(synthetic):
    man, _ = synthetic
    fresh = ShardStream(man, seq_len=L, seed=3, loop=True)
    n = fresh.global_windows
    ref = rows(ShardStream(man, seq_len=L, seed=3, loop=True), n + 12)
    for p in (0, 9, n, n + 3):
        v2 = {"version": 2, "position": p, "epoch": p // n, "offset": p % n, "windows_per_epoch": n, "lanes": 8,
              "data": fresh.manifest.fingerprint(), "seq_len": L, "seed": 3, "objective": "clm", "skipped": 0}
        r = ShardStream(man, seq_len=L, seed=3, loop=True)
        r.load_state_dict(v2)
        assert r.position == p and r.tokens == p * L
        assert rows(r, 8) == ref[p:p + 8], p
    r = ShardStream(man, seq_len=2 * L, seed=3, loop=True)  # into a longer seq_len: the tokens continue
    r.load_state_dict({**v2, "position": 9, "offset": 9, "epoch": 0})
    assert r.tokens == 9 * L and "seq_len 16 -> 32" in r.resume_note
    head = set(content_tokens([dict(zip(("input_ids", "labels"), (np.array(x[:L]), np.array(x[L:2 * L]))))
                               for x in ref[:9]]))
    later = content_tokens(list(itertools.islice(r, 10)))
    assert not head & set(later)  # nothing of the first 9 windows is read again


def test_per_source_metrics_reach_tensorboard(tmp_path):
    """data/<name>/tokens and data/<name>/epoch are TensorBoard tags of their own (not under train/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from megatrain.train.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=True, stream=open(os.devnull, "w"))
    for step in (1, 2):
        log.log({"step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens_per_s": 10.0, "skipped_steps": 0,
                 "data/web/tokens": 64 * step, "data/web/epoch": 0, "stage": 1, "stages": 2, "seq_len": 32})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/web/tokens")] == [64, 128]
    assert "data/web/epoch" in acc.Tags()["scalars"] and "train/loss" in acc.Tags()["scalars"]
