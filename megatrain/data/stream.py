"""ShardStream: tokenized shards -> packed token windows for one data-parallel rank; exactly once, resumable.

Use:
    from megatrain.data import ShardStream
    stream = ShardStream("shards/index.json", seq_len=4096, seed=0, dp_rank=r, dp_size=n, num_workers=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=micro_batch, num_workers=0)   # or iterate directly
    for batch in loader: batch["input_ids"], batch["labels"], batch["doc_ids"]            # LongTensor [B, seq_len]
    state = stream.state_dict()          # after k samples were handed out
    stream2.load_state_dict(state)       # a fresh stream then yields samples k+1, k+2, ... bitwise identical

The global token stream of epoch e (the same on every rank):
  * shard order: a permutation of the manifest's shards drawn from (seed, e);
  * inside a shard: its documents in a random order drawn from (seed, e, shard index);
  * each document is followed by the end-of-document token (manifest special_tokens["eod"]);
  * the stream is cut into windows of ``seq_len`` tokens; window w holds stream tokens [w*L, w*L + L) and also
    reads token w*L + L for its last label, so consecutive windows share exactly that one lookahead token.
Samples: ``input_ids`` = window tokens; clm ``labels[t]`` = the token after input t (pre-shifted);
mlm ``labels`` = original ids at masked positions (masking.py, seeded by (seed, e, w)), -100 elsewhere;
``doc_ids[t]`` = ordinal of the document token t belongs to (its EOD included) in epoch e's stream.

Splitting (exactly once, equal counts): with N = (stream_tokens - 1) // L windows, every rank gets
n = N // dp_size windows, rank r the contiguous range [r*n, (r+1)*n). The final remainder that no rank sees is the
last N - n*dp_size windows plus the stream's last < L + 1 tokens (at most (dp_size + 1) * L tokens per epoch).
All ranks therefore yield exactly ``len(stream)`` windows per epoch, whatever the shard sizes: no collective hangs.

Workers: ShardStream does its own worker split; use it with DataLoader(num_workers=0) (or iterate it directly).
A rank's range is cut into max(1, num_workers) contiguous parts; with num_workers >= 1 each part is produced by a
background process (fork), and samples are taken round-robin (part 0, 1, ..., W-1, 0, 1, ...). num_workers=0 and 1
give the same sequence; other worker counts give the same windows in a different order.

Resume: the state is (epoch, samples handed out this epoch, and the settings that define the order). Loading it
into a stream built with the same manifest/seq_len/seed/dp_size/num_workers/objective continues bitwise. A
different dp_size or num_workers is accepted only at an epoch boundary (state saved before the first or after the
last window of an epoch); in the middle of an epoch it is refused with a ValueError (the remaining windows are not
re-partitioned). Resuming reads only from the shard holding the next window on (positions come from the manifest).
Memory: each worker holds the shards its current window touches, decoded at their stored width (uint16/uint32).

One ``for`` loop over the stream runs to the end of the current epoch, and the next loop starts the next epoch
(``loop=True``: never stops). ``len(stream)`` = windows per epoch for this rank.

``vocab_size=`` (the model's) may exceed the manifest's vocabulary (padded embeddings), never be smaller.
Bad data: errors name the shard and sample key (shards.DataError). With ``skip_corrupt=True`` a bad sample (or the
unreadable rest of a truncated shard) is dropped, logged, and counted in ``stream.skipped``; its tokens are replaced
by <pad> at the end of that shard's span (labels -100), so every rank still sees the planned token layout.
A shard holding more docs/tokens than its manifest entry is always an error (shard and manifest do not match).
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import multiprocessing
import os
import queue as queue_mod
from typing import Iterator, Sequence

import numpy as np
import torch

from megatrain.data.masking import MaskingConfig, mask_tokens
from megatrain.ops.lm_loss import IGNORE_INDEX
from megatrain.data.shards import DataError, Manifest, ShardInfo, read_shard, token_dtype

log = logging.getLogger("megatrain.data")
STATE_VERSION = 1
OBJECTIVES = ("clm", "mlm")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Everything a (possibly forked) worker needs to produce windows; plain data."""
    urls: tuple[str, ...]
    docs: tuple[int, ...]
    tokens: tuple[int, ...]
    vocab_size: int
    specials: tuple[tuple[str, int], ...]
    seq_len: int
    seed: int
    objective: str
    masking: MaskingConfig
    skip_corrupt: bool

    def special(self, name: str) -> int:
        return dict(self.specials)[name]


