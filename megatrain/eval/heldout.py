"""Held-out windows: the same windows at every evaluation, in a fixed order that is not the training stream.

Use:
    from megatrain.eval.heldout import load_heldout
    w = load_heldout("shards/heldout/index.json", seq_len=4096, tokens=1_000_000, vocab_size=8192,
                     train_data="shards/index.json")   # its tokenizer hash must be the training data's
    w.input_ids, w.labels, w.doc_ids, w.positions, w.target_bytes     # LongTensors [n_windows, seq_len]

The windows are epoch 0 of a one-rank, one-lane ShardStream with seed 0 (megatrain/data/stream.py): documents
packed with an EOD after each, cut into windows of seq_len (+1 token for the last label), the first
ceil(tokens / seq_len) of them (all, if the held-out data has fewer). They depend only on (manifest, seq_len,
tokens): the same for every evaluation, every layout, every run.
``positions[b, t]`` = how many tokens of its document the model has seen when it predicts ``labels[b, t]``:
1 at a document's first token, counted from the document start or from the window start, whichever is later (the
model has no context from before its window). ``target_bytes[b, t]`` = UTF-8 bytes ``labels[b, t]`` decodes to,
from the manifest's ``token_bytes`` table (None for manifests without one: then no bits per byte).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatrain.data import ShardStream
from megatrain.data.shards import Manifest
from megatrain.ops.lm_loss import IGNORE_INDEX


@dataclass
class HeldOut:
    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    target_bytes: Optional[torch.Tensor]
    manifest: str

    @property
    def num_windows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, rows: list) -> dict:
        """The windows `rows` as a batch; a row None is a dummy (window 0 with every label ignored), so that every
        rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)."""
        idx = torch.tensor([0 if r is None else r for r in rows])
        out = {"input_ids": self.input_ids[idx], "labels": self.labels[idx].clone(), "doc_ids": self.doc_ids[idx],
               "positions": self.positions[idx],
               "target_bytes": (self.target_bytes[idx] if self.target_bytes is not None
                                else torch.zeros_like(self.labels[idx]))}
        dummy = torch.tensor([r is None for r in rows])
        out["labels"][dummy] = IGNORE_INDEX
        out["target_bytes"] = out["target_bytes"].masked_fill(dummy[:, None], 0)
        return out


def check_same_tokenizer(heldout: Manifest, train: Manifest, key: str, where: str) -> None:
    a, b = heldout.tokenizer_sha256, train.tokenizer_sha256
    if a and b and a != b:
        raise ValueError(f"{key}={where}: built with tokenizer sha256 {a[:12]}..., but the training data with "
                         f"{b[:12]}...; held-out and training data must share one tokenizer (rebuild with the "
                         f"same --tokenizer)")


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """[n, L] doc ids -> [n, L] 1-based position inside the document's run in this window."""
    n, L = doc_ids.shape
    idx = torch.arange(L).expand(n, L)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run_start = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - run_start + 1


def load_heldout(manifest: str, seq_len: int, tokens: int, vocab_size: Optional[int] = None,
                 train_data: Optional[str] = None, key: str = "eval.shards") -> HeldOut:
    """The fixed evaluation windows of a held-out manifest (see the module docstring). ValueError naming `key`
    on bad data: not a manifest, another tokenizer than `train_data`'s, fewer tokens than one window."""
    try:
        man = Manifest.load(manifest)
    except ValueError as e:
        raise ValueError(f"{key}={manifest}: {e}") from None
    if train_data is not None:  # a manifest path (the caller skips globs, lists, urls)
        check_same_tokenizer(man, Manifest.load(train_data), key, manifest)
    if man.tokens + man.docs < seq_len + 1:
        raise ValueError(f"{key}={manifest}: holds {man.tokens} tokens in {man.docs} documents, fewer than one "
                         f"evaluation window of seq_len + 1 = {seq_len + 1}")
    want = max(1, math.ceil(tokens / seq_len))
    try:
        stream = ShardStream(manifest, seq_len=seq_len, seed=0, dp_rank=0, dp_size=1, num_workers=0,
                             objective="clm", vocab_size=vocab_size, loop=False, lanes=1)
    except ValueError as e:
        raise ValueError(f"{key}={manifest}: {e}") from None
    rows = []
    it = iter(stream)
    try:
        for s in it:
            rows.append(s)
            if len(rows) == want:
                break
    finally:
        it.close()
    stack = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "doc_ids")}
    tb = None
    if man.token_bytes:
        table = torch.tensor(man.token_bytes + [0] * max(0, (vocab_size or 0) - len(man.token_bytes)),
                             dtype=torch.long)
        lab = stack["labels"]
        tb = torch.where(lab == IGNORE_INDEX, torch.zeros_like(lab), table[lab.clamp(min=0)])
    return HeldOut(input_ids=stack["input_ids"], labels=stack["labels"], doc_ids=stack["doc_ids"],
                   positions=positions_in_document(stack["doc_ids"]), target_bytes=tb, manifest=manifest)


def rank_batches(num_windows: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> list:
    """This DP rank's windows (rank r: r, r + D, ...) in micro-batches, padded with None (dummy windows) so that
    every rank has the same number of micro-batches."""
    mine = list(range(dp_rank, num_windows, dp_size))
    per_rank = math.ceil(math.ceil(num_windows / dp_size) / micro_batch_size) * micro_batch_size
    mine += [None] * (per_rank - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
