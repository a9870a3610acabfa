"""The global window plan: which source, epoch, lane and token range global window g reads (pure integers).

Use:
    from megatrain.data.mixture import Plan, Source
    plan = Plan.fresh(sizes={"web": 10_000_000, "code": 2_000_000}, weights={"web": 0.7, "code": 0.3}, lanes=8)
    src, epoch, lane, start, n_real = plan.take(seq_len=4096)   # the next global window; plan.position += 1
    plan.to_state() / Plan.from_state(state)                    # plain dicts: the loader's resume state

Everything here is a function of the plan state and the seq_len only -- never of the DP size, SP size, micro-batch
or worker count -- so every rank (and worker) can run the same plan and take the windows that are its own.

A source's epoch is its token stream of T tokens (stream.py: shards and documents in a seeded order, one EOD after
each document). When an epoch starts, at the seq_len L of that moment, its N = (T - 1) // L windows are cut into C
lanes of whole windows (the first N % C lanes one window longer): lane l holds tokens [start_l, end_l). Each lane
has a token cursor; a window of the source comes from the next lane, round-robin, that still has tokens: tokens
[cursor, cursor + L) plus the token after them for the last label, and the cursor moves by L. So with a fixed L a
lane is read sequentially and window i of the epoch is lane i % C's (i // C)-th window. The position counts tokens:
when L changes (a seq_len schedule stage, or a resume with another data.seq_len), every lane continues at its
cursor with the new L -- no token is skipped or read twice -- and a lane whose rest is shorter than L gives one last
window with n_real < L real tokens, padded (stream.py pads with <pad>, labels -100). The epoch ends when every lane
is used up; the next epoch is laid out at the L of its start.

Mixture: sources have weights w_s (normalised to sum 1). The next window goes to the source whose share is most
behind: argmax_s (w_s * (tokens_all + L) - tokens_s), ties to the first listed, where tokens_s counts the window
slots (L each) the source got. This keeps every source's token count within one window of w_s * tokens_all over
every prefix of the run (tests/data/test_mixture.py checks it), it is deterministic and needs no random draws, and
after a change of weights (on resume) it continues from the per-source counts and steers back to the new shares.
Each source has its own epochs: a small source repeats while a big one is still in its first.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Union


@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus of a mixture: ``shards`` is whatever ShardStream accepts (manifest path/URL, folder, list)."""
    name: str
    shards: Union[str, list]
    weight: float = 1.0


def check_sources(sources: list) -> None:
    """Names unique and non-empty, weights positive numbers: a ValueError naming the source otherwise."""
    seen = set()
    for i, s in enumerate(sources):
        if not isinstance(s.name, str) or not s.name or "/" in s.name:
            raise ValueError(f"data.sources[{i}].name={s.name!r}: must be a non-empty name without '/'")
        if s.name in seen:
            raise ValueError(f"data.sources[{i}].name={s.name!r}: duplicate source name (names key the resume "
                             f"state and the metrics)")
        seen.add(s.name)
        w = s.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w != w or w == float("inf"):
            raise ValueError(f"data.sources[{i}].weight={w!r} (source {s.name!r}): must be a number > 0")


def source_salt(name: str, legacy: bool) -> tuple[int, ...]:
    """Extra seed words of a source's shuffles: none for the single unnamed source (the order of data.shards runs
    stays what it was), a hash of the name for mixture sources (two sources never share a shuffle)."""
    return () if legacy else (zlib.crc32(name.encode()),)


