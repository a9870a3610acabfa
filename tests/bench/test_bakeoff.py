"""The bake-off harness end to end (preset cpu-tiny) and launch/evaluate.py on a transformers Llama folder.

Run: PYTHONPATH=. python -m pytest -q tests/bench/test_bakeoff.py
"""
import json
import math
import os

import pytest
import torch

from tests.data.conftest import corpus_dir, tokenizer_dir  # noqa: F401  (the same session fixtures)
from tests.dist_util import ROOT


def _evaluate_cli():
    """launch/evaluate.py as a module (launch/ is a folder of scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "launch", "evaluate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus_dir, tokenizer_dir):  # noqa: F811
    """Three plays, one held out (long documents: the 4x windows and the position bins are filled)."""
    from data_tools import build_shards
    out = tmp_path_factory.mktemp("bakeoff") / "shards"
    build_shards.main(["--input", os.path.join(corpus_dir, "*.txt"), "--tokenizer", tokenizer_dir, "--out", str(out),
                       "--heldout-docs", "1", "--workers", "1"])
    return str(out)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, shards, tokenizer_dir):  # noqa: F811
    from bench import bakeoff
    out = str(tmp_path_factory.mktemp("sweep") / "bakeoff-tiny")
    argv = ["--data", shards, "--archs", "mega,llama,megalodon", "--preset", "cpu-tiny", "--seeds", "2",
            "--tokenizer", tokenizer_dir, "--out", out]
    assert bakeoff.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, argv, json.load(f)


def test_tiny_sweep_runs_every_arch_and_writes_the_report(tiny_sweep):
    out, _, res = tiny_sweep
    assert set(res["best"]) == {"mega", "llama", "megalodon"}
    names = sorted(r["name"] for r in res["runs"])
    # phase 1: 2 LRs x 2 initializer ranges for MEGA, 2 LRs for the Llama and for Megalodon (its own init);
    # phase 2: the best of each at seed 1
    assert len([n for n in names if n.startswith("mega-") and n.endswith("-s0")]) == 4
    assert len([n for n in names if n.startswith("llama") and n.endswith("-s0")]) == 2
    assert len([n for n in names if n.startswith("megalodon") and n.endswith("-s0")]) == 2
    assert len([n for n in names if n.endswith("-s1")]) == 3
    L = res["fixed"]["seq_len"]
    for arch, row in res["best"].items():
        assert set(row["by_length"]) == {str(L), str(2 * L), str(4 * L)}
        for n, ms in row["by_length"].items():
            assert ms["loss"]["n"] == 2 and math.isfinite(ms["loss"]["mean"]) and ms["bpb"]["mean"] > 0
        assert set(row["by_position"]) == {str(L), str(2 * L), str(4 * L)}
        assert row["by_position"][str(4 * L)][-1]["tokens"] > 0     # the last bin of the longest length is filled
        assert {c["length"] for c in row["passkey"]} == {L, 2 * L, 4 * L}
        curve = [r for r in res["runs"] if r["name"] == f"{arch}-lr{row['lr']:g}"
                 + ("" if row["init_range"] is None else f"-init{row['init_range']:g}") + "-s0"][0]["curve"]
        assert curve[-1]["loss"] < curve[0]["loss"] + 0.5 and curve[-1]["loss"] < math.log(400)  # it learned
    for f in ("README.md", "loss_curve.png", "loss_by_position.png", "passkey.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    readme = open(os.path.join(out, "README.md")).read()
    assert "| mega |" in readme and "| llama |" in readme and "| megalodon |" in readme and "Same tokens" in readme


def test_parameters_are_matched(tiny_sweep):
    _, _, res = tiny_sweep
    mega, llama = res["best"]["mega"]["non_embedding_params"], res["best"]["llama"]["non_embedding_params"]
    assert abs(llama - mega) <= 0.05 * mega, (mega, llama)
    megalodon = res["best"]["megalodon"]["non_embedding_params"]
    assert abs(megalodon - mega) <= 0.05 * mega, (mega, megalodon)
    # the count is the model's own: every parameter but the tied [V, D] embedding
    from bench.bakeoff_archs import llama_non_embedding
    cfg = [r for r in res["runs"] if r["spec"]["arch"] == "llama"][0]["config"]
    assert llama == llama_non_embedding(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"])


def test_every_arch_reads_the_same_windows(tiny_sweep):
    _, _, res = tiny_sweep
    for seed in (0, 1):
        digests = {r["stream_sha256"] for r in res["runs"] if r["spec"]["seed"] == seed}
        archs = {r["spec"]["arch"] for r in res["runs"] if r["spec"]["seed"] == seed}
        assert len(digests) == 1 and archs == {"mega", "llama", "megalodon"}
    from bench.bakeoff import check_same_streams
    bad = [dict(res["runs"][0], stream_sha256="0" * 64)] + res["runs"][1:]
    with pytest.raises(RuntimeError, match="different token streams"):
        check_same_streams(bad)


def test_a_finished_sweep_resumes_without_training(tiny_sweep, monkeypatch):
    from bench import bakeoff
    out, argv, res = tiny_sweep
    monkeypatch.setattr(bakeoff, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(bakeoff, "eval_run", lambda *a, **k: pytest.fail("a finished run was evaluated again"))
    assert bakeoff.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)
    assert again["best"] == res["best"]


def test_a_sweep_with_other_settings_is_refused(tiny_sweep, capsys):
    from bench import bakeoff
    out, argv, _ = tiny_sweep
    assert bakeoff.main(argv + ["--lrs", "1e-3,2e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other lrs" in err and "--out" in err


def _llama_folder(path, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # a trained-looking model: not the near-uniform init
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model.eval()


def test_evaluate_a_transformers_llama_folder_equals_a_hand_computation(shards, tmp_path, tokenizer_dir):  # noqa: F811
    """launch/evaluate.py SOURCE=a Llama folder: the loss of megatrain's held-out windows, computed by hand with
    plain transformers forwards, one document piece at a time (no mask at all: documents cannot see each other)."""
    evaluate = _evaluate_cli()
    from megatrain.data.shards import Manifest
    from megatrain.eval.heldout import load_heldout
    held = os.path.join(shards, "heldout", "index.json")
    vocab = Manifest.load(held).vocab_size
    model = _llama_folder(tmp_path / "llama", vocab)
    out = tmp_path / "res.json"
    assert evaluate.main([str(tmp_path / "llama"), "--shards", held, "--seq-len", "64,128", "--tokens", "512",
                          "--positions", "--out", str(out), "--plot", str(tmp_path / "plots")]) == 0
    res = json.load(open(out))
    for row in res["rows"]:
        w = load_heldout(held, row["seq_len"], 512, vocab_size=vocab)
        total, n = 0.0, 0
        with torch.no_grad():
            for ids, labels, docs in zip(w.input_ids, w.labels, w.doc_ids):
                for d in docs.unique():
                    sel = docs == d
                    logits = model(input_ids=ids[sel][None]).logits[0].float()
                    lab = labels[sel]
                    keep = lab != -100
                    total += float(torch.nn.functional.cross_entropy(logits[keep], lab[keep], reduction="sum"))
                    n += int(keep.sum())
        assert row["tokens"] == n
        assert row["loss"] == pytest.approx(total / n, rel=1e-5, abs=1e-5)
        bins = res["by_position"][str(row["seq_len"])]
        assert sum(b["tokens"] for b in bins) == n
        assert sum(b["loss"] * b["tokens"] for b in bins if b["tokens"]) / n == pytest.approx(total / n, rel=1e-5)
    assert os.path.getsize(tmp_path / "plots" / "loss_by_position.png") > 0


def test_evaluate_refuses_sequence_parallelism_for_a_transformers_model(shards, tmp_path, capsys):
    evaluate = _evaluate_cli()
    from megatrain.data.shards import Manifest
    held = os.path.join(shards, "heldout", "index.json")
    _llama_folder(tmp_path / "llama", Manifest.load(held).vocab_size)
    assert evaluate.main([str(tmp_path / "llama"), "--shards", held, "--sp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sp 2" in err and "transformers" in err


def test_run_default_initializer_range_is_width_scaled():
    from megatrain.config import ModelCfg, load_config
    from megatrain.model import MegaConfig
    assert MegaConfig().initializer_range == 0.02                   # transformers' default, for its configs
    assert ModelCfg(hidden_size=64).initializer_range == 64 ** -0.5  # a run's default
    assert ModelCfg(hidden_size=64, initializer_range=0.02).initializer_range == 0.02
    cfg = load_config(None, ["model.hidden_size=256"])
    assert cfg.model.initializer_range == 256 ** -0.5                # of the final width, after the overrides


def test_the_run_defaults_leave_the_unigram_plateau(shards):
    """The fix of issue #24: a small causal MEGA built from a run's model defaults (ModelCfg: only its shape given)
    learns from context on real text within 120 short steps; with transformers' initializer_range 0.02 the same
    run stays above the held-out text's own unigram entropy (the plateau the issue found)."""
    from bench import bakeoff
    from megatrain.eval.heldout import load_heldout
    preset = dict(shape=dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, shared_representation_size=32,
                             nffn_hidden_size=128, ema_projection_size=8, chunk_size=32),
                  seq_len=128, windows_per_step=2, curve_points=1, curve_tokens=4096, device="cpu")
    held = load_heldout(os.path.join(shards, "heldout", "index.json"), 128, 4096)
    counts = torch.bincount(held.labels[held.labels != -100]).double()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())      # a lower bound of any context-free model's held-out loss

    def final(init_range):
        rec = bakeoff.train_run(bakeoff.RunSpec("mega", 3e-3, init_range, 0), shards, preset, 128, 120 * 256, {},
                                None, log=lambda s: None)
        return rec["curve"][-1]["loss"]
    assert final(None) < unigram - 0.25
    assert final(0.02) > unigram
