"""Build a shard folder (format: shards.py) from documents: the one writer behind data_tools/build_shards.py, the
tests and the benches.

Use:
    from megatrain.data.build import write_shards
    write_shards("shards/", ((tokens, meta) for ...), shard_bytes=256 << 20, vocab_size=V, special_tokens=ids)

The build in pieces (what build_shards.py runs; every step is deterministic, so the output does not depend on how
many tasks or workers ran it):
  * plan_units: the inputs (in the order given, sorted within each glob) are cut into units: runs of consecutive
    whole files of at most ``unit_bytes`` input bytes together (a larger file is a unit alone). A shard never spans
    two units, so each unit's shards depend on that unit's files alone.
  * build_unit: one unit -> OUT/_parts/uNNNNNN/{train,heldout}/shard-KKKKKK.tar and, last, its part.json (the
    shards' counts and sizes, the documents' UTF-8 bytes, counters, and the document hashes when deduplicating).
    Keys count the unit's documents (0000000000, 0000000001, ...): a document is named by its shard and key.
    A task builds the units u with u % num_tasks == task_index; a unit whose part.json is there (same settings)
    is not built again, so a task that died is simply rerun.
  * merge: every part.json must be there, with the same settings fingerprint (else one line naming the missing
    part). Exact duplicates across units are dropped (the first copy in unit order stays; the shards that held a
    later copy are rewritten without it); the shards are renamed shard-000000.tar, shard-000001.tar, ... in unit
    order (S3: server-side copies), heldout/index.json then index.json are written (the manifest last) and _parts
    goes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Iterable, Iterator

import numpy as np

from megatrain.data.remote import (DataError, RetryPolicy, exists, is_remote, join, listdir, move, read_bytes,
                                   remove_tree, stat_size, upload, write_bytes)
from megatrain.data.shards import MANIFEST_NAME, Manifest, ShardInfo, ShardWriter, doc_key, token_dtype

PARTS_DIR = "_parts"
PART_FILE = "part.json"
HELDOUT_DIR = "heldout"
SIDES = ("train", HELDOUT_DIR)
COUNTERS = ("docs_in", "bytes_in", "empty", "invalid_utf8", "short", "filtered", "duplicates")


def doc_hash_bytes(text: str) -> bytes:
    """sha256 of the document's UTF-8 text: the held-out split's hash and the exact-duplicate key."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def doc_hash(text: str) -> float:
    """The document's place in [0, 1) for the held-out split: the first 8 bytes of sha256(UTF-8 text)."""
    return int.from_bytes(doc_hash_bytes(text)[:8], "big") / 2.0 ** 64


def plan_units(sizes: list[int], unit_bytes: int) -> list[list[int]]:
    """Input indices grouped into units: consecutive files while their sizes sum to at most unit_bytes."""
    units, cur, size = [], [], 0
    for i, n in enumerate(sizes):
        if cur and size + n > unit_bytes:
            units.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        units.append(cur)
    return units


def unit_name(u: int) -> str:
    return f"u{u:06d}"


# ---------------------------------------------------------------------------------------------- one unit
class _Side:
    """One side (train / heldout) of a unit: its shard writer and per-document records."""

    def __init__(self, folder: str, stage: str, shard_bytes: int, dtype, keep_hashes: bool, policy: RetryPolicy):
        self.folder, self.stage, self.policy = folder, stage, policy
        os.makedirs(stage, exist_ok=True)
        self.writer = ShardWriter(stage, shard_bytes, dtype, on_close=self._closed)
        self.doc_bytes: list[int] = []
        self.hashes: list[int] | None = [] if keep_hashes else None

    def _closed(self, name: str) -> None:
        if is_remote(self.folder):  # each finished shard goes up whole, then leaves the local disk
            upload(os.path.join(self.stage, name), join(self.folder, name), self.policy)
            os.remove(os.path.join(self.stage, name))

    def add(self, key: str, tokens, meta: dict, h: bytes) -> None:
        self.writer.write(key, tokens, meta)
        self.doc_bytes.append(int(meta.get("bytes", 0)))
        if self.hashes is not None:
            self.hashes.append(int.from_bytes(h[:8], "big"))

    def close(self) -> dict:
        shards = self.writer.close()
        out = {"shards": [dataclasses.asdict(s) for s in shards], "doc_bytes": self.doc_bytes}
        if self.hashes is not None:
            out["hashes"] = self.hashes
        return out


