"""Bad shards and other inputs: clear errors naming shard and key; skip_corrupt counts; pipe: urls.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_shards.py
"""
import dataclasses
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from megatrain.data import DataError, Manifest, ShardStream
from megatrain.data.shards import encode_sample
from megatrain.ops.lm_loss import IGNORE_INDEX
from tests.data.synthetic import VOCAB

L = 16


@pytest.fixture
def copy(synthetic, tmp_path):
    man, docs = synthetic
    shutil.copytree(os.path.dirname(man), tmp_path / "s")
    return str(tmp_path / "s"), docs


def _rewrite(path, samples):
    """Replace a shard by hand-made members: samples = [(key, {ext: bytes})]."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _members(path):
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(out.items())


def _all(stream):
    return [s["input_ids"] for s in stream]


def test_corrupt_tar_named_or_skipped_and_counted(copy):
    root, docs = copy
    man = Manifest.load(root)
    bad = man.shards[2]
    with open(os.path.join(root, bad.url), "wb") as f:
        f.write(b"this is not a tar file" * 100)
    with pytest.raises(DataError, match=bad.url):
        _all(ShardStream(root, seq_len=L, seed=0))
    # lanes=1: the windows a loop leaves for the next one are at the stream's end, not inside the bad span
    good = ShardStream(root, seq_len=L, seed=0, dp_size=2, dp_rank=0, skip_corrupt=True, lanes=1)
    other = ShardStream(root, seq_len=L, seed=0, dp_size=2, dp_rank=1, skip_corrupt=True, lanes=1)
    samples = list(good) + list(other)
    assert all((s["labels"][s["input_ids"] == 3] == IGNORE_INDEX).all() for s in samples)  # no loss on the filler
    seen = torch.cat([s["input_ids"] for s in samples])
    assert len(seen) == 2 * len(good) * L  # still equal, planned counts
    assert good.skipped + other.skipped == bad.docs  # counted once across ranks
    assert (seen == 3).sum() >= bad.tokens  # the lost span is <pad> (labels IGNORE_INDEX)
    seen_set = set(seen.tolist())
    for k in (3, 9):  # the count survives a resume without double counting
        s1 = ShardStream(root, seq_len=L, seed=0, num_workers=2, skip_corrupt=True)
        it = iter(s1)
        for _ in range(k):
            next(it)
        del it
        s2 = ShardStream(root, seq_len=L, seed=0, num_workers=2, skip_corrupt=True)
        s2.load_state_dict(s1.state_dict())
        _all(s2)
        assert s2.skipped == bad.docs
    present = [d for d in docs if d[0] in seen_set]
    assert len(present) >= len(docs) - bad.docs - 2  # all other documents (the remainder may cut 1-2)


def test_truncated_tar(copy):
    root, _ = copy
    man = Manifest.load(root)
    path = os.path.join(root, man.shards[1].url)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2 + 100])
    with pytest.raises(DataError, match=man.shards[1].url):
        _all(ShardStream(root, seq_len=L, seed=0))
    s = ShardStream(root, seq_len=L, seed=0, skip_corrupt=True)
    assert len(_all(s)) == len(s) and 0 < s.skipped < man.shards[1].docs + 1


def test_missing_tokens_and_out_of_vocab_name_the_key(copy):
    root, _ = copy
    man = Manifest.load(root)
    path = os.path.join(root, man.shards[0].url)
    samples = _members(path)
    key = samples[1][0]
    samples[1] = (key, {"meta.json": samples[1][1]["meta.json"]})
    _rewrite(path, samples)
    with pytest.raises(DataError, match=f"{man.shards[0].url} sample {key}: missing tokens.npy"):
        _all(ShardStream(root, seq_len=L, seed=0))
    samples = _members(path)
    npy, _ = encode_sample(np.array([11, VOCAB + 5], dtype=np.uint16), {})
    samples[1] = (key, {"tokens.npy": npy, "meta.json": b"{}"})
    _rewrite(path, samples)
    with pytest.raises(DataError, match=f"sample {key}: token id {VOCAB + 5} outside vocab"):
        _all(ShardStream(root, seq_len=L, seed=0))


def test_manifest_mismatch_and_missing_files(copy, tmp_path):
    root, _ = copy
    index = os.path.join(root, "index.json")
    d = json.load(open(index))
    d["shards"][0]["docs"] -= 1
    json.dump(d, open(index, "w"))
    with pytest.raises(DataError, match="manifest says"):
        _all(ShardStream(root, seq_len=L, seed=0, skip_corrupt=True))  # never skippable
    with pytest.raises(DataError, match="not found"):
        ShardStream(str(tmp_path / "nowhere" / "index.json"), seq_len=L)
    d["shards"][0]["url"] = "missing.tar"
    json.dump(d, open(index, "w"))
    with pytest.raises(DataError, match="missing.tar: file not found"):
        _all(ShardStream(root, seq_len=L, seed=0))
    del d["special_tokens"]["mask"]
    json.dump(d, open(index, "w"))
    with pytest.raises(DataError, match="mask"):
        Manifest.load(root)


def test_urls_and_pipe_match_manifest(synthetic):
    man, _ = synthetic
    m = Manifest.load(man)
    urls = [m.shard_url(i) for i in range(len(m.shards))]
    ref = _all(ShardStream(m, seq_len=L, seed=2))
    plain = _all(ShardStream(urls, seq_len=L, seed=2, vocab_size=m.vocab_size, eod_token_id=2, pad_token_id=3))
    piped = _all(ShardStream([f"pipe:cat {u}" for u in urls], seq_len=L, seed=2, vocab_size=m.vocab_size,
                             eod_token_id=2, pad_token_id=3, num_workers=1))
    assert all(torch.equal(a, b) for a, b in zip(ref, plain)) and len(ref) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(ref, piped)) and len(ref) == len(piped)
    pattern = os.path.join(os.path.dirname(urls[0]), "shard-{000000..%06d}.tar" % (len(urls) - 1))
    braced = _all(ShardStream(pattern, seq_len=L, seed=2, vocab_size=m.vocab_size, eod_token_id=2, pad_token_id=3))
    assert len(braced) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, braced))
    with pytest.raises(ValueError, match="eod_token_id"):
        ShardStream(urls, seq_len=L, vocab_size=m.vocab_size)


def test_truncated_local_shard_found_before_the_first_window(copy):
    root, _ = copy
    man = Manifest.load(root)
    bad = man.shards[4]
    path = os.path.join(root, bad.url)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 1000])
    # the constructor (built before the model in the trainer) fails; no window was read
    with pytest.raises(DataError, match=rf"{bad.url}: {len(data) - 1000} bytes on disk but the manifest records "
                                        rf"{bad.bytes} bytes"):
        ShardStream(root, seq_len=L, seed=0)
    os.remove(os.path.join(root, man.shards[0].url))
    with pytest.raises(DataError, match=f"{man.shards[0].url}: file not found"):
        ShardStream(root, seq_len=L, seed=0, skip_corrupt=True)  # a missing shard is never skippable


def test_manifest_without_sizes_and_pipe_urls_are_checked_when_read(copy):
    root, _ = copy
    index = os.path.join(root, "index.json")
    d = json.load(open(index))
    for s in d["shards"]:
        del s["bytes"]  # a manifest written before sizes were recorded
    json.dump(d, open(index, "w"))
    path = os.path.join(root, d["shards"][1]["url"])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    s = ShardStream(root, seq_len=L, seed=0, lanes=1)  # builds: nothing to compare against
    with pytest.raises(DataError, match=d["shards"][1]["url"]):
        _all(s)
    m = Manifest.load(root)
    piped = [f"pipe:cat {m.shard_url(i)}" for i in range(len(m.shards))]
    m.shards = [dataclasses.replace(info, url=u, bytes=info.bytes or 10 ** 9) for info, u in zip(m.shards, piped)]
    s = ShardStream(m, seq_len=L, seed=0, lanes=1)  # remote: no stat, the read-time check stays
    with pytest.raises(DataError, match="shard-000001.tar: holds 2 docs"):
        _all(s)
