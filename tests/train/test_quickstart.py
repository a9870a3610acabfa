"""The README's main job, shortened: examples/quickstart.py on 3 plays for 6 steps (2 CPU ranks, SP 2), then
export and sample. Run: PYTHONPATH=. python -m pytest -q tests/train/test_quickstart.py
"""
import os
import subprocess
import sys

import pytest

from tests.dist_util import ROOT, pretrain_env


@pytest.mark.slow
def test_quickstart_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--out", str(tmp_path), "--plays", "3",
           "--steps", "6"]
    p = subprocess.run(cmd, cwd=ROOT, env=pretrain_env(), capture_output=True, text=True, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "launcher=env world=2 backend=gloo sp=2" in out          # the deepspeed launcher, 2 ranks, SP 2
    assert "loss: step 1 " in out and "-> step 6 " in out
    assert os.path.exists(tmp_path / "hf" / "config.json") and os.path.exists(tmp_path / "hf" / "tokenizer.model")
    assert "verified: logits and tokenizer ids match" in out
    sample = p.stdout.split("== 6. held-out evaluation and sample")[1]
    assert len(sample.strip().splitlines()) >= 2                    # the loss line and generated text
    # held-out numbers during training (the last step) and after it, and the position plot in the run folder
    assert "held-out during training (step 6, " in out and "ppl " in out and "bpb " in out
    assert "held-out at 256 tokens: ppl " in out and "held-out at 1024 tokens: ppl " in out
    assert open(tmp_path / "train" / "eval" / "loss_by_position.png", "rb").read(4) == b"\x89PNG"
    # a second run skips every finished step
    again = subprocess.run(cmd, cwd=ROOT, env=pretrain_env(), capture_output=True, text=True, timeout=200)
    assert again.returncode == 0 and again.stdout.count("(outputs exist: skipped)") == 5, again.stdout[-3000:]