def write_unit(part: str, docs: Iterable[tuple[np.ndarray, dict, bytes]], shard_bytes: int, vocab_size: int,
               is_heldout=None, dedup: bool = False, fingerprint: str = "", stats: dict | None = None,
               policy: RetryPolicy = RetryPolicy()) -> dict:
    """Write one unit's documents ``(tokens, meta, sha256 digest)`` into the part folder ``part`` (local or
    s3://): train shards in part/train/, held-out ones (``is_heldout(hash) -> bool``) in part/heldout/, and
    part.json last. ``dedup``: a document whose hash this unit has seen is dropped (counted); the hashes are
    kept in part.json for the merge's cross-unit pass. Returns the part record."""
    stats = {} if stats is None else stats  # the same dict: the reader below counts into it while it is consumed
    dtype = token_dtype(vocab_size)
    stage_root = tempfile.mkdtemp(prefix=".stage-") if is_remote(part) else part
    try:
        sides = {s: _Side(join(part, s), os.path.join(stage_root, s), shard_bytes, dtype, dedup, policy)
                 for s in SIDES}
        seen: set[bytes] = set()
        index = 0
        for tokens, meta, h in docs:
            if dedup:
                if h in seen:
                    stats["duplicates"] = stats.get("duplicates", 0) + 1
                    continue
                seen.add(h)
            side = HELDOUT_DIR if is_heldout is not None and is_heldout(h) else "train"
            sides[side].add(doc_key(index), tokens, meta, h)
            index += 1
        record = {"fingerprint": fingerprint, "stats": stats, **{s: sides[s].close() for s in SIDES}}
    finally:
        if stage_root != part:
            shutil.rmtree(stage_root, ignore_errors=True)
    write_bytes(join(part, PART_FILE), json.dumps(record, sort_keys=True).encode(), policy)
    return record


def read_part(part: str, fingerprint: str | None, policy: RetryPolicy = RetryPolicy()) -> dict | None:
    """A finished part's record, or None when its part.json is absent (not built, or still being built)."""
    path = join(part, PART_FILE)
    if not exists(path, policy):
        return None
    try:
        rec = json.loads(read_bytes(path, policy))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable part record ({e}); rerun the task that built it") from None
    if fingerprint is not None and rec.get("fingerprint") != fingerprint:
        raise DataError(f"{path}: built with other inputs or settings (fingerprint {rec.get('fingerprint')!r}, "
                        f"this build {fingerprint!r}); remove {PARTS_DIR}/ or use the same arguments")
    return rec


# ---------------------------------------------------------------------------------------------- merge
def _copy_without(src: str, dst_stage: str, drop: set[str]) -> None:
    """A shard rewritten without the samples whose keys are in ``drop`` (members copied byte for byte)."""
    from megatrain.data.remote import open_at
    f = open_at(src)
    try:
        with tarfile.open(fileobj=f, mode="r|") as tin, open(dst_stage, "wb") as out, \
                tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tout:
            for m in tin:
                if m.name.partition(".")[0] in drop:
                    continue
                tout.addfile(m, io.BytesIO(tin.extractfile(m).read()))
    finally:
        f.close()


def _cross_unit_duplicates(records: list[dict]) -> list[dict[str, set[int]]]:
    """Per unit and side: the positions of documents an earlier unit already holds (the first copy in unit order
    stays). Compared by the first 8 bytes of sha256: two different documents match with probability 2^-64."""
    owner, hashes = [], []
    for u, rec in enumerate(records):
        for s in SIDES:
            h = rec[s].get("hashes")
            if h is None:
                raise DataError(f"part {unit_name(u)} has no document hashes: built without --dedup")
            hashes.append(np.asarray(h, dtype=np.uint64))
            owner.append((u, s, len(h)))
    flat = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    unit_of = np.concatenate([np.full(n, u, np.int64) for u, _, n in owner]) if owner else np.zeros(0, np.int64)
    order = np.lexsort((unit_of, flat))  # by hash, then unit: the first of each run of equal hashes stays
    later = np.zeros(len(flat), bool)
    same = flat[order][1:] == flat[order][:-1]
    later[order[1:][same]] = True
    drops: list[dict[str, set[int]]] = [{s: set() for s in SIDES} for _ in records]
    at = 0
    for u, s, n in owner:
        drops[u][s] = set(np.nonzero(later[at:at + n])[0].tolist())
        at += n
    return drops


