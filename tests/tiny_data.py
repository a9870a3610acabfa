"""Tiny synthetic training data a tiny MEGA can learn from (no tokenizer, no network), and the tiny run config.

Documents are runs of an arithmetic pattern (next token = (token + step) mod range), so the next token is
predictable from the previous two and the loss falls within a few steps.
"""
import os

import numpy as np

from megatrain.data.build import write_shards as write_shard_folder
from megatrain.data.shards import doc_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
MEGALODON_TINY = os.path.join(ROOT, "configs", "megalodon_tiny.yaml")   # the same run, model.model_type=megalodon
VOCAB = 64
SPECIALS = {"unk": 0, "bos": 1, "eos": 2, "eod": 2, "pad": 3, "mask": 4}
FIRST = 8  # content ids are FIRST..VOCAB-1


def make_docs(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length, start, step = int(rng.integers(10, 90)), int(rng.integers(0, 56)), int(rng.integers(1, 4))
        docs.append(FIRST + (start + step * np.arange(length)) % (VOCAB - FIRST))
    return docs


def write_shards(out_dir: str, n_docs: int = 60, seed: int = 0) -> str:
    items = ((doc_key(i), d.astype(np.int64), {"doc": i}) for i, d in enumerate(make_docs(n_docs, seed)))
    write_shard_folder(out_dir, items, 2000, VOCAB, SPECIALS)
    return os.path.join(out_dir, "index.json")
