"""ShardStream: tokenized shards -> packed token windows for one data-parallel rank; exactly once, resumable, elastic.

Use:
    from megatrain.data import ShardStream
    stream = ShardStream("shards/index.json", seq_len=4096, seed=0, dp_rank=r, dp_size=n, num_workers=2)
    stream = ShardStream(sources=[Source("web", "s3://b/web/", 0.7), Source("code", "/d/code", 0.3)], ...,
                         loop=True)                                                        # a mixture (mixture.py)
    loader = torch.utils.data.DataLoader(stream, batch_size=micro_batch, num_workers=0)   # or iterate directly
    for batch in loader: batch["input_ids"], batch["labels"], batch["doc_ids"]            # LongTensor [B, seq_len]
    state = stream.state_dict()          # after k samples were handed out (on every rank: k equal)
    stream2.load_state_dict(state)       # any dp_size / dp_rank / num_workers / seq_len: continues the same stream
    stream.set_seq_len(32768)            # between iterations (a seq_len schedule stage): the token position carries on

The token stream of a source's epoch e (the same on every rank):
  * shard order: a permutation of the manifest's shards drawn from (seed, [source salt,] e);
  * inside a shard: its documents in a random order drawn from (seed, [salt,] e, shard index);
  * each document is followed by the end-of-document token (manifest special_tokens["eod"]).
Windows (mixture.py has the plan): when an epoch starts at seq_len L its N = (stream_tokens - 1) // L windows are cut
into C = ``lanes`` lanes; window i of the epoch (at a fixed L) is lane i % C's (i // C)-th window, and a window at
token cursor c holds stream tokens [c, c + L) and also reads token c + L for its last label (consecutive windows
share that token). The stream's last < L + 1 tokens are in no window. Lanes keep token cursors, so after a change
of L every lane continues where it was (a lane's rest shorter than L gives one last window padded with <pad>,
labels -100, its own doc id): no token is skipped or repeated.
Samples: ``input_ids`` = window tokens; clm ``labels[t]`` = the token after input t (pre-shifted);
mlm ``labels`` = original ids at masked positions (masking.py, seeded by (seed, e, window)), -100 elsewhere;
``doc_ids[t]`` = ordinal of the document token t belongs to (its EOD included) in epoch e's stream.

Global order (independent of the layout: DP size, micro-batch, accumulation, SP size, workers): global window g is
the plan's g-th window (mixture.Plan: the source most behind its weight, then that source's next lane); sources
and epochs follow each other in one unbounded sequence of positions.
Split (the rule the trainer's resume relies on): from the position P the stream started or resumed at, DP rank r of
D hands out positions P + r, P + r + D, P + r + 2D, ...  A trainer that takes micro_batch x grad_accum = M windows
per rank per step therefore consumes, at global step s (counted from P), exactly the positions
[P + s*G, P + (s+1)*G) with G = D * M, whatever the (D, micro_batch, grad_accum) split of G.
SP ranks of one DP replica build the stream with the same dp_rank and slice the window (sp.py): SP does not matter.

Workers: ShardStream does its own worker split; use it with DataLoader(num_workers=0) (or iterate it directly).
With num_workers = W >= 1, worker j (a forked process) produces the rank's k-th window for every k = j (mod W) and
the consumer takes them in k order: every worker count (0, 1, 2, ...) gives the same sequence. Every process runs
the plan over all positions (integer work) and reads only the windows that are its own.
Reading: each lane is read sequentially (a shard is decoded once per lane reader and dropped when the lane moves
past it). A rank reads the lanes its positions fall in. Memory: a worker holds about one decoded shard per lane
it reads (shards are kept at their stored uint16/uint32 width). Remote shards (https://, s3://) stream by ranges
and retry transient failures (remote.py, shards.read_shard).

Resume: the state is layout-free: the plan (position = global windows consumed, token slots, per-source epoch,
lane cursors and ends, weights) plus the settings that define the order (data fingerprints, seed, objective,
lanes), which must match. Loading it into a stream with any dp_size / dp_rank / num_workers / seq_len continues at
that token position: across the old and new layout every window is handed out exactly once. A mixture resumed with
other weights continues from the per-source positions (``resume_note`` says so). Version-2 states (a window count
at one seq_len) convert to lane cursors; version-1 states (per-rank order) load only at an epoch boundary.

One ``for`` loop over a one-source stream (``loop=False``) hands out K = (windows left in the epoch) // D windows
per rank, the same K on every rank (collectives never hang): it ends at the last whole round of D before the end
of the current epoch; the < D windows left over open the next loop, which runs to the end of the next epoch.
``loop=True`` (required for a mixture): never stops. ``len(stream)`` = N // D (N summed over a mixture's sources).
``stream.epoch`` = the first source's epoch of the latest window; ``source_stats()`` per source.

``vocab_size=`` (the model's) may exceed the manifest's vocabulary (padded embeddings), never be smaller.
Bad data: shards are checked against the manifest's recorded byte sizes when the stream is built (a stat or HEAD
each, no read): a missing or truncated shard is a DataError naming it before any window is produced (with
``skip_corrupt`` a size mismatch is a warning). pipe: shards and manifests without sizes are checked when read.
Read errors name the shard and sample key (shards.DataError). With ``skip_corrupt=True`` a bad sample
(or the unreadable rest of a truncated shard) is dropped, logged, and counted in ``stream.skipped`` (by the rank
whose window holds the shard's first token); its tokens are replaced by <pad> at the end of that shard's span
(labels -100), so every rank still sees the planned token layout. A shard holding more docs/tokens than its
manifest entry is always an error (shard and manifest do not match).
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue as queue_mod
from typing import Iterable, Iterator

import numpy as np
import torch

from megatrain.data.masking import MaskingConfig, mask_tokens
from megatrain.data.mixture import Plan, Source, check_sources, source_salt, windows_per_epoch
from megatrain.data.shards import DataError, Manifest, ShardInfo, check_local_shards, read_shard, token_dtype
from megatrain.data.remote import RetryPolicy, is_remote
from megatrain.ops.lm_loss import IGNORE_INDEX

log = logging.getLogger("megatrain.data")
STATE_VERSION = 3  # 3: token cursors per source; 2: global window count; 1: per-rank order
DEFAULT_LANES = 8  # part of the data order (like the seed); see "Global order" above
OBJECTIVES = ("clm", "mlm")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One source: everything a (possibly forked) worker needs to produce its windows; plain data."""
    name: str
    urls: tuple[str, ...]
    docs: tuple[int, ...]
    tokens: tuple[int, ...]
    vocab_size: int
    specials: tuple[tuple[str, int], ...]
    seed: int
    salt: tuple[int, ...]       # mixture.source_salt: () for the single unnamed source
    objective: str
    masking: MaskingConfig
    skip_corrupt: bool
    retry: RetryPolicy

    def special(self, name: str) -> int:
        ids = dict(self.specials)
        if name == "pad" and "pad" not in ids:  # a tokenizer without pad: fill with eod (the positions are masked)
            return ids["eod"]
        return ids[name]

    @property
    def total(self) -> int:
        """Tokens of one epoch's stream: every document plus its EOD."""
        return sum(self.tokens) + sum(self.docs)