class _EpochPlan:
    """Where every shard sits in epoch e's token stream."""

    def __init__(self, layout: _Layout, epoch: int):
        n = len(layout.urls)
        self.order = np.random.default_rng([layout.seed, epoch, 0x5EED]).permutation(n)
        docs = np.asarray(layout.docs, dtype=np.int64)[self.order]
        spans = np.asarray(layout.tokens, dtype=np.int64)[self.order] + docs  # + one EOD per document
        self.starts = np.concatenate([[0], np.cumsum(spans)]).tolist()        # token offset of each shard
        self.doc_base = np.concatenate([[0], np.cumsum(docs)]).tolist()       # first doc ordinal of each shard


class _WindowReader:
    """Random access to windows of one epoch, reading each shard once for sequential access.

    Skipped samples are counted only by the reader whose token range [own_lo, own_hi) holds the shard's first
    token, so a shard read by two workers (it straddles their ranges) is counted once.
    """

    def __init__(self, layout: _Layout, epoch: int, own_lo: int, own_hi: int):
        self.layout, self.epoch = layout, epoch
        self.plan = _EpochPlan(layout, epoch)
        self.own_lo, self.own_hi = own_lo, own_hi
        self.cache: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        self.skipped = 0

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        lay, i = self.layout, int(self.plan.order[k])
        url, want_docs, want_tokens = lay.urls[i], lay.docs[i], lay.tokens[i]
        docs = [t for _, t in read_shard(url, lay.vocab_size, lay.skip_corrupt,
                                         on_skip=lambda m: log.warning("skipping: %s", m))]
        got_tokens = sum(len(d) for d in docs)
        too_many = len(docs) > want_docs or got_tokens > want_tokens
        if too_many or (len(docs) == want_docs and got_tokens != want_tokens) or \
                (not lay.skip_corrupt and len(docs) != want_docs):
            raise DataError(f"shard {url}: holds {len(docs)} docs / {got_tokens} tokens but the manifest says "
                            f"{want_docs} / {want_tokens} (shard and manifest do not match)")
        if len(docs) < want_docs and self.own_lo <= self.plan.starts[k] < self.own_hi:
            self.skipped += want_docs - len(docs)
        perm = np.random.default_rng([lay.seed, self.epoch, i, 0xD0C]).permutation(len(docs))
        span = want_tokens + want_docs
        flat = np.full(span, lay.special("pad"), dtype=token_dtype(lay.vocab_size))  # stored width, not int64
        doc_starts = np.zeros(len(docs), dtype=np.int64)
        pos, eod = 0, lay.special("eod")
        for j, d in enumerate(perm):
            doc = docs[d]
            doc_starts[j] = pos
            flat[pos:pos + len(doc)] = doc
            flat[pos + len(doc)] = eod
            pos += len(doc) + 1
        return flat, doc_starts, pos  # pos = end of real tokens; beyond it: <pad> filling skipped samples

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [L+1], doc ids [L+1], real-token mask [L+1]) of window w."""
        L, plan = self.layout.seq_len, self.plan
        a, b = w * L, w * L + L + 1
        k = bisect.bisect_right(plan.starts, a) - 1
        for old in [c for c in self.cache if c < k]:
            del self.cache[old]
        toks, ids, real = [], [], []
        while a < b:
            lo, hi = plan.starts[k], plan.starts[k + 1]
            if hi > lo:
                if k not in self.cache:
                    self.cache[k] = self._load(k)
                flat, doc_starts, n_real = self.cache[k]
                s, e = a - lo, min(b, hi) - lo
                toks.append(flat[s:e])
                local = np.arange(s, e)
                doc = np.searchsorted(doc_starts, local, side="right") - 1
                # Padding after the real tokens gets its own ordinal: it exists only when samples were skipped,
                # so len(doc_starts) < this shard's manifest doc count and the ordinal is not reused.
                ids.append(plan.doc_base[k] + np.where(local >= n_real, len(doc_starts), doc))
                real.append(local < n_real)
                a = min(b, hi)
            k += 1
        return np.concatenate(toks).astype(np.int64), np.concatenate(ids).astype(np.int64), np.concatenate(real)

    def sample(self, w: int) -> dict[str, np.ndarray]:
        lay, L = self.layout, self.layout.seq_len
        tokens, ids, real = self.window(w)
        if lay.objective == "clm":
            labels = tokens[1:].copy()
            labels[~(real[1:] & real[:L])] = IGNORE_INDEX
            inputs = tokens[:L]
        else:
            rng = np.random.default_rng([lay.seed, self.epoch, w, 0x4D4C4D])
            inputs, labels = mask_tokens(tokens[:L], rng, lay.masking, lay.vocab_size, lay.special("mask"),
                                         [v for _, v in lay.specials])
        return {"input_ids": np.ascontiguousarray(inputs), "labels": labels, "doc_ids": ids[:L].copy()}


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous parts of range(n); the first n % parts parts are one longer."""
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for j in range(parts):
        hi = lo + base + (j < extra)
        out.append((lo, hi))
        lo = hi
    return out


