"""Tokenizer (lossless, HF-equal ids, errors) and the shard tools end to end on real plays.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_tools.py
"""
import gzip
import hashlib
import json
import os

import pytest
import torch

from data_tools import build_shards, inspect_shards
from megatrain.data import DataError, Manifest, ShardStream
from megatrain.data.tokenizer import (TokenizerConfig, _training_lines, load_tokenizer, special_token_ids,
                                      train_tokenizer)

TRICKY = ["Hello  world\n\n\tx", "  leading and trailing  ", "emoji 😀🚀 ok", "def f(x):\n    return x  \n",
          "e\u0301 ﬁ Ｆ ß 中文 العربية", "\r\n\r\n", "   ", "<mask> <s> </s> <pad>", "\x00\x07 control", "a" * 3000]


def test_lossless_roundtrip_and_specials(tokenizer_dir):
    sp = load_tokenizer(tokenizer_dir)
    assert sp.vocab_size() == 400
    ids = special_token_ids(sp)
    assert ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "mask": 4, "eod": 2}
    for s in TRICKY:
        enc = sp.encode(s)
        assert sp.decode(enc) == s, repr(s)
        assert ids["mask"] not in enc and ids["bos"] not in enc  # text never produces special ids


def test_hf_tokenizer_gives_sentencepiece_ids(tokenizer_dir, corpus_dir):
    from transformers import AutoTokenizer

    sp = load_tokenizer(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (hf.mask_token_id, hf.pad_token_id, hf.eos_token_id) == (4, 3, 2)
    play = open(os.path.join(corpus_dir, sorted(os.listdir(corpus_dir))[0])).read()[:20000]
    for s in TRICKY + [play]:
        assert hf(s, add_special_tokens=False)["input_ids"] == sp.encode(s), repr(s[:40])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100 too small"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size=5000 does not fit"):
        train_tokenizer(["tiny corpus"], TokenizerConfig(vocab_size=5000), str(tmp_path))
    many_chars = "".join(chr(0x4E00 + i) for i in range(600))  # more distinct characters than 300 ids hold
    with pytest.raises(ValueError, match="vocab_size=300 does not fit"):
        train_tokenizer([many_chars * 3], TokenizerConfig(vocab_size=300), str(tmp_path))
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", "\n"], TokenizerConfig(vocab_size=300), str(tmp_path))
    with pytest.raises(ValueError, match="matches no files"):
        build_shards.main(["--input", str(tmp_path / "*.none"), "--tokenizer", str(tmp_path), "--out", str(tmp_path)])


def test_text_inputs(tmp_path):
    from megatrain.data.text import TextConfig, expand_inputs, iter_documents

    (tmp_path / "a.jsonl").write_bytes(b'{"body": "one"}\n\n{"body": "t\xe9"}\n')
    (tmp_path / "b.txt").write_bytes(b"whole \xff file\n")
    files = expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt")])
    stats = {}
    docs = list(iter_documents(files, TextConfig(text_field="body", invalid_utf8="reject"), stats))
    assert [d[2] for d in docs] == ["one"] and stats["invalid_utf8"] == 2
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'text'"):
        list(iter_documents(files, TextConfig(), {}))
    (tmp_path / "c.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: invalid JSON"):
        list(iter_documents([str(tmp_path / "c.jsonl")], TextConfig(), {}))
    with pytest.raises(ValueError, match="no input files"):
        expand_inputs([])
    with pytest.raises(ValueError, match="not a readable file"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="invalid_utf8"):
        TextConfig(invalid_utf8="ignore")


def test_long_lines_are_split_for_training():
    line = "abcdé" * 10  # 60 bytes, multi-byte characters
    pieces = list(_training_lines([line + "\nshort"], max_bytes=16))
    assert pieces[-1] == "short"
    assert all(len(p.encode()) <= 16 for p in pieces)
    assert sum(len(p) for p in pieces[:-1]) >= len(line) - 4  # a cut may drop at most part of one character


def _sha(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


def test_build_shards_end_to_end(tokenizer_dir, corpus_dir, tmp_path, capsys):
    extra = tmp_path / "extra.jsonl.gz"
    with gzip.open(extra, "wb") as f:
        f.write(json.dumps({"text": "short doc\twith tab"}).encode() + b"\n")
        f.write(json.dumps({"text": ""}).encode() + b"\n")
        f.write(b'{"text": "bad \xff byte"}\n')
    inputs = ["--input", os.path.join(corpus_dir, "*.txt"), str(extra), "--tokenizer", tokenizer_dir]
    out, again = tmp_path / "a", tmp_path / "b"
    build_shards.main(inputs + ["--out", str(out), "--shard-size", "150KB", "--workers", "2"])
    printed = capsys.readouterr().out
    assert "MB/s" in printed and "empty documents: 1" in printed and "invalid UTF-8 documents (replaced): 1" in printed
    man = Manifest.load(str(out))
    assert man.docs == 3 + 2 and len(man.shards) >= 3 and man.vocab_size == 400
    assert man.stats["empty"] == 1 and man.stats["invalid_utf8"] == 1
    assert man.special_tokens["mask"] == 4 and man.dtype == "uint16"
    build_shards.main(inputs + ["--out", str(again), "--shard-size", "150KB", "--workers", "1"])
    assert _sha(out) == _sha(again), "same inputs must give the same bytes"
    build_shards.main(inputs + ["--out", str(again), "--shard-size", "10MB"])  # re-run replaces the old build
    assert sorted(os.listdir(again)) == ["index.json", "shard-000000.tar"]

    # Windows of one epoch decode back to the original documents.
    sp = load_tokenizer(tokenizer_dir)
    stream = ShardStream(str(out), seq_len=512, seed=0, lanes=1)  # one lane: windows in stream order
    assert stream.vocab_size == 400 and stream.special_tokens["eod"] == 2
    flat = torch.cat([s["input_ids"] for s in stream]).tolist()
    texts = {open(os.path.join(corpus_dir, f)).read() for f in os.listdir(corpus_dir)}
    texts |= {"short doc\twith tab", "bad \ufffd byte"}
    pieces = [sp.decode(p) for p in _split_at(flat, 2)]
    assert all(p in texts for p in pieces[:-1]) and len(pieces) >= len(texts) - 1
    assert any(t.startswith(pieces[-1]) for t in texts)

    build_shards.main(inputs + ["--out", str(again), "--invalid-utf8", "reject"])
    assert Manifest.load(str(again)).docs == 4

    inspect_shards.main([str(out), "--tokenizer", tokenizer_dir])
    report = capsys.readouterr().out
    assert f"total: {len(man.shards)} shards, 5 documents, {man.tokens} tokens" in report
    assert "document length (tokens)" in report and "sample 0000000000" in report
    other = tmp_path / "other_tok"
    train_tokenizer(sorted(texts), TokenizerConfig(vocab_size=350), str(other))
    with pytest.raises(DataError, match="not the one these shards were built with"):
        inspect_shards.main([str(out), "--tokenizer", str(other)])


def _split_at(ids, sep):
    cur = []
    for t in ids:
        if t == sep:
            yield cur
            cur = []
        else:
            cur.append(t)
    if cur:
        yield cur
