"""launch/evaluate.py on a transformers-format folder: its loss equals transformers 4.57's own loss on the same
windows (native load, <= 1e-5 relative); the JSON rows, position bins (summing back to the total), passkey rows and
the PNGs. A Megalodon export as SOURCE: its loss equals the loss of the folder's own transformers model
(trust_remote_code) on the same windows.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_evaluate_cli.py
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatrain.hf import save_hf
from megatrain.data.tokenizer import load_tokenizer
from megatrain.eval.heldout import load_heldout
from tests.dist_util import ROOT, pretrain_env
from tests.eval.test_heldout import _tiny_model

EVALUATE = os.path.join(ROOT, "launch", "evaluate.py")


def test_export_loss_equals_transformers(split_shards, tokenizer_dir, tmp_path):
    from transformers import MegaForCausalLM as HFMegaForCausalLM
    held_dir = os.path.join(split_shards[0], "heldout")
    model = _tiny_model(load_tokenizer(tokenizer_dir).vocab_size())
    hf_dir = save_hf(model, tmp_path / "hf")
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, EVALUATE, str(hf_dir), "--shards", held_dir, "--seq-len", "64,128",
                        "--tokens", "640", "--micro-batch-size", "2", "--no-doc-reset", "--positions", "--passkey",
                        "--passkey-lengths", "128", "--passkey-trials", "2", "--tokenizer", tokenizer_dir,
                        "--out", str(out), "--plot", str(tmp_path / "plots")],
                       cwd=ROOT, env=pretrain_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seq_len 64 | loss" in p.stdout and "held-out" in p.stderr  # the progress bar
    res = json.load(open(out))
    hf = HFMegaForCausalLM.from_pretrained(hf_dir).eval()  # transformers' own MEGA, natively
    for row in res["rows"]:
        L = row["seq_len"]
        held = load_heldout(held_dir, L, 640)
        with torch.no_grad():
            logits = hf(input_ids=held.input_ids).logits.double()
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held.labels.reshape(-1),
                                                 reduction="sum").item()
        assert row["tokens"] == held.labels.numel()
        assert row["loss"] == pytest.approx(want / row["tokens"], rel=1e-5)
        assert row["bpb"] > 0 and row["ppl"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)
        bins = res["by_position"][str(L)]
        assert sum(b["tokens"] for b in bins) == row["tokens"]
        assert sum(b["loss"] * b["tokens"] for b in bins if b["tokens"]) == pytest.approx(row["loss"] * row["tokens"],
                                                                                          rel=1e-9)
    assert [(r["length"], r["depth"], r["trials"]) for r in res["passkey"]] == \
        [(128, d, 2) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res["passkey"])
    for png in ("loss_by_position.png", "passkey.png"):
        assert open(tmp_path / "plots" / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_megalodon_export_loss_equals_its_transformers_model(split_shards, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatrain.hf.remote_code import save_remote
    from megatrain.model import MegalodonConfig, build_model
    held_dir = os.path.join(split_shards[0], "heldout")
    torch.manual_seed(0)
    model = build_model(MegalodonConfig(vocab_size=load_tokenizer(tokenizer_dir).vocab_size(), hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, shared_representation_size=16,
                                        intermediate_size=32, nffn_hidden_size=64, cema_ndim=4, chunk_size=16,
                                        norm_num_groups=4)).eval()
    save_remote(model, str(tmp_path / "hf"))
    out = tmp_path / "res.json"
    p = subprocess.run([sys.executable, EVALUATE, str(tmp_path / "hf"), "--shards", held_dir, "--seq-len", "64",
                        "--tokens", "256", "--no-doc-reset", "--out", str(out)],
                       cwd=ROOT, env=pretrain_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    row, = json.load(open(out))["rows"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    held = load_heldout(held_dir, 64, 256)
    with torch.no_grad():
        logits = hf(input_ids=held.input_ids).logits.double()  # a plain forward: no document resets
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held.labels.reshape(-1),
                                             reduction="sum").item()
    assert row["tokens"] == held.labels.numel()
    assert row["loss"] == pytest.approx(want / row["tokens"], rel=1e-5)