def _round_robin(sizes: Sequence[int]) -> Iterator[int]:
    for t in range(max(sizes, default=0)):
        for j, s in enumerate(sizes):
            if s > t:
                yield j


def _worker_main(layout: _Layout, epoch: int, w_lo: int, w_hi: int, own: tuple[int, int], out) -> None:
    """Background process: put ("ok", sample, new_skips) for windows w_lo..w_hi-1, then ("done",)."""
    try:
        reader = _WindowReader(layout, epoch, *own)
        for w in range(w_lo, w_hi):
            before = reader.skipped
            s = reader.sample(w)
            out.put(("ok", s, reader.skipped - before))
        out.put(("done",))
    except Exception as e:  # noqa: BLE001 - forwarded to the consumer, which re-raises it
        out.put(("error", f"{type(e).__name__}: {e}", isinstance(e, DataError)))


def _scan(urls: list[str], vocab_size: int, skip_corrupt: bool) -> list[ShardInfo]:
    """Count docs/tokens of shards given without a manifest (reads every shard once)."""
    infos = []
    for url in urls:
        docs = tokens = 0
        for _, t in read_shard(url, vocab_size, skip_corrupt, on_skip=lambda m: log.warning("skipping: %s", m)):
            docs, tokens = docs + 1, tokens + len(t)
        infos.append(ShardInfo(url=url, docs=docs, tokens=tokens))
    return infos


