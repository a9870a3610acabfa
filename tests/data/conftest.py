"""Fixtures for the data tests: tiny synthetic shards with globally unique token ids, a tiny real tokenizer.

Run: PYTHONPATH=. python -m pytest -q tests/data
"""
import os

import pytest

from tests.data.synthetic import make_docs, write_synthetic


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
