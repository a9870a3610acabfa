"""Tokenize documents into webdataset tar shards plus an index.json manifest.

Run:
    python data_tools/build_shards.py --input 'corpus/*.txt' --tokenizer tok/ --out shards/ [--shard-size 256MB] [--workers 2]
        [--heldout-fraction 0.01 | --heldout-docs 100]       # held-out split: shards/heldout/index.json
One sample per non-empty document (format: megatrain/data/shards.py). A document larger than --shard-size is still
one sample, in a shard of its own (documents are never split; the loader packs them into windows).
Empty documents are dropped; invalid UTF-8 is replaced (default) or the document rejected (--invalid-utf8 reject);
both are counted, printed and stored in index.json "stats". Output bytes depend only on the inputs and tokenizer
(fixed tar metadata). --out must be new, empty or an earlier build (replaced whole); the build is written to a
temporary sibling folder and renamed at the end, so a failed or killed build leaves nothing half-written.
Bad input (missing tokenizer, no or only empty documents, a size like "lots", bad numbers): one line, exit 2.
Prints the raw-text MB/s.
Held-out split (for megatrain/eval): by document, decided by a hash of the document's text (sha256), so it does not
depend on input order or worker count and identical documents fall on the same side: with --heldout-fraction F a
document is held out when its hash, read as a number in [0, 1), is below F; with --heldout-docs N the N documents of
smallest hash are (all copies of a duplicate at the cut go together). Held-out documents go to OUT/heldout/ (its own
shards + index.json), the rest to OUT/; no document is in both. Both manifests record the split ("split"), each
document's UTF-8 byte count ("doc_bytes") and the UTF-8 bytes of every token id ("token_bytes": bits per byte).
--workers sets sentencepiece's encoding threads (documents are encoded in batches of --batch-mb MB).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import itertools
import os
import re
import resource
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatrain.cli import ArgumentParser, output_folder, run  # noqa: E402
from megatrain.data.shards import MANIFEST_NAME, Manifest, ShardWriter, doc_key, token_dtype  # noqa: E402
from megatrain.data.text import TextConfig, expand_inputs, iter_documents  # noqa: E402
from megatrain.data.tokenizer import (load_tokenizer, special_token_ids, token_byte_lengths,  # noqa: E402
                                      tokenizer_sha256)

HELDOUT_DIR = "heldout"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).upper()] < 1:
        raise ValueError(f"--shard-size {text!r}: expected a positive size such as 256MB, 1GB, 500KB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or folders")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.model")
    p.add_argument("--out", required=True, help="output folder for shard-*.tar and index.json")
    p.add_argument("--shard-size", default="256MB", help="target tar size (default 256MB)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding threads")
    p.add_argument("--text-field", default=TextConfig.text_field, help="jsonl field holding the text")
    p.add_argument("--invalid-utf8", default=TextConfig.invalid_utf8, choices=["replace", "reject"])
    p.add_argument("--batch-mb", type=float, default=1.0, help="text encoded per batch")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--heldout-fraction", type=float, default=None,
                      help="hold out this fraction of the documents (by a hash of each document) in OUT/heldout/")
    held.add_argument("--heldout-docs", type=int, default=None,
                      help="hold out this many documents (those of smallest hash) in OUT/heldout/")
    return p.parse_args(argv)


def encode_documents(sp, texts: list[str], threads: int, dtype) -> list[np.ndarray]:
    """sentencepiece ids of each text, encoded line by line when "\n" is its own token.

    Our tokenizers make "\n" a user-defined symbol, which sentencepiece never merges across, so encoding the
    lines separately and joining them with the "\n" id gives the same ids as encoding the whole document, about 2x
    faster (short inputs) and spread evenly over the threads.
    """
    nl = sp.piece_to_id("\n")
    if nl == sp.unk_id() or sp.id_to_piece(nl) != "\n":
        return [np.asarray(ids, dtype=dtype) for ids in sp.encode(texts, num_threads=threads)]
    lines, counts = [], []
    for text in texts:
        parts = text.split("\n")
        lines.extend(parts)
        counts.append(len(parts))
    ids = sp.encode(lines, num_threads=threads)
    out, k = [], 0
    for c in counts:
        chunk = ids[k:k + c]
        k += c
        n = sum(len(z) for z in chunk) + c
        flat = np.fromiter(itertools.chain.from_iterable(z + [nl] for z in chunk), dtype=dtype, count=n)
        out.append(flat[:-1])  # no "\n" after the last line
    return out


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


def doc_hash(text: str) -> float:
    """The document's place in [0, 1) for the held-out split: the first 8 bytes of sha256(UTF-8 text)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def _encoded_docs(files, text_cfg, sp, threads: int, batch_bytes: int, stats: dict, dtype):
    """Yield (key, tokens, meta, hash) in input order; meta holds the document's UTF-8 byte count.

    sentencepiece encodes batch i+1 on its own threads (it releases the GIL) while this thread writes batch i
    and reads the next documents.
    """
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="tokenizing",
               disable=None)
    index = 0

    def emit(batch, future):
        nonlocal index
        for (src, i, text), toks in zip(batch, future.result()):
            yield (doc_key(index), toks, {"source": src, "doc": i, "tokens": len(toks),
                                          "bytes": len(text.encode("utf-8"))}, doc_hash(text))
            index += 1
        bar.update(sum(len(t) for _, _, t in batch))  # characters ~ bytes; the bar is only a progress hint

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in _batches(iter_documents(files, text_cfg, stats), batch_bytes):
            future = pool.submit(encode_documents, sp, [t for _, _, t in batch], threads, dtype)
            if pending is not None:
                yield from emit(*pending)
            pending = (batch, future)
        if pending is not None:
            yield from emit(*pending)
    bar.close()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def _earlier_build(names: list[str]) -> bool:
    """An --out folder this tool wrote before: index.json plus shard files (and a heldout/ folder) only."""
    return MANIFEST_NAME in names and all(n in (MANIFEST_NAME, HELDOUT_DIR) or n.startswith("shard-") for n in names)


