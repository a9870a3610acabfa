"""Checkpoint bookkeeping without processes: the atomic `latest` pointer, retention, resume resolution, and the
metrics file cut back on resume. (Saving/loading through DeepSpeed is exercised in test_resume.py.)

Run: PYTHONPATH=. python -m pytest -q tests/train/test_checkpoint.py
"""
import json
import os

import pytest

from megatrain.train.checkpoint import Checkpointer, read_latest, tag_for, write_latest
from megatrain.train.metrics import MetricsLogger, read_metrics, truncate_metrics


def test_latest_pointer(tmp_path):
    d = str(tmp_path)
    assert read_latest(d) is None
    os.makedirs(tmp_path / tag_for(4))
    write_latest(d, tag_for(4))
    (tmp_path / ".latest.tmp999").write_text("step000")  # debris of a crash mid-write is ignored
    assert read_latest(d) == "step00000004"
    write_latest(d, "step00000008")
    with pytest.raises(FileNotFoundError, match="names checkpoint 'step00000008', which does not exist"):
        read_latest(d)


def test_retention_keeps_last_n_and_latest(tmp_path):
    for s in (2, 4, 6, 8):
        os.makedirs(tmp_path / tag_for(s))
    ck = Checkpointer(str(tmp_path), keep_last=2, rank=0)
    ck._prune(keep=tag_for(8))
    assert sorted(os.listdir(tmp_path)) == [tag_for(6), tag_for(8)]
    os.makedirs(tmp_path / tag_for(10))  # an incomplete newer save must not push out the one `latest` names
    ck.keep_last = 1
    ck._prune(keep=tag_for(8))
    assert sorted(os.listdir(tmp_path)) == [tag_for(8)]


def test_resolve(tmp_path):
    ck = Checkpointer(str(tmp_path / "ckpt"), keep_last=2, rank=0)
    assert ck.resolve("auto") is None and ck.resolve("none") is None
    os.makedirs(tmp_path / "ckpt" / tag_for(3))
    write_latest(str(tmp_path / "ckpt"), tag_for(3))
    assert ck.resolve("auto") == (str(tmp_path / "ckpt"), tag_for(3))
    assert ck.resolve("none") is None
    assert ck.resolve(str(tmp_path / "ckpt" / tag_for(3)) + "/") == (str(tmp_path / "ckpt"), tag_for(3))
    with pytest.raises(FileNotFoundError, match="checkpoint.resume="):
        ck.resolve(str(tmp_path / "nope"))


def test_metrics_truncated_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    truncate_metrics(str(path), 4)
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4]
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, resume_step=2, print_every=100)
    log.log({"step": 3, "loss": 0.5, "lr": 1e-3, "grad_norm": None, "tokens": 9, "tokens_per_s": 1.0,
             "skipped_steps": 0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, resume_step=0).close()  # fresh run: empty
    assert read_metrics(str(path)) == []