@dataclasses.dataclass
class Lanes:
    """One source's place: its epoch, and per lane the token cursor and end (laid out when the epoch starts)."""
    epoch: int = 0
    started: bool = False   # lanes laid out for `epoch` (lazily, at the seq_len of its first window)
    turn: int = 0           # the lane to try first for the next window
    cursors: list = dataclasses.field(default_factory=list)
    ends: list = dataclasses.field(default_factory=list)
    tokens: int = 0         # window slots (seq_len each) this source got since the run began, all ranks together
    windows: int = 0
    taken: int = 0          # windows of the current epoch handed out

    def lay_out(self, total_tokens: int, seq_len: int, lanes: int) -> None:
        n = (total_tokens - 1) // seq_len
        base, extra = divmod(n, lanes)
        starts = [(lane * base + min(lane, extra)) * seq_len for lane in range(lanes + 1)]
        self.cursors, self.ends, self.turn, self.started, self.taken = starts[:-1], starts[1:], 0, True, 0

    def remaining(self, seq_len: int) -> int:
        """Windows left in the current epoch at this seq_len (0 when used up; a fresh epoch is not counted)."""
        if not self.started:
            return -1
        return sum(-(-(e - c) // seq_len) for c, e in zip(self.cursors, self.ends) if e > c)


def windows_per_epoch(total_tokens: int, seq_len: int) -> int:
    return max(0, (total_tokens - 1) // seq_len)


class Plan:
    """The plan state (position, per-source Lanes) and the rule that picks the next window (module docstring)."""

    def __init__(self, names: list[str], sizes: list[int], weights: list[float], lanes: int,
                 states: list[Lanes] | None = None, position: int = 0):
        self.names, self.sizes, self.lanes = list(names), list(sizes), lanes
        self.set_weights(weights)
        self.states = states if states is not None else [Lanes() for _ in names]
        self.position = position  # global windows planned so far (all ranks)

    def set_weights(self, weights: list[float]) -> None:
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

    def copy(self) -> "Plan":
        return Plan(self.names, self.sizes, self.weights, self.lanes,
                    [dataclasses.replace(s, cursors=list(s.cursors), ends=list(s.ends)) for s in self.states],
                    self.position)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.states)

    def pick(self, seq_len: int) -> int:
        after = self.tokens + seq_len
        best, best_deficit = 0, None
        for i, (w, st) in enumerate(zip(self.weights, self.states)):
            deficit = w * after - st.tokens
            if best_deficit is None or deficit > best_deficit:
                best, best_deficit = i, deficit
        return best

    def take(self, seq_len: int) -> tuple[int, int, int, int, int]:
        """The next global window: (source, epoch, lane, first token, real tokens n_real <= seq_len)."""
        s = self.pick(seq_len) if len(self.states) > 1 else 0
        st = self.states[s]
        for _ in range(2):
            if not st.started:
                st.lay_out(self.sizes[s], seq_len, self.lanes)
            for j in range(self.lanes):
                lane = (st.turn + j) % self.lanes
                cur, end = st.cursors[lane], st.ends[lane]
                if cur < end:
                    n_real = min(seq_len, end - cur)
                    st.cursors[lane], st.turn = cur + n_real, lane + 1
                    st.tokens += seq_len
                    st.windows += 1
                    st.taken += 1
                    self.position += 1
                    return s, st.epoch, lane, cur, n_real
            st.epoch, st.started = st.epoch + 1, False  # every lane used up: the next epoch
        raise AssertionError(f"source {self.names[s]}: no window of {seq_len} tokens in {self.sizes[s]}")

    # ---- resume state (plain data) ----
    def to_state(self) -> dict:
        return {name: {"weight": w, **dataclasses.asdict(st)}
                for name, w, st in zip(self.names, self.weights, self.states)}

    @staticmethod
    def lanes_from_state(d: dict) -> Lanes:
        return Lanes(epoch=int(d["epoch"]), started=bool(d["started"]), turn=int(d["turn"]),
                     cursors=[int(c) for c in d["cursors"]], ends=[int(e) for e in d["ends"]],
                     tokens=int(d["tokens"]), windows=int(d["windows"]), taken=int(d.get("taken", 0)))

    @staticmethod
    def lanes_from_window_position(i: int, n_windows: int, seq_len: int, lanes: int, epoch: int) -> Lanes:
        """The Lanes after the first i windows of an epoch of n_windows at a fixed seq_len: what a version-2
        (window-counted) state at offset i means in token cursors."""
        st = Lanes(epoch=epoch)
        if i == 0:
            return st
        st.lay_out(n_windows * seq_len + 1, seq_len, lanes)
        for lane in range(lanes):
            st.cursors[lane] += max(0, (i - lane + lanes - 1) // lanes) * seq_len
        st.turn, st.taken = i % lanes, i
        return st
