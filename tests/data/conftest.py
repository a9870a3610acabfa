"""Fixtures for the data tests: tiny synthetic shards with globally unique token ids, a tiny real tokenizer.

Run: PYTHONPATH=. python -m pytest -q tests/data
"""
import os

import numpy as np
import pytest

from megatrain.data.shards import doc_key, write_token_shards

SPECIALS = {"unk": 0, "bos": 1, "eos": 2, "eod": 2, "pad": 3, "mask": 4}
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
    return write_token_shards(str(out_dir), items, shard_bytes, VOCAB, SPECIALS)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """(manifest path, docs): 23 documents in 7 shards of unequal size."""
    out = tmp_path_factory.mktemp("synthetic")
    docs = make_docs(23, seed=1)
    man = write_synthetic(out, docs)
    assert len(man.shards) == 7, [s.docs for s in man.shards]
    return os.path.join(out, "index.json"), docs


PLAYS = 3


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    from data_tools import demo_corpus

    out = tmp_path_factory.mktemp("corpus")
    demo_corpus.main(["--out", str(out), "--limit", str(PLAYS)])
    return str(out)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir):
    from data_tools import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer.main(["--input", os.path.join(corpus_dir, "*.txt"), "--vocab-size", "400", "--out", str(out)])
    return str(out)
