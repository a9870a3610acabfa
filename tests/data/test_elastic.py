"""Elastic data stream: one global window order whatever the layout; resume on another DP size / worker count
sees every window of the epoch exactly once.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_elastic.py
"""
import itertools

import pytest

from megatrain.data import ShardStream
from megatrain.data.mixture import Plan

L = 16


def rows(stream, n):
    """The next n windows of a stream as hashable rows (input ids + labels + doc ids)."""
    return [tuple(s["input_ids"].tolist() + s["labels"].tolist() + s["doc_ids"].tolist())
            for s in itertools.islice(stream, n)]


@pytest.fixture(scope="module")
def order(synthetic):
    """The global order of epochs 0 and 1: one rank, in-process."""
    man, _ = synthetic
    s = ShardStream(man, seq_len=L, seed=5, loop=True)
    return rows(s, 2 * s.global_windows), s.global_windows


def _lane_order(n_windows: int, lanes: int) -> list:
    """(window, lane) of each window of one epoch of one source at a fixed seq_len, as the plan hands them out."""
    plan = Plan(["only"], [n_windows * L + 1], [1.0], lanes)
    out = []
    for _ in range(n_windows):
        _, epoch, lane, start, n_real = plan.take(L)
        assert epoch == 0 and n_real == L and start % L == 0
        out.append((start // L, lane))
    return out


def test_lanes_are_a_permutation():
    for n in range(1, 40):
        for lanes in range(1, 10):
            assert sorted(w for w, _ in _lane_order(n, lanes)) == list(range(n)), (n, lanes)
    assert _lane_order(10, 3) == [  # lanes [0,4) [4,7) [7,10), round-robin
        (0, 0), (4, 1), (7, 2), (1, 0), (5, 1), (8, 2), (2, 0), (6, 1), (9, 2), (3, 0)]


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_global_order_independent_of_layout(synthetic, order, dp_size, num_workers):
    man, _ = synthetic
    ref, n = order
    per_rank = [rows(ShardStream(man, seq_len=L, seed=5, dp_rank=r, dp_size=dp_size, num_workers=num_workers,
                                 loop=True), (n + 10) // dp_size) for r in range(dp_size)]
    merged = [per_rank[i % dp_size][i // dp_size] for i in range(dp_size * len(per_rank[0]))]
    assert merged == ref[:len(merged)]  # global window i went to rank i mod D, across the epoch boundary too
    # A step with global batch G = 4 consumes the same windows for DP x (micro-batch x accumulation) = 1x4, 2x2, 4x1
    m = 4 // dp_size
    for step in range(3):
        assert sorted(sum((w[step * m:(step + 1) * m] for w in per_rank), [])) == sorted(ref[step * 4:(step + 1) * 4])


def test_elastic_resume_sees_every_window_once(synthetic, order):
    man, _ = synthetic
    ref, n = order
    make = lambda d, r, w=0: ShardStream(man, seq_len=L, seed=5, dp_rank=r, dp_size=d, num_workers=w,  # noqa: E731
                                         loop=True)
    seen = {}  # global position -> row

    def run(dp, state, per_rank, workers=0):
        states = []
        for r in range(dp):
            s = make(dp, r, workers)
            if state is not None:
                s.load_state_dict(state)
            start = s.position
            for k, row in enumerate(rows(s, per_rank)):
                pos = start + r + k * dp
                assert pos not in seen, f"window at position {pos} handed out twice"
                seen[pos] = row
            states.append(s.state_dict())
        assert all(st == states[0] for st in states), "ranks' states must be identical (layout-free)"
        return states[0]

    st = run(2, None, 3)                     # DP 2: 6 global windows
    assert st["position"] == 6 and st["epoch"] == 0 and st["offset"] == 6
    st = run(1, st, 5, workers=2)            # DP 1, 2 workers: 5 more
    st = run(4, st, -(-(n - 11) // 4), workers=1)  # DP 4 to the end of the epoch (the last round crosses it)
    assert st["position"] >= n
    assert [seen[p] for p in range(n)] == ref[:n]  # every window of epoch 0 exactly once, in the global order
    assert [seen[p] for p in range(n, st["position"])] == ref[n:st["position"]]  # epoch 1 continues the same


def test_loop_false_passes_cover_the_epoch_with_equal_counts(synthetic, order):
    man, _ = synthetic
    ref, n = order
    dp = 3
    streams = [ShardStream(man, seq_len=L, seed=5, dp_rank=r, dp_size=dp) for r in range(dp)]
    first = [rows(s, n) for s in streams]  # one `for` loop each
    assert len({len(f) for f in first}) == 1 and len(first[0]) == n // dp == len(streams[0])
    second = [rows(s, 2 * n) for s in streams]  # the next loop: the < D leftover windows, then epoch 1
    assert len({len(f) for f in second}) == 1
    merged = [x for k in range(len(first[0])) for x in (f[k] for f in first)] + \
        [x for k in range(len(second[0])) for x in (f[k] for f in second)]
    assert merged == ref[:len(merged)] and len(merged) > n
    assert all(s.epoch == 1 for s in streams)
