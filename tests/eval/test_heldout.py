"""The held-out split of data_tools/build_shards.py, the fixed evaluation windows, and bits per byte by hand.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_heldout.py
"""
import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from data_tools import build_shards
from megatrain.data.shards import Manifest, read_shard
from megatrain.data.tokenizer import load_tokenizer
from megatrain.eval.heldout import load_heldout, positions_in_document
from megatrain.eval.loss import evaluate_windows, position_bins
from megatrain.model import MegaConfig, MegaForCausalLM, MegalodonConfig, MegalodonForCausalLM


def _docs(folder):
    man = Manifest.load(folder)
    return [toks.tolist() for i in range(len(man.shards)) for _, toks in read_shard(man.shard_url(i), man.vocab_size)]


def _tree_sha(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(os.path.relpath(os.path.join(root, f), folder).encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_split_is_by_document_deterministic_and_records_bytes(split_shards, corpus_dir, tokenizer_dir, tmp_path):
    out, docs_file = split_shards
    sp = load_tokenizer(tokenizer_dir)
    train, held = Manifest.load(out), Manifest.load(os.path.join(out, "heldout"))
    texts = [json.loads(line)["text"] for line in open(docs_file)]
    texts += [open(os.path.join(corpus_dir, f)).read() for f in sorted(os.listdir(corpus_dir))]
    tr, he = [sp.decode(d) for d in _docs(out)], [sp.decode(d) for d in _docs(os.path.join(out, "heldout"))]
    assert sorted(tr + he) == sorted(texts)       # every document once ...
    assert not set(tr) & set(he) and he and tr     # ... on one side
    assert 0.1 < len(he) / len(texts) < 0.45       # ~25% held out
    # the rule: the hash of the document's text
    assert all(build_shards.doc_hash(t) < 0.25 for t in he) and all(build_shards.doc_hash(t) >= 0.25 for t in tr)
    assert train.split["part"] == "train" and held.split["part"] == "heldout"
    assert held.split["heldout_fraction"] == 0.25 and held.split["heldout_docs"] == len(he) == held.docs
    assert held.tokenizer_sha256 == train.tokenizer_sha256 != ""
    # UTF-8 bytes of every document, and the per-token table sums to them (what bits per byte relies on)
    for man, folder, side in ((train, out, tr), (held, os.path.join(out, "heldout"), he)):
        assert man.doc_bytes == [len(t.encode("utf-8")) for t in side]
        assert [sum(man.token_bytes[i] for i in d) for d in _docs(folder)] == man.doc_bytes
    # rebuilding (other thread count) gives identical bytes; --heldout-docs N holds out exactly N
    again = tmp_path / "again"
    build_shards.main(["--input", docs_file, os.path.join(corpus_dir, "*.txt"), "--tokenizer", tokenizer_dir,
                       "--out", str(again), "--shard-size", "20KB", "--heldout-fraction", "0.25", "--workers", "2"])
    assert _tree_sha(out) == _tree_sha(again)
    build_shards.main(["--input", docs_file, "--tokenizer", tokenizer_dir, "--out", str(again),
                       "--heldout-docs", "5"])  # replaces the earlier build (heldout/ included)
    h5 = [sp.decode(d) for d in _docs(os.path.join(again, "heldout"))]
    smallest = sorted(texts[:40], key=build_shards.doc_hash)[:5]
    assert sorted(h5) == sorted(smallest) and Manifest.load(again).docs == 35


def test_other_tokenizer_is_refused(split_shards, tmp_path):
    out, _ = split_shards
    other = tmp_path / "other"
    os.makedirs(other)
    man = Manifest.load(os.path.join(out, "heldout"))
    man.tokenizer_sha256 = "0" * 64
    man.shards = [type(s)(url=os.path.join(out, "heldout", s.url), docs=s.docs, tokens=s.tokens, bytes=s.bytes)
                  for s in man.shards]
    man.save(str(other / "index.json"))
    with pytest.raises(ValueError, match=r"eval.shards=.*tokenizer sha256 000000000000.*must share one tokenizer"):
        load_heldout(str(other), 64, 256, train_data=os.path.join(out, "index.json"))
    load_heldout(os.path.join(out, "heldout"), 64, 256, train_data=os.path.join(out, "index.json"))  # same: fine


def test_windows_are_fixed_and_positions_count_from_the_document_start(split_shards):
    held_dir = os.path.join(split_shards[0], "heldout")
    a = load_heldout(held_dir, 64, 640)
    b = load_heldout(held_dir, 64, 640)
    assert a.num_windows == 10 and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.labels[:, :-1], a.input_ids[:, 1:])  # clm: the next token
    doc = torch.tensor([[5, 5, 5, 6, 6, 7, 7, 7]])
    assert positions_in_document(doc).tolist() == [[1, 2, 3, 1, 2, 1, 2, 3]]
    assert position_bins(64) == [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 65)]


def _tiny_model(vocab, family="mega"):
    torch.manual_seed(0)
    if family == "megalodon":
        return MegalodonForCausalLM(MegalodonConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            shared_representation_size=16, intermediate_size=32, nffn_hidden_size=64, cema_ndim=4, chunk_size=16,
            norm_num_groups=4)).eval()
    cfg = MegaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                     ema_projection_size=4, shared_representation_size=16, nffn_hidden_size=64, use_chunking=True,
                     chunk_size=16, max_positions=64, is_decoder=True, bidirectional=False, initializer_range=0.3,
                     dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     nffn_activation_dropout_prob=0.0)
    return MegaForCausalLM(cfg).eval()


def test_bits_per_byte_by_hand(split_shards, tokenizer_dir):
    """bpb = summed loss / ln 2 / the bytes the target tokens decode to, computed here from full logits and the
    tokenizer's decode; the position bins sum back to the total."""
    held_dir = os.path.join(split_shards[0], "heldout")
    sp = load_tokenizer(tokenizer_dir)
    model = _tiny_model(sp.vocab_size())
    held = load_heldout(held_dir, 64, 64 * 6)
    loss_sum, nbytes, ntok = 0.0, 0, 0
    with torch.no_grad():
        for w in range(held.num_windows):
            ids, lab = held.input_ids[w:w + 1], held.labels[w]
            logits = model(ids, doc_ids=held.doc_ids[w:w + 1]).logits[0].double()
            loss_sum += float(-F.log_softmax(logits, -1).gather(1, lab[:, None]).sum())
            nbytes += len(sp.decode(lab.tolist()).encode("utf-8"))  # the control EOD decodes to nothing
            ntok += lab.numel()
    bpb = loss_sum / math.log(2) / nbytes
    for positions in (False, True):
        r = evaluate_windows(model, held, micro_batch_size=2, positions=positions)
        s = r.summary()
        assert s["tokens"] == ntok and r.bytes == nbytes
        assert s["bpb"] == pytest.approx(bpb, rel=1e-6) and s["loss"] == pytest.approx(loss_sum / ntok, rel=1e-6)
        assert s["ppl"] == pytest.approx(math.exp(loss_sum / ntok), rel=1e-6)
    bins = r.by_position()
    assert sum(b["tokens"] for b in bins) == ntok
    assert sum(b["loss"] * b["tokens"] for b in bins if b["tokens"]) == pytest.approx(r.loss_sum, rel=1e-9)
    assert bins[0]["tokens"] > 0 and bins[-1]["lo"] == 32