def merge(out: str, n_units: int, fingerprint: str | None, manifest_fields: dict, policy: RetryPolicy = RetryPolicy(),
          dedup: bool = False, num_tasks: int = 1, check=None) -> tuple[Manifest, Manifest | None]:
    """Turn OUT/_parts/ into the final folder (see the module docstring). ``manifest_fields``: vocab_size,
    special_tokens, tokenizer_sha256, token_bytes, split (the split's rule; {} when none). ``check(train,
    heldout)``: raises to refuse the result before any manifest is written."""
    parts = join(out, PARTS_DIR)
    records = []
    for u in range(n_units):
        rec = read_part(join(parts, unit_name(u)), fingerprint, policy)
        if rec is None:
            raise DataError(f"merge: part {join(parts, unit_name(u), PART_FILE)} is missing (unit {u} of "
                            f"{n_units}, built by --task-index {u % num_tasks} of --num-tasks {num_tasks}): "
                            f"rerun that task, then merge")
        for s in SIDES:
            for sh in rec[s]["shards"]:
                url = join(parts, unit_name(u), s, sh["url"])
                try:
                    size = stat_size(url, policy)
                except (OSError, DataError):
                    size = -1
                if size != sh["bytes"]:
                    raise DataError(f"merge: part shard {url} is missing or has {size} bytes, not the "
                                    f"{sh['bytes']} its part.json records: rerun task {u % num_tasks}, then merge")
        records.append(rec)
    drops = _cross_unit_duplicates(records) if dedup else [{s: set() for s in SIDES} for _ in records]
    stats = {k: 0 for k in COUNTERS if k != "duplicates" or dedup}
    for rec, dr in zip(records, drops):
        for k, v in rec["stats"].items():
            stats[k] = stats.get(k, 0) + v
        if dedup:
            stats["duplicates"] += sum(len(d) for d in dr.values())
    mans = {}
    for s in SIDES:
        folder = out if s == "train" else join(out, HELDOUT_DIR)
        shards, doc_bytes, n = [], [], 0
        for u, (rec, dr) in enumerate(zip(records, drops)):
            pos = 0
            for sh in rec[s]["shards"]:
                src = join(parts, unit_name(u), s, sh["url"])
                name = f"shard-{n:06d}.tar"
                gone = {i for i in range(pos, pos + sh["docs"]) if i in dr[s]}
                bytes_ = rec[s]["doc_bytes"][pos:pos + sh["docs"]]
                pos += sh["docs"]
                if gone:
                    info = _rewrite(src, join(folder, name), {doc_key(i) for i in gone}, sh, policy)
                    if info is None:  # every document of the shard was a duplicate
                        continue
                    bytes_ = [b for i, b in enumerate(bytes_, start=pos - sh["docs"]) if i not in gone]
                else:
                    move(src, join(folder, name), policy)
                    info = ShardInfo(url=name, docs=sh["docs"], tokens=sh["tokens"], bytes=sh["bytes"])
                info.url = name
                shards.append(info)
                doc_bytes += bytes_
                n += 1
        mans[s] = Manifest(shards=shards, vocab_size=manifest_fields["vocab_size"],
                           special_tokens=dict(manifest_fields["special_tokens"]),
                           tokenizer_sha256=manifest_fields.get("tokenizer_sha256", ""),
                           dtype=str(token_dtype(manifest_fields["vocab_size"])), stats=dict(stats),
                           doc_bytes=doc_bytes if manifest_fields.get("token_bytes") else [],
                           token_bytes=list(manifest_fields.get("token_bytes") or []), root=folder)
    split = manifest_fields.get("split") or {}
    if check is not None:
        check(mans["train"], mans[HELDOUT_DIR] if split else None)
    if split:
        for s in SIDES:
            mans[s].split = dict(split, part="heldout" if s == HELDOUT_DIR else "train",
                                 train_docs=mans["train"].docs, heldout_docs=mans[HELDOUT_DIR].docs)
        _save(mans[HELDOUT_DIR], join(out, HELDOUT_DIR, MANIFEST_NAME), policy)
    _save(mans["train"], join(out, MANIFEST_NAME), policy)  # last: a reader sees a whole build or none
    remove_tree(parts, policy)
    return mans["train"], mans[HELDOUT_DIR] if split else None


def _rewrite(src: str, dst: str, drop: set[str], sh: dict, policy: RetryPolicy) -> ShardInfo | None:
    from megatrain.data.shards import read_shard
    if len(drop) == sh["docs"]:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        stage = os.path.join(tmp, "shard.tar")
        _copy_without(src, stage, drop)
        tokens = sum(len(t) for _, t in read_shard(stage, 1 << 32))
        size = os.path.getsize(stage)
        if is_remote(dst):
            upload(stage, dst, policy)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            shutil.move(stage, dst)
    return ShardInfo(url=os.path.basename(dst), docs=sh["docs"] - len(drop), tokens=tokens, bytes=size)


def _save(man: Manifest, url: str, policy: RetryPolicy) -> None:
    body = json.dumps(man.to_json(), indent=1, sort_keys=True) + "\n"
    write_bytes(url, body.encode(), policy)


