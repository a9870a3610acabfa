"""Per-source held-out evaluation (config eval.sources, megatrain/eval/in_training.py): each source on its own
windows, equal to evaluating its manifest alone; the total is the token-weighted one; the console line names each
source; bad eval.sources are one line naming the key.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_eval_sources.py        (~5 s, in-process)
"""
import math
from types import SimpleNamespace

import pytest
import torch

from megatrain.config import ConfigError, load_config
from megatrain.data.shards import Manifest
from megatrain.eval.heldout import load_heldout
from megatrain.eval.in_training import TrainingEval, eval_line
from megatrain.eval.loss import evaluate_windows
from megatrain.model import build_model
from tests.tiny_data import FIRST, TINY, VOCAB, write_shards

SHA = "ab" * 32
ONE_RANK = SimpleNamespace(sp_group=None, sp_rank=0, sp_size=1, dp_rank=0, dp_size=1)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_sources")
    out = {"train": write_shards(str(d / "train"), 30, seed=0)}
    for name, seed, nbytes in (("train", 0, 0), ("web", 7, 1), ("books", 9, 2)):  # bytes per token differ: bpb
        out[name] = out.get(name) or write_shards(str(d / name), 16, seed=seed)
        man = Manifest.load(out[name])
        man.tokenizer_sha256 = SHA  # one tokenizer for all (the check compares them)
        if nbytes:
            man.token_bytes = [0] * FIRST + [nbytes] * (VOCAB - FIRST)
        man.save(out[name])
    return out


def _cfg(sets, *extra):
    return load_config(TINY, [f"data.shards={sets['train']}", "eval.every_steps=1", "eval.seq_len=64",
                              "eval.tokens=192", *extra])


def _model():
    torch.manual_seed(0)
    m = build_model(load_config(TINY).model).eval()
    m.device = torch.device("cpu")  # what the trainer's engine offers
    return m


def test_each_source_equals_its_manifest_alone_and_the_total_is_token_weighted(sets):
    cfg = _cfg(sets, f"eval.sources=[{{name: web, shards: {sets['web']}}}, {{name: books, shards: {sets['books']}}}]")
    cfg.validate(check_files=True)
    ev = TrainingEval.build(cfg, ONE_RANK)
    model = _model()
    rec = ev.run(model, 3)
    alone = {n: evaluate_windows(model, load_heldout(sets[n], 64, 192), 2) for n in ("web", "books")}
    for n, r in alone.items():
        s = r.summary()
        assert rec[f"eval/{n}/tokens"] == s["tokens"] > 0
        for k in ("loss", "ppl", "bpb"):
            assert rec[f"eval/{n}/{k}"] == pytest.approx(s[k], rel=1e-6), (n, k)
    assert rec["eval/web/bpb"] != pytest.approx(rec["eval/books/bpb"], rel=1e-2)
    loss_sum = sum(r.loss_sum for r in alone.values())
    tokens = sum(r.tokens for r in alone.values())
    assert rec["eval_tokens"] == tokens
    assert rec["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-6)
    assert rec["eval_bpb"] == pytest.approx(loss_sum / math.log(2) / sum(r.bytes for r in alone.values()), rel=1e-6)
    line = eval_line(rec)
    assert f"| web {rec['eval/web/loss']:.4f}" in line and f"| books {rec['eval/books/loss']:.4f}" in line
    # one manifest (eval.shards): the record has no per-source keys
    one = TrainingEval.build(_cfg(sets, f"eval.shards={sets['web']}"), ONE_RANK).run(model, 3)
    assert not [k for k in one if k.startswith("eval/")]
    assert one["eval_loss"] == pytest.approx(rec["eval/web/loss"], rel=1e-6)


@pytest.mark.parametrize("extra, key", [
    (["eval.sources=[{name: a, shards: X}, {name: a, shards: Y}]"], "eval.sources[1].name"),
    (["eval.sources=[{name: a, shards: X, weight: 2}]"], "eval.sources[0].weight"),
    (["eval.sources=[{name: a, shards: X}]", "eval.shards=X"], "eval.shards"),
    (["eval.sources=[{name: a, shards: /no/such/dir}]"], "eval.sources[0].shards"),
])
def test_bad_eval_sources_name_the_key(sets, extra, key):
    with pytest.raises(ConfigError, match=r"^" + key.replace("[", r"\[").replace("]", r"\]")):
        _cfg(sets, *[e.replace("X", sets["web"]).replace("Y", sets["books"]) for e in extra]).validate(
            check_files=True)


def test_a_source_with_another_tokenizer_names_its_key(sets, tmp_path):
    other = write_shards(str(tmp_path / "other"), 16, seed=3)
    man = Manifest.load(other)
    man.tokenizer_sha256 = "0" * 64
    man.save(other)
    cfg = _cfg(sets, f"eval.sources=[{{name: web, shards: {sets['web']}}}, {{name: x, shards: {other}}}]")
    with pytest.raises(ValueError, match=r"eval\.sources\[1\]\.shards"):
        TrainingEval.build(cfg, ONE_RANK)
