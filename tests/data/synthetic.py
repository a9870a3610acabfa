"""Synthetic shards for the data tests: documents of globally unique token ids, so any duplicate, loss or reorder
is detectable."""
import numpy as np

from megatrain.data.build import write_shards
from megatrain.data.shards import doc_key
from tests.tiny_data import SPECIALS

FIRST_ID = 10          # token ids below are never document content
VOCAB = 4000


def make_docs(n_docs: int, seed: int, max_len: int = 120):
    """Documents whose tokens are consecutive, globally unique ids: any duplicate/loss/reorder is detectable."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n_docs)
    lengths[3] = 5 * max_len  # one document much longer than a window
    docs, nxt = [], FIRST_ID
    for n in lengths:
        docs.append(np.arange(nxt, nxt + n, dtype=np.int64))
        nxt += n
    assert nxt < VOCAB
    return docs


def write_synthetic(out_dir, docs, shard_bytes=10000):
    items = ((doc_key(i), d, {"source": "synthetic", "doc": i, "tokens": len(d)}) for i, d in enumerate(docs))
    return write_shards(str(out_dir), items, shard_bytes, VOCAB, SPECIALS)
