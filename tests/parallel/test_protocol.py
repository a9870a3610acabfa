"""The window protocol's slicer: contiguous last-dim slices; pre-shifted CLM labels line up across slice boundaries;
one import path.

Run: PYTHONPATH=. python -m pytest -q tests/parallel/test_protocol.py
"""
import os

import pytest
import torch

from megatrain.data import ShardStream
from megatrain.parallel.protocol import sp_slice
from tests.data.synthetic import make_docs, write_synthetic


def test_slices_tile_the_window_and_labels_cross_boundaries(tmp_path):
    write_synthetic(tmp_path, make_docs(23, seed=1))
    man = os.path.join(tmp_path, "index.json")
    loader = torch.utils.data.DataLoader(ShardStream(man, seq_len=24, seed=0), batch_size=2)
    batch = next(iter(loader))
    for sp_size in (1, 2, 3, 4):
        pieces = [sp_slice(batch, r, sp_size) for r in range(sp_size)]
        for key in ("input_ids", "labels", "doc_ids"):
            assert all(p[key].shape == (2, 24 // sp_size) for p in pieces)
            assert torch.equal(torch.cat([p[key] for p in pieces], dim=-1), batch[key])
        for left, right in zip(pieces, pieces[1:]):  # last token of slice r predicts the first of slice r+1
            assert torch.equal(left["labels"][:, -1], right["input_ids"][:, 0])
    one = {k: v[0] for k, v in batch.items()}
    assert torch.equal(sp_slice(one, 1, 2)["input_ids"], one["input_ids"][12:])
    assert torch.equal(sp_slice(one["doc_ids"], 0, 3), one["doc_ids"][:8])


def test_errors_and_passthrough():
    x = {"input_ids": torch.arange(10), "note": "kept"}
    assert sp_slice(x, 1, 2)["note"] == "kept"
    with pytest.raises(ValueError, match="'input_ids' has length 10, not divisible by sp_size=3"):
        sp_slice(x, 0, 3)
    with pytest.raises(ValueError, match="sp_rank"):
        sp_slice(x, 2, 2)
    with pytest.raises(TypeError):
        sp_slice([torch.arange(4)], 0, 2)


def test_one_import_path():
    """The slicer is the protocol's step 1 and lives there alone (it was in megatrain.data with three re-exports)."""
    import megatrain.data
    import megatrain.parallel
    import megatrain.parallel.sequence
    assert megatrain.parallel.sp_slice is sp_slice
    for module in (megatrain.data, megatrain.parallel.sequence):
        assert not hasattr(module, "sp_slice"), module
