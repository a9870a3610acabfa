"""Summarize a shard folder: totals, per-shard counts, document-length histogram, a decoded sample.

Run:
    python data_tools/inspect_shards.py shards/ [--tokenizer tok/] [--chars 400]
Reads and validates every sample (errors name the shard and key) and checks the counts against index.json.
With --tokenizer, also checks that it is the tokenizer the shards were built with and prints decoded text.
Missing or truncated shard files (sizes recorded in index.json) are reported before reading; bad input or bad data:
one line on stderr naming the file (and sample), exit 2.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatrain.cli import ArgumentParser, run  # noqa: E402
from megatrain.data.shards import DataError, Manifest, check_local_shards, read_shard  # noqa: E402


def length_histogram(lengths: list[int]) -> list[tuple[str, int]]:
    """Counts of documents per power-of-two token-length bucket [2^k, 2^(k+1))."""
    if not lengths:
        return []
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    return [(f"[{2 ** k}, {2 ** (k + 1)})", int((buckets == k).sum())) for k in range(buckets.min(), buckets.max() + 1)]


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="folder with index.json (or the index.json path)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder: verify it and decode a sample")
    p.add_argument("--chars", type=int, default=400, help="characters of decoded text to print")
    a = p.parse_args(argv)
    if a.chars < 0:
        raise ValueError(f"--chars {a.chars}: expected a number >= 0")
    man = Manifest.load(a.shards)
    check_local_shards(man)  # a missing or truncated file: named now, with its expected size
    sp = None
    if a.tokenizer:
        from megatrain.data.tokenizer import load_tokenizer, tokenizer_sha256

        if man.tokenizer_sha256 and tokenizer_sha256(a.tokenizer) != man.tokenizer_sha256:
            raise DataError(f"tokenizer {a.tokenizer} is not the one these shards were built with "
                            f"(manifest tokenizer_sha256 {man.tokenizer_sha256[:12]}...)")
        sp = load_tokenizer(a.tokenizer)
    lengths, first = [], None
    print(f"{'shard':<24} {'docs':>8} {'tokens':>12} {'bytes':>12}")
    for i, info in enumerate(tqdm(man.shards, desc="reading", unit="shard", disable=None)):
        n = t = 0
        for key, toks in read_shard(man.shard_url(i), man.vocab_size):
            n, t = n + 1, t + len(toks)
            lengths.append(len(toks))
            if first is None:
                first = (info.url, key, toks)
        if (n, t) != (info.docs, info.tokens):
            raise DataError(f"shard {info.url}: holds {n} docs / {t} tokens but the manifest says "
                            f"{info.docs} / {info.tokens}")
        print(f"{info.url:<24} {n:>8} {t:>12} {info.bytes:>12}")
    print(f"total: {len(man.shards)} shards, {man.docs} documents, {man.tokens} tokens, vocab {man.vocab_size}, "
          f"special tokens {man.special_tokens}")
    if man.stats:
        print(f"build stats: {man.stats}")
    if lengths:
        print(f"document length (tokens): min {min(lengths)}, median {int(np.median(lengths))}, max {max(lengths)}")
        for bucket, count in length_histogram(lengths):
            print(f"  {bucket:>20} {count:>8} {'#' * min(60, count)}")
    if first is not None:
        url, key, toks = first
        print(f"sample {key} of {url}: {len(toks)} tokens, first ids {toks[:16].tolist()}")
        if sp is not None:
            print(repr(sp.decode(toks[:4 * a.chars].tolist())[:a.chars]))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "inspect_shards"))