class ShardStream(torch.utils.data.IterableDataset):
    """Packed, exactly-once, resumable windows of one DP rank (rules in the module docstring)."""

    def __init__(self, urls_or_manifest, seq_len: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 num_workers: int = 0, objective: str = "clm", vocab_size: int | None = None,
                 mask_token_id: int | None = None, skip_corrupt: bool = False, eod_token_id: int | None = None,
                 pad_token_id: int | None = None, masking: MaskingConfig | None = None, loop: bool = False,
                 worker_timeout_s: float = 600.0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.manifest = self._resolve(urls_or_manifest, vocab_size, mask_token_id, eod_token_id, pad_token_id,
                                      skip_corrupt)
        if not self.manifest.shards:
            raise ValueError("ShardStream: no shards given")
        if objective == "mlm" and "mask" not in self.manifest.special_tokens:
            raise ValueError("objective='mlm' needs a mask token: pass mask_token_id= or use a manifest")
        self.vocab_size = self.manifest.vocab_size
        self.special_tokens = dict(self.manifest.special_tokens)
        self.seq_len, self.seed, self.objective = seq_len, seed, objective
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.loop, self.worker_timeout_s = loop, worker_timeout_s
        self.layout = _Layout(
            urls=tuple(self.manifest.shard_url(i) for i in range(len(self.manifest.shards))),
            docs=tuple(s.docs for s in self.manifest.shards), tokens=tuple(s.tokens for s in self.manifest.shards),
            vocab_size=self.vocab_size, specials=tuple(sorted(self.special_tokens.items())), seq_len=seq_len,
            seed=seed, objective=objective, masking=masking or MaskingConfig(), skip_corrupt=skip_corrupt)
        # Every epoch has the same total (only the order changes), so the window count is fixed.
        total = self.manifest.tokens + self.manifest.docs
        self.windows_per_epoch = max(0, (total - 1) // seq_len) // dp_size
        if self.windows_per_epoch == 0:
            raise ValueError(f"ShardStream: {total} tokens (with EODs) give no window of seq_len={seq_len} "
                             f"per rank for dp_size={dp_size}; need more data or a smaller seq_len")
        self.epoch, self.consumed, self.skipped = 0, 0, 0

    @staticmethod
    def _resolve(src, vocab_size, mask_token_id, eod_token_id, pad_token_id, skip_corrupt) -> Manifest:
        if isinstance(src, Manifest):
            man = src
        elif isinstance(src, str) and (src.endswith(".json") or os.path.isdir(src)):
            man = Manifest.load(src)
        else:
            urls = [src] if isinstance(src, str) else list(src)
            if isinstance(src, str) and "{" in src:
                import braceexpand
                urls = list(braceexpand.braceexpand(src))
            if not urls:
                raise ValueError("ShardStream: empty list of shard urls")
            if vocab_size is None or eod_token_id is None:
                raise ValueError("ShardStream: shard urls without a manifest need vocab_size= and eod_token_id=")
            specials = {"eod": eod_token_id, "pad": eod_token_id if pad_token_id is None else pad_token_id}
            if mask_token_id is not None:
                specials["mask"] = mask_token_id
            return Manifest(shards=_scan(urls, vocab_size, skip_corrupt), vocab_size=vocab_size,
                            special_tokens=specials)
        if vocab_size is not None and vocab_size < man.vocab_size:  # a larger (padded) model vocab is fine
            raise ValueError(f"ShardStream: vocab_size={vocab_size} is smaller than the manifest's {man.vocab_size}: "
                             f"token ids would exceed the model's embedding (shards built with another tokenizer?)")
        for name, given, have in (("mask_token_id", mask_token_id, man.special_tokens.get("mask")),
                                  ("eod_token_id", eod_token_id, man.special_tokens.get("eod")),
                                  ("pad_token_id", pad_token_id, man.special_tokens.get("pad"))):
            if given is not None and given != have:
                raise ValueError(f"ShardStream: {name}={given} does not match the manifest's {have} "
                                 f"(shards were built with another tokenizer?)")
        return man

    def __len__(self) -> int:
        return self.windows_per_epoch

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            # Every DataLoader worker would replay the whole stream: duplicated windows, wrong resume state.
            raise ValueError("ShardStream does its own worker split: wrap it in DataLoader(num_workers=0) and pass "
                             "num_workers= to ShardStream instead")
        while True:
            if self.consumed >= self.windows_per_epoch:
                self.epoch, self.consumed = self.epoch + 1, 0
            yield from self._iter_epoch()
            if not self.loop:
                return

    def _parts(self) -> list[tuple[int, int]]:
        """Global window ranges of this rank's logical workers."""
        lo = self.dp_rank * self.windows_per_epoch
        return [(lo + a, lo + b) for a, b in _split(self.windows_per_epoch, max(1, self.num_workers))]

    def _iter_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        parts = self._parts()
        sizes = [b - a for a, b in parts]
        schedule = _round_robin(sizes)
        done = [0] * len(parts)
        for _ in range(self.consumed):  # replay the schedule up to the resume point
            done[next(schedule)] += 1
        L = self.seq_len
        # Each worker counts skipped samples of the shards that start in its not-yet-produced token range
        # (shards starting earlier were counted before a resume, or by the previous worker/rank).
        starts = [(a + d, b, ((a + d) * L, b * L)) for (a, b), d in zip(parts, done)]
        if self.num_workers == 0:
            reader = _WindowReader(self.layout, self.epoch, *starts[0][2])
            for w in range(starts[0][0], starts[0][1]):
                before = reader.skipped
                s = reader.sample(w)
                self.skipped += reader.skipped - before
                self.consumed += 1
                yield {k: torch.from_numpy(v) for k, v in s.items()}
            return
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        queues = [ctx.Queue(maxsize=4) for _ in starts]
        procs = [ctx.Process(target=_worker_main, args=(self.layout, self.epoch, lo, hi, own, q), daemon=True)
                 for (lo, hi, own), q in zip(starts, queues)]
        for p in procs:
            p.start()
        try:
            for j in schedule:
                msg = self._receive(queues[j], procs[j], j)
                self.skipped += msg[2]
                self.consumed += 1
                yield {k: torch.from_numpy(v) for k, v in msg[1].items()}
        finally:
            for p, q in zip(procs, queues):
                if p.is_alive():
                    p.terminate()
                p.join(timeout=5)
                q.cancel_join_thread()
                q.close()

    def _receive(self, q, proc, j: int):
        waited = 0.0
        while True:
            try:
                msg = q.get(timeout=1.0)
                break
            except queue_mod.Empty:
                waited += 1.0
                if not proc.is_alive() and q.empty():
                    raise RuntimeError(f"ShardStream worker {j} died (exit code {proc.exitcode})") from None
                if waited >= self.worker_timeout_s:
                    raise RuntimeError(f"ShardStream worker {j} produced nothing for {waited:.0f}s") from None
        if msg[0] == "error":
            raise (DataError if msg[2] else RuntimeError)(f"ShardStream worker {j}: {msg[1]}")
        if msg[0] != "ok":
            raise RuntimeError(f"ShardStream worker {j} ended early (internal error)")
        return msg

    # ------------------------------------------------------------------------------------------ resume
    def _settings(self) -> dict:
        return {"data": self.manifest.fingerprint(), "seq_len": self.seq_len, "seed": self.seed,
                "objective": self.objective, "dp_size": self.dp_size, "dp_rank": self.dp_rank,
                "workers": max(1, self.num_workers)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed, "skipped": self.skipped,
                "windows": self.windows_per_epoch, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"ShardStream state: unsupported version {state.get('version') if isinstance(state, dict) else state!r}")
        mine = self._settings()
        for key in ("data", "seq_len", "seed", "objective"):
            if state.get(key) != mine[key]:
                raise ValueError(f"ShardStream state: {key}={state.get(key)!r} differs from this stream's "
                                 f"{mine[key]!r}; resuming would not continue the same token stream")
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= int(state.get("windows", -1)) >= 0:  # saved after the last window: next epoch, from 0
            epoch, consumed = epoch + 1, 0
        if consumed:
            for key in ("dp_size", "workers", "dp_rank"):
                if state.get(key) != mine[key]:
                    raise ValueError(f"ShardStream state: {key} changed from {state.get(key)} to {mine[key]} in the "
                                     f"middle of epoch {epoch} (after {consumed} windows); re-partitioning is only "
                                     f"supported at an epoch boundary: resume with {key}={state.get(key)}")
        if consumed > self.windows_per_epoch:
            raise ValueError(f"ShardStream state: consumed={consumed} exceeds {self.windows_per_epoch} windows per epoch")
        self.epoch, self.consumed, self.skipped = epoch, consumed, int(state.get("skipped", 0))