class _EpochPlan:
    """Where every shard sits in epoch e's token stream."""

    def __init__(self, layout: _Layout, epoch: int):
        n = len(layout.urls)
        self.order = np.random.default_rng([layout.seed, *layout.salt, epoch, 0x5EED]).permutation(n)
        docs = np.asarray(layout.docs, dtype=np.int64)[self.order]
        spans = np.asarray(layout.tokens, dtype=np.int64)[self.order] + docs  # + one EOD per document
        self.starts = np.concatenate([[0], np.cumsum(spans)]).tolist()        # token offset of each shard
        self.doc_base = np.concatenate([[0], np.cumsum(docs)]).tolist()       # first doc ordinal of each shard


class _EpochReader:
    """Windows of one source's epoch; one shard cache per lane, so each lane reads its shards once, in order."""

    def __init__(self, layout: _Layout, epoch: int):
        self.layout, self.epoch = layout, epoch
        self.plan = _EpochPlan(layout, epoch)
        self.caches: dict[int, dict[int, tuple[np.ndarray, np.ndarray, int, int]]] = {}

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        lay, i = self.layout, int(self.plan.order[k])
        url, want_docs, want_tokens = lay.urls[i], lay.docs[i], lay.tokens[i]
        docs = [t for _, t in read_shard(url, lay.vocab_size, lay.skip_corrupt,
                                         on_skip=lambda m: log.warning("skipping: %s", m), retry=lay.retry)]
        got_tokens = sum(len(d) for d in docs)
        too_many = len(docs) > want_docs or got_tokens > want_tokens
        if too_many or (len(docs) == want_docs and got_tokens != want_tokens) or \
                (not lay.skip_corrupt and len(docs) != want_docs):
            raise DataError(f"shard {url}: holds {len(docs)} docs / {got_tokens} tokens but the manifest says "
                            f"{want_docs} / {want_tokens} (shard and manifest do not match)")
        perm = np.random.default_rng([lay.seed, *lay.salt, self.epoch, i, 0xD0C]).permutation(len(docs))
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
        # pos = end of real tokens; beyond it: <pad> filling skipped samples (want_docs - len(docs) of them)
        return flat, doc_starts, pos, want_docs - len(docs)

    def window(self, start: int, n_real: int, lane: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Stream tokens [start, start + n_real] (the last one only as a label): (tokens, doc ids, real-token mask,
        skipped samples counted by this window)."""
        plan = self.plan
        a, b = start, start + n_real + 1
        k = bisect.bisect_right(plan.starts, a) - 1
        cache = self.caches.setdefault(lane, {})
        for old in [c for c in cache if c < k]:  # a lane only moves forward
            del cache[old]
        toks, ids, real, skipped = [], [], [], 0
        while a < b:
            lo, hi = plan.starts[k], plan.starts[k + 1]
            if hi > lo:
                if k not in cache:
                    cache[k] = self._load(k)
                flat, doc_starts, n_in_shard, missing = cache[k]
                if start <= lo < start + n_real:  # the window holding a shard's first token counts its skips: once
                    skipped += missing
                s, e = a - lo, min(b, hi) - lo
                toks.append(flat[s:e])
                local = np.arange(s, e)
                doc = np.searchsorted(doc_starts, local, side="right") - 1
                # Padding after the real tokens gets its own ordinal: it exists only when samples were skipped,
                # so len(doc_starts) < this shard's manifest doc count and the ordinal is not reused.
                ids.append(plan.doc_base[k] + np.where(local >= n_in_shard, len(doc_starts), doc))
                real.append(local < n_in_shard)
                a = min(b, hi)
            k += 1
        return (np.concatenate(toks).astype(np.int64), np.concatenate(ids).astype(np.int64),
                np.concatenate(real), skipped)

    def sample(self, start: int, n_real: int, seq_len: int, lane: int) -> tuple[dict[str, np.ndarray], int]:
        lay, L = self.layout, seq_len
        tokens, ids, real, skipped = self.window(start, n_real, lane)
        if n_real < L:  # a lane's last, short window after a seq_len change: <pad> after its real tokens
            pad = L + 1 - len(tokens)
            tokens = np.concatenate([tokens, np.full(pad, lay.special("pad"), dtype=np.int64)])
            ids = np.concatenate([ids, np.full(pad, self.plan.doc_base[-1], dtype=np.int64)])  # an unused ordinal
            real = np.concatenate([real, np.zeros(pad, dtype=bool)])
            ids[n_real:] = self.plan.doc_base[-1]
        if lay.objective == "clm":
            labels = tokens[1:].copy()
            labels[~(real[1:] & real[:L])] = IGNORE_INDEX
            inputs = tokens[:L].copy()
            inputs[n_real:] = lay.special("pad")  # token start + n_real is only the last label here
        else:
            # window-aligned starts keep the masks of window-counted runs: seeded by the window index
            where = [start // L] if start % L == 0 and n_real == L else [start, L, n_real]
            rng = np.random.default_rng([lay.seed, *lay.salt, self.epoch, *where, 0x4D4C4D])
            base = tokens[:L].copy()
            base[n_real:] = lay.special("pad")
            inputs, labels = mask_tokens(base, rng, lay.masking, lay.vocab_size, lay.special("mask"),
                                         [v for _, v in lay.specials])
        return {"input_ids": np.ascontiguousarray(inputs), "labels": labels, "doc_ids": ids[:L].copy()}, skipped


def _produce(layouts: tuple[_Layout, ...], plan: Plan, seq_len: int, wanted: Iterable[int]):
    """(sample, skipped, source) for each wanted global position (increasing, >= plan.position): the plan is run
    over every position (integers only), and the windows at the wanted ones are read, each lane sequentially."""
    readers: dict[int, _EpochReader] = {}
    for p in wanted:
        while True:
            src, epoch, lane, start, n_real = plan.take(seq_len)
            if plan.position - 1 == p:
                break
        r = readers.get(src)
        if r is None or r.epoch != epoch:  # positions only increase: the source's earlier epochs are done
            r = readers[src] = _EpochReader(layouts[src], epoch)
        sample, skipped = r.sample(start, n_real, seq_len, lane)
        yield sample, skipped, src


def _positions(start: int, stride: int, count: int | None) -> Iterable[int]:
    return itertools.count(start, stride) if count is None else range(start, start + stride * count, stride)


def _worker_main(layouts, plan: Plan, seq_len: int, start: int, stride: int, count: int | None, out) -> None:
    """Background process: put ("ok", sample, skipped) for its positions, then ("done",)."""
    try:
        for s, skipped, _ in _produce(layouts, plan, seq_len, _positions(start, stride, count)):
            out.put(("ok", s, skipped))
        out.put(("done",))
    except Exception as e:  # noqa: BLE001 - forwarded to the consumer, which re-raises it
        out.put(("error", f"{type(e).__name__}: {e}", isinstance(e, DataError)))


def _scan(urls: list[str], vocab_size: int, skip_corrupt: bool, retry: RetryPolicy) -> list[ShardInfo]:
    """Count docs/tokens of shards given without a manifest (reads every shard once)."""
    infos = []
    for url in urls:
        docs = tokens = 0
        for _, t in read_shard(url, vocab_size, skip_corrupt, on_skip=lambda m: log.warning("skipping: %s", m),
                               retry=retry):
            docs, tokens = docs + 1, tokens + len(t)
        infos.append(ShardInfo(url=url, docs=docs, tokens=tokens))
    return infos


class ShardStream(torch.utils.data.IterableDataset):
    """Packed, exactly-once, resumable windows of one DP rank (rules in the module docstring)."""

    def __init__(self, urls_or_manifest=None, seq_len: int = 4096, seed: int = 0, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, objective: str = "clm", vocab_size: int | None = None,
                 mask_token_id: int | None = None, skip_corrupt: bool = False, eod_token_id: int | None = None,
                 pad_token_id: int | None = None, masking: MaskingConfig | None = None, loop: bool = False,
                 worker_timeout_s: float = 600.0, lanes: int = DEFAULT_LANES, sources: list | None = None,
                 retry: RetryPolicy | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        if (sources is None) == (urls_or_manifest is None):
            raise ValueError("ShardStream: give either urls_or_manifest or sources=[Source(name, shards, weight)]")
        self.retry = retry or RetryPolicy()
        legacy = sources is None
        if legacy:
            sources = [Source("main", urls_or_manifest, 1.0)]
        check_sources(sources)
        if not legacy and not loop:
            raise ValueError("ShardStream: a mixture has no single epoch end: use loop=True")
        self.sources = list(sources)
        self.manifests = []
        for src in self.sources:
            where = "" if legacy else f"source {src.name!r}: "
            try:
                man = self._resolve(src.shards, vocab_size, mask_token_id, eod_token_id, pad_token_id, skip_corrupt,
                                    self.retry)
                if not man.shards:
                    raise ValueError("ShardStream: no shards given")
                # a truncated shard is found now, not when the stream reaches it (hours into the run)
                check_local_shards(man, on_mismatch=(lambda m: log.warning(
                    "%s; with skip_corrupt its unreadable samples will be skipped", m)) if skip_corrupt else None,
                    retry=self.retry)
            except DataError as e:
                raise DataError(f"{where}{e}") from None
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
            first = self.manifests[0] if self.manifests else man
            if (man.vocab_size, man.special_tokens) != (first.vocab_size, first.special_tokens):
                raise DataError(f"source {src.name!r}: vocab_size {man.vocab_size} / special tokens "
                                f"{man.special_tokens} differ from source {self.sources[0].name!r}'s "
                                f"({first.vocab_size} / {first.special_tokens}): one tokenizer for all sources")
            self.manifests.append(man)
        self.manifest = self.manifests[0]
        if objective == "mlm" and "mask" not in self.manifest.special_tokens:
            raise ValueError("objective='mlm' needs a mask token: pass mask_token_id= or use a manifest")
        self.vocab_size = self.manifest.vocab_size
        self.special_tokens = dict(self.manifest.special_tokens)
        self.seed, self.objective = seed, objective
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.loop, self.worker_timeout_s, self.lanes = loop, worker_timeout_s, lanes
        self.layouts = tuple(_Layout(
            name=src.name, urls=tuple(man.shard_url(i) for i in range(len(man.shards))),
            docs=tuple(s.docs for s in man.shards), tokens=tuple(s.tokens for s in man.shards),
            vocab_size=self.vocab_size, specials=tuple(sorted(self.special_tokens.items())), seed=seed,
            salt=source_salt(src.name, legacy), objective=objective, masking=masking or MaskingConfig(),
            skip_corrupt=skip_corrupt, retry=self.retry) for src, man in zip(self.sources, self.manifests))
        self.layout = self.layouts[0]
        self.plan = Plan([s.name for s in self.sources], [lay.total for lay in self.layouts],
                         [s.weight for s in self.sources], lanes)
        self.skipped = 0
        self.resume_note = None  # one line when a resume changed the weights or the seq_len (the trainer prints it)
        self.set_seq_len(seq_len)

    def set_seq_len(self, seq_len: int) -> None:
        """Windows of ``seq_len`` from the current token position on (a seq_len schedule stage). Call it between
        iterations: a running iterator (and its workers) keeps the length it started with."""
        for lay in self.layouts:
            n = windows_per_epoch(lay.total, seq_len)
            if n // (self.dp_size if len(self.layouts) == 1 else 1) == 0:
                where = "" if len(self.layouts) == 1 else f"source {lay.name!r}: "
                raise ValueError(f"ShardStream: {where}{lay.total} tokens (with EODs) give no window of "
                                 f"seq_len={seq_len} per rank for dp_size={self.dp_size}; need more data or a "
                                 f"smaller seq_len")
        self.seq_len = seq_len
        # N: windows of one epoch at this seq_len, all ranks together (a mixture: summed over its sources)
        self.global_windows = sum(windows_per_epoch(lay.total, seq_len) for lay in self.layouts)
        self.windows_per_epoch = self.global_windows // self.dp_size

    @property
    def position(self) -> int:
        """Global windows consumed by all ranks together since the run began."""
        return self.plan.position

    @property
    def tokens(self) -> int:
        """Token slots (seq_len per window) consumed by all ranks together: the stream's position in tokens."""
        return self.plan.tokens

    @property
    def epoch(self) -> int:
        """Epoch of the latest window handed out of the first source (0 before the first)."""
        return self.plan.states[0].epoch

    def source_stats(self) -> dict[str, dict[str, int]]:
        """Per source: tokens (window slots, all ranks) and the epoch it is in, for metrics (data/<name>/...)."""
        return {n: {"tokens": st.tokens, "epoch": st.epoch} for n, st in zip(self.plan.names, self.plan.states)}

    @staticmethod
    def _resolve(src, vocab_size, mask_token_id, eod_token_id, pad_token_id, skip_corrupt, retry) -> Manifest:
        if isinstance(src, Manifest):
            man = src
        elif isinstance(src, str) and (src.endswith(".json") or src.endswith("/") and is_remote(src)
                                       or os.path.isdir(src)):
            man = Manifest.load(src, retry)
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
            return Manifest(shards=_scan(urls, vocab_size, skip_corrupt, retry), vocab_size=vocab_size,
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
        if self.loop:
            yield from self._run(None)  # one unbounded run: workers are not restarted at epoch boundaries
            return
        # one source: to the last whole round of D before its epoch ends (or, with < D left, the next one's)
        D, st = self.dp_size, self.plan.states[0]
        fresh = windows_per_epoch(self.layout.total, self.seq_len)
        left = st.remaining(self.seq_len) if st.started else fresh
        if left < D:
            left += fresh
        yield from self._run(left // D)

    def _run(self, count: int | None) -> Iterator[dict[str, torch.Tensor]]:
        """Hand out this rank's next ``count`` windows (None: unbounded): positions start + r + k*D."""
        D, W, L = self.dp_size, self.num_workers, self.seq_len
        first = self.position + self.dp_rank

        def consumed():  # every rank hands out its k-th window of the round: D positions consumed in all
            for _ in range(D):
                self.plan.take(L)

        if W == 0:
            for s, skipped, _ in _produce(self.layouts, self.plan.copy(), L, _positions(first, D, count)):
                self.skipped += skipped
                consumed()
                yield {k: torch.from_numpy(v) for k, v in s.items()}
            return
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        queues = [ctx.Queue(maxsize=4) for _ in range(W)]
        # worker j: the rank's windows k = j, j + W, j + 2W, ...
        counts = [None if count is None else len(range(j, count, W)) for j in range(W)]
        procs = [ctx.Process(target=_worker_main, daemon=True,
                             args=(self.layouts, self.plan.copy(), L, first + j * D, W * D, counts[j], q))
                 for j, q in enumerate(queues)]
        for p in procs:
            p.start()
        try:
            for k in (itertools.count() if count is None else range(count)):
                msg = self._receive(queues[k % W], procs[k % W], k % W)
                self.skipped += msg[2]
                consumed()
                yield {key: torch.from_numpy(v) for key, v in msg[1].items()}
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
        """What decides the global order: must match to resume (the layout and the seq_len do not)."""
        return {"data": self.manifest.fingerprint() if len(self.manifests) == 1 else
                {s.name: m.fingerprint() for s, m in zip(self.sources, self.manifests)},
                "seed": self.seed, "objective": self.objective, "lanes": self.lanes}

    def state_dict(self) -> dict:
        """Layout-free: identical on every DP rank (all ranks hand out the same number of windows)."""
        sources = self.plan.to_state()
        for s, m in zip(self.sources, self.manifests):
            sources[s.name]["data"] = m.fingerprint()
        first = self.plan.states[0]
        done = first.started and first.remaining(self.seq_len) == 0  # reported as the next epoch's start
        return {"version": STATE_VERSION, "position": self.position, "tokens": self.tokens,
                "epoch": first.epoch + done, "offset": 0 if done else first.taken,
                "seq_len": self.seq_len, "windows_per_epoch": self.global_windows, "skipped": self.skipped,
                "sources": sources, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the state's token position, in this stream's layout (any dp_size/dp_rank/num_workers) and
        at this stream's seq_len; versions 1 and 2 (window-counted) are converted (module docstring)."""
        version = state.get("version") if isinstance(state, dict) else state
        if version not in (1, 2, STATE_VERSION):
            raise ValueError(f"ShardStream state: unsupported version {version!r}")
        mine = self._settings()
        keys = ("seed", "objective") + (("lanes",) if version >= 2 else ()) + (("data",) if version < 3 else ())
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(f"ShardStream state: {key}={state.get(key)!r} differs from this stream's "
                                 f"{mine[key]!r}; resuming would not continue the same token stream")
        notes: list[str] = []
        plan = self._plan_from_window_state(state) if version < 3 else self._plan_from_state(state, notes)
        if int(state.get("seq_len", self.seq_len)) != self.seq_len:
            notes.append(f"seq_len {state['seq_len']} -> {self.seq_len} (continuing at token {plan.tokens})")
        self.plan, self.skipped = plan, int(state.get("skipped", 0))
        self.resume_note = "; ".join(notes) or None

    def _plan_from_window_state(self, state: dict) -> Plan:
        """A version-1/2 state (one source, position counted in windows of the state's seq_len) as token cursors."""
        L_old = int(state.get("seq_len", self.seq_len))
        n_old = windows_per_epoch(self.layout.total, L_old)
        if state["version"] == 1:  # per-rank order: only an epoch boundary maps onto the global order
            epoch, consumed, per_rank = int(state["epoch"]), int(state["consumed"]), int(state.get("windows", -1))
            if consumed >= per_rank >= 0:
                epoch, consumed = epoch + 1, 0
            if consumed:
                raise ValueError(f"ShardStream state: a version-1 state saved in the middle of epoch {epoch} (after "
                                 f"{consumed} windows per rank) cannot continue in the version-2 global order; "
                                 f"resume from a checkpoint at an epoch boundary")
            position = epoch * n_old
        else:
            position = int(state["position"])
            if int(state.get("windows_per_epoch", n_old)) != n_old or position < 0:
                raise ValueError(f"ShardStream state: position={position}, windows_per_epoch="
                                 f"{state.get('windows_per_epoch')} do not fit this stream's {n_old} windows per "
                                 f"epoch at seq_len={L_old}")
        epoch, i = divmod(position, n_old)
        lanes = Plan.lanes_from_window_position(i, n_old, L_old, self.lanes, epoch)
        lanes.tokens, lanes.windows = position * L_old, position
        return Plan(self.plan.names, self.plan.sizes, [1.0], self.lanes, [lanes], position)

    def _plan_from_state(self, state: dict, notes: list) -> Plan:
        saved = state.get("sources") or {}
        if set(saved) != set(self.plan.names):
            raise ValueError(f"ShardStream state: sources {sorted(saved)} differ from this run's "
                             f"{sorted(self.plan.names)}; resuming would not continue the same token streams")
        if int(state.get("seq_len", -1)) == self.seq_len and \
                int(state.get("windows_per_epoch", self.global_windows)) != self.global_windows:
            raise ValueError(f"ShardStream state: windows_per_epoch={state.get('windows_per_epoch')} does not fit "
                             f"this stream's {self.global_windows} windows per epoch at seq_len={self.seq_len}")
        lanes, changed = [], []
        for s, man, lay, w in zip(self.sources, self.manifests, self.layouts, self.plan.weights):
            d = saved[s.name]
            if d.get("data") != man.fingerprint():
                raise ValueError(f"ShardStream state: source {s.name!r}: data={d.get('data')!r} differs from this "
                                 f"stream's {man.fingerprint()!r} (other shards); resuming would not continue the "
                                 f"same token stream")
            st = Plan.lanes_from_state(d)
            if st.started and (len(st.cursors) != self.lanes or max(st.ends) > lay.total - 1):
                raise ValueError(f"ShardStream state: source {s.name!r}: lanes {st.ends} do not fit its "
                                 f"{lay.total} tokens")
            lanes.append(st)
            if abs(float(d.get("weight", w)) - w) > 1e-12:
                changed.append(f"{s.name} {float(d['weight']):.4g} -> {w:.4g}")
        plan = Plan(self.plan.names, self.plan.sizes, self.plan.weights, self.lanes, lanes, int(state["position"]))
        if changed:
            notes.append("weights " + ", ".join(changed) + " (continuing from the per-source positions with the "
                         "new weights)")
        return plan