# ---------------------------------------------------------------------------------------------- one call
def write_shards(out_dir: str, docs: Iterable, shard_bytes: int, vocab_size: int, special_tokens: dict[str, int],
                 tokenizer_sha256: str = "", stats: dict | None = None) -> Manifest:
    """Already-tokenized documents -> a shard folder, through the same unit writer and merge build_shards.py
    runs (one unit). ``docs``: ``(tokens, meta)`` or ``(key, tokens, meta)`` (the key is ignored: keys count the
    documents). Writes into ``out_dir`` in place; shards of an earlier build there that this one does not
    produce are removed after the new index.json is in place. Returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    remove_tree(join(out_dir, PARTS_DIR))

    def items() -> Iterator:
        for d in docs:
            tokens, meta = d[-2], d[-1]
            yield tokens, meta, b""
    write_unit(join(out_dir, PARTS_DIR, unit_name(0)), items(), shard_bytes, vocab_size, stats=stats)
    man, _ = merge(out_dir, 1, None, {"vocab_size": vocab_size, "special_tokens": special_tokens,
                                      "tokenizer_sha256": tokenizer_sha256})
    keep = {s.url for s in man.shards} | {MANIFEST_NAME}
    for name in listdir(out_dir):
        if name.startswith("shard-") and name not in keep:
            os.remove(os.path.join(out_dir, name))
    man.root = os.path.abspath(out_dir)
    return man


# ---------------------------------------------------------------------------------------------- from raw text
@dataclasses.dataclass
class UnitJob:
    """Everything one worker needs to build one unit from raw text (picklable: workers are processes)."""
    unit: int
    part: str                      # OUT/_parts/uNNNNNN (local or s3://)
    files: list[str]
    text: dict                     # TextConfig fields
    tokenizer: str                 # folder or .model path
    shard_bytes: int
    heldout_fraction: float | None = None
    heldout_cut: float | None = None   # --heldout-docs: hashes <= cut are held out
    dedup: bool = False
    fingerprint: str = ""
    threads: int = 1
    batch_bytes: int = 1 << 20
    retries: int = 5
    backoff_s: float = 1.0


def heldout_rule(fraction: float | None, cut: float | None):
    """``is_heldout(sha256 digest)`` for a split, or None."""
    if fraction is not None:
        return lambda h: int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction
    if cut is not None:
        return lambda h: int.from_bytes(h[:8], "big") / 2.0 ** 64 <= cut
    return None


def _batches(docs, batch_bytes: int):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[2])
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded(files, text_cfg, sp, threads: int, batch_bytes: int, stats: dict, dtype):
    """Yield ``(tokens, meta, sha256 digest)`` for the documents of ``files`` in order; meta holds the source,
    the document's index in it, its token count and UTF-8 byte count. sentencepiece encodes batch i+1 on its own
    threads (it releases the GIL) while this thread writes batch i and reads the next documents."""
    import concurrent.futures

    from megatrain.data.text import iter_documents
    from megatrain.data.tokenizer import encode_documents

    def emit(batch, future):
        for (src, i, text), toks in zip(batch, future.result()):
            raw = text.encode("utf-8")
            yield toks, {"source": src, "doc": i, "tokens": len(toks), "bytes": len(raw)}, \
                hashlib.sha256(raw).digest()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in _batches(iter_documents(files, text_cfg, stats), batch_bytes):
            future = pool.submit(encode_documents, sp, [t for _, _, t in batch], threads, dtype)
            if pending is not None:
                yield from emit(*pending)
            pending = (batch, future)
        if pending is not None:
            yield from emit(*pending)


def build_unit(job: UnitJob) -> dict:
    """Read, filter, encode and write one unit; a transient remote failure restarts the unit (the same retry
    loop and policy as training reads). Returns {"unit", "stats", "tokens", "cpu_s"}."""
    import time

    from megatrain.data.remote import attempts
    from megatrain.data.text import TextConfig
    from megatrain.data.tokenizer import load_tokenizer

    sp = load_tokenizer(job.tokenizer)
    cfg = TextConfig(**job.text)
    policy = RetryPolicy(job.retries, job.backoff_s)
    # a transient network failure restarts the unit; with local inputs there is nothing to wait for
    unit_policy = policy if any(is_remote(f) for f in job.files) or is_remote(job.part) else RetryPolicy(0)
    cpu0 = time.process_time()
    for attempt in attempts(f"unit {job.unit} ({job.files[0]}{' ...' if len(job.files) > 1 else ''})",
                            unit_policy):
        with attempt:
            stats: dict = {}
            docs = encoded(job.files, cfg, sp, job.threads, job.batch_bytes, stats, token_dtype(sp.vocab_size()))
            rec = write_unit(job.part, docs, job.shard_bytes, sp.vocab_size(),
                             heldout_rule(job.heldout_fraction, job.heldout_cut), job.dedup, job.fingerprint,
                             stats, policy)
    tokens = sum(s["tokens"] for side in SIDES for s in rec[side]["shards"])
    return {"unit": job.unit, "stats": rec["stats"], "tokens": tokens, "cpu_s": time.process_time() - cpu0}