def heldout_cut(files, text_cfg, n_docs: int) -> float:
    """The hash below or at which a document is held out, for --heldout-docs N (a first pass over the text)."""
    hashes = sorted(doc_hash(t) for _, _, t in iter_documents(files, text_cfg, {}))
    if hashes and n_docs >= len(hashes):
        raise ValueError(f"--heldout-docs {n_docs}: the input has only {len(hashes)} non-empty documents; "
                         f"leave some for training")
    return hashes[n_docs - 1] if hashes else 0.0


def write_split(out: str, docs, shard_bytes: int, vocab: int, specials: dict, tok_sha: str, stats: dict,
                is_heldout, split: dict, token_bytes: list) -> tuple[Manifest, Manifest | None]:
    """Route each (key, tokens, meta, hash) to OUT/ or OUT/heldout/ and write both manifests (heldout: None when
    no split was asked for). Documents keep their global keys, so a key names one document in either part."""
    dtype = token_dtype(vocab)
    parts = {False: (out, ShardWriter(out, shard_bytes, dtype), [])}
    if split:
        os.makedirs(os.path.join(out, HELDOUT_DIR))
        parts[True] = (os.path.join(out, HELDOUT_DIR), ShardWriter(os.path.join(out, HELDOUT_DIR), shard_bytes,
                                                                   dtype), [])
    for key, tokens, meta, h in docs:
        _, writer, doc_bytes = parts[bool(split) and is_heldout(h)]
        writer.write(key, tokens, meta)
        doc_bytes.append(meta["bytes"])
    mans = {}
    for held, (folder, writer, doc_bytes) in parts.items():
        mans[held] = Manifest(shards=writer.close(), vocab_size=vocab, special_tokens=dict(specials),
                              tokenizer_sha256=tok_sha, dtype=str(dtype), stats=dict(stats), doc_bytes=doc_bytes,
                              token_bytes=token_bytes,
                              split=dict(split, part="heldout" if held else "train") if split else {},
                              root=os.path.abspath(folder))
    for held, (folder, _, _) in parts.items():
        if split:
            mans[held].split.update(train_docs=mans[False].docs, heldout_docs=mans[True].docs)
        mans[held].save(os.path.join(folder, MANIFEST_NAME))
    return mans[False], mans.get(True)


