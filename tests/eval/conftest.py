"""Fixtures for the evaluation tests: a small real corpus split into training and held-out shards.

Run: PYTHONPATH=. python -m pytest -q tests/eval
"""
import json
import os

import pytest

from tests.data.conftest import corpus_dir, tokenizer_dir  # noqa: F401  (the same session fixtures)


def write_small_docs(path, corpus_dir, n=40):
    """n short documents (jsonl) cut from the plays, one with non-ASCII text: enough documents to split."""
    text = open(os.path.join(corpus_dir, sorted(os.listdir(corpus_dir))[0])).read()
    with open(path, "w") as f:
        for i in range(n):
            doc = text[i * 700:(i + 1) * 700] + ("\nCafé — naïve ☃" if i % 7 == 0 else "")
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def split_shards(tmp_path_factory, corpus_dir, tokenizer_dir):  # noqa: F811
    """(out folder, jsonl input): shards of 40 small documents + the plays, 25% held out."""
    from data_tools import build_shards
    d = tmp_path_factory.mktemp("split")
    docs = write_small_docs(d / "docs.jsonl", corpus_dir)
    out = d / "shards"
    build_shards.main(["--input", docs, os.path.join(corpus_dir, "*.txt"), "--tokenizer", tokenizer_dir,
                       "--out", str(out), "--shard-size", "20KB", "--heldout-fraction", "0.25", "--workers", "1"])
    return str(out), docs