def main(argv=None) -> int:
    a = parse_args(argv)
    shard_bytes = parse_size(a.shard_size)  # every check before any work
    if a.workers < 1:
        raise ValueError(f"--workers {a.workers}: expected a positive number of threads")
    if not a.batch_mb > 0:
        raise ValueError(f"--batch-mb {a.batch_mb}: expected a positive size in MB")
    if a.heldout_fraction is not None and not 0 < a.heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction {a.heldout_fraction}: expected a fraction strictly between 0 and 1")
    if a.heldout_docs is not None and a.heldout_docs < 1:
        raise ValueError(f"--heldout-docs {a.heldout_docs}: expected a positive number of documents")
    text_cfg = TextConfig(text_field=a.text_field, invalid_utf8=a.invalid_utf8)
    files = expand_inputs(a.input)
    try:
        sp = load_tokenizer(a.tokenizer)
        specials = special_token_ids(sp)
    except ValueError as e:
        raise ValueError(f"--tokenizer {a.tokenizer}: {e}") from None
    vocab = sp.vocab_size()
    stats: dict = {"empty": 0, "invalid_utf8": 0}
    t0, cpu0 = time.time(), _cpu_seconds()
    split, cut = {}, None
    if a.heldout_fraction is not None:
        split, cut = {"rule": "sha256(utf-8 text)[:8] / 2**64 < heldout_fraction",
                      "heldout_fraction": a.heldout_fraction}, a.heldout_fraction
        is_heldout = lambda h: h < cut  # noqa: E731
    elif a.heldout_docs is not None:
        cut = heldout_cut(files, text_cfg, a.heldout_docs)
        split = {"rule": "the heldout_docs_requested documents of smallest sha256(utf-8 text)[:8]",
                 "heldout_docs_requested": a.heldout_docs}
        is_heldout = lambda h: h <= cut  # noqa: E731
    else:
        is_heldout = None
    with output_folder(a.out, "--out", replaceable=_earlier_build) as tmp:
        docs = _encoded_docs(files, text_cfg, sp, a.workers, int(a.batch_mb * 1e6), stats, token_dtype(vocab))
        man, held = write_split(tmp, docs, shard_bytes, vocab, specials, tokenizer_sha256(a.tokenizer), stats,
                                is_heldout, split, token_byte_lengths(sp))
        if not man.shards and (held is None or not held.shards):
            raise ValueError(f"--input {' '.join(a.input)}: no non-empty document in {len(files)} files "
                             f"({stats['empty']} empty, {stats['invalid_utf8']} rejected as invalid UTF-8)")
        if held is not None and (not held.shards or not man.shards):
            raise ValueError(f"--heldout-{'fraction' if a.heldout_fraction is not None else 'docs'}: the split "
                             f"leaves {'no held-out' if not held.shards else 'no training'} document "
                             f"({man.docs + held.docs} documents in all)")
    dt, cpu = max(time.time() - t0, 1e-9), max(_cpu_seconds() - cpu0, 1e-9)
    mb = stats.get("bytes_in", 0) / 1e6
    print(f"wrote {len(man.shards)} shards, {man.docs} documents, {man.tokens} tokens to {a.out}")
    if held is not None:
        print(f"held out {held.docs} documents, {held.tokens} tokens in {os.path.join(a.out, HELDOUT_DIR)}")
    print(f"empty documents: {stats['empty']}, invalid UTF-8 documents ({a.invalid_utf8}d): {stats['invalid_utf8']}")
    # CPU seconds as well: on a shared machine the wall-clock rate mostly measures the neighbours.
    print(f"rate: {mb:.2f} MB raw text in {dt:.2f}s = {mb / dt:.2f} MB/s ({a.workers} threads; "
          f"{mb / cpu:.2f} MB per CPU-second)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "build_shards"))
