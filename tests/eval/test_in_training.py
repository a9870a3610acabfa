"""Held-out evaluation inside training runs: the same numbers under SP=1, SP=2 + ZeRO-1 and SP=2 + ZeRO-3 (1e-6),
longer than the training length, metrics.jsonl records + TensorBoard scalars + a console line, the standalone
evaluator on the run folder (one process and 2 ranks with SP 2) agreeing with the last in-training evaluation, and
kill -9 + resume with evaluation on giving the run without evaluation bit for bit.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_in_training.py        (slow: several 1-2 rank runs)
"""
import json
import os
import subprocess
import sys
import time

import pytest

from megatrain.data.shards import Manifest
from megatrain.train.checkpoint import read_latest, tag_for
from megatrain.train.metrics import read_metrics
from tests.dist_util import ROOT, free_port, launch_pretrain, pretrain_env, rank_env, wait_all
from tests.tiny_data import FIRST, TINY, VOCAB, write_shards
from tests.train.test_resume import checkpoint_differences, kill_all, run_until

EVALUATE = os.path.join(ROOT, "launch", "evaluate.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(training manifest, held-out manifest): tiny synthetic documents; the held-out one with a token-bytes table
    (content ids 1 byte, specials 0) so that bits per byte is defined."""
    d = tmp_path_factory.mktemp("eval_shards")
    train = write_shards(str(d / "train"), 60, seed=0)
    held = write_shards(str(d / "held"), 24, seed=7)
    man = Manifest.load(held)
    man.token_bytes = [0] * FIRST + [1] * (VOCAB - FIRST)
    man.save(held)
    return train, held


def _args(d, shards, *extra):
    train, held = shards
    return ["--config", TINY, f"data.shards={train}", f"run_dir={d}", "train.max_steps=2", "train.warmup_steps=0",
            f"eval.shards={held}", "eval.every_steps=1", "eval.seq_len=64", "eval.tokens=320",
            "checkpoint.every_steps=100", *extra]


def _evals(d):
    return [r for r in read_metrics(os.path.join(d, "metrics.jsonl")) if "eval_loss" in r]


@pytest.mark.slow
def test_eval_in_training_under_layouts(tmp_path, shards):
    runs = {"sp1": (1, []), "sp2_zero3": (2, ["parallel.sequence_parallel_size=2", "parallel.zero_stage=3"]),
            "sp2_zero1": (2, ["parallel.sequence_parallel_size=2", "parallel.zero_stage=1"])}
    procs = {}
    for name, (world, extra) in runs.items():
        d = tmp_path / name
        d.mkdir()
        tb = [] if name == "sp2_zero1" else ["logging.tensorboard=false"]
        procs[name] = launch_pretrain(_args(d, shards, *extra, *tb), world, str(d))
        if name == "sp2_zero3":  # at most 3 processes at once on a small machine
            wait_all(procs["sp1"], 600, str(tmp_path / "sp1"))
    for name, p in procs.items():
        wait_all(p, 600, str(tmp_path / name))
    ref = _evals(tmp_path / "sp1")
    assert [r["step"] for r in ref] == [1, 2] and ref[0]["eval_tokens"] == 320  # 5 windows of 64
    assert set(ref[0]) == {"step", "eval_loss", "eval_ppl", "eval_bpb", "eval_tokens", "eval_seconds"}
    assert ref[0]["eval_bpb"] is not None and ref[0]["eval_bpb"] > ref[0]["eval_loss"] / 0.6931471805599453
    for name in ("sp2_zero3", "sp2_zero1"):
        got = _evals(tmp_path / name)
        assert [r["step"] for r in got] == [1, 2]
        for g, r in zip(got, ref):
            assert g["eval_tokens"] == r["eval_tokens"]
            for k in ("eval_loss", "eval_ppl", "eval_bpb"):
                assert g[k] == pytest.approx(r[k], rel=1e-6), (name, k)
    log = open(tmp_path / "sp2_zero1" / "rank0.log").read()
    assert log.count("eval step 2 | loss ") == 1 and "| bpb " in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "sp2_zero1" / "tensorboard"))
    acc.Reload()
    for tag in ("eval/loss", "eval/ppl", "eval/bpb"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(ref[-1]["eval_loss"], rel=1e-6)

    # the standalone evaluator on the run folder: the last in-training evaluation, again (1 rank, then 2 with SP 2)
    held = shards[1]
    for world in (1, 2):
        out = tmp_path / f"standalone{world}.json"
        port = free_port()
        cmd = [sys.executable, EVALUATE, str(tmp_path / "sp1"), "--shards", held, "--seq-len", "64",
               "--tokens", "320", "--out", str(out), "--sp", str(world)]
        ps = [subprocess.Popen(cmd, cwd=ROOT, env=pretrain_env(rank_env(r, world, port) if world > 1 else {}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        for p in ps:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
        row = json.load(open(out))["rows"][0]
        assert row["tokens"] == ref[-1]["eval_tokens"]
        assert row["loss"] == pytest.approx(ref[-1]["eval_loss"], rel=1e-6)
        assert row["bpb"] == pytest.approx(ref[-1]["eval_bpb"], rel=1e-6)


@pytest.mark.slow
def test_kill9_resume_with_eval_is_bitwise_and_undisturbed(tmp_path, shards):
    """2 ranks, SP 2, ZeRO 1; evaluation every 2 steps. Killed with -9 after step 5 (its last checkpoint at 4) and
    resumed: the training records and the final checkpoint equal a run *without* evaluation, bit for bit; each
    evaluation step is recorded once."""
    steps = ["train.max_steps=6", "checkpoint.every_steps=4", "train.warmup_steps=2",
             "parallel.sequence_parallel_size=2", "parallel.zero_stage=1", "logging.tensorboard=false"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    ref_args = [a for a in _args(ref_dir, shards, *steps) if not a.startswith("eval.")]
    run_args = [a for a in _args(run_dir, shards, *steps) if a != "eval.every_steps=1"] + ["eval.every_steps=2"]
    procs = launch_pretrain(run_args, 2, str(run_dir))
    run_until(procs, str(run_dir), 5)
    kill_all(procs)
    ref_procs = launch_pretrain(ref_args, 2, str(ref_dir))
    wait_all(launch_pretrain(run_args, 2, str(run_dir)), 600, str(run_dir))
    wait_all(ref_procs, 600, str(ref_dir))
    got = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    ref = read_metrics(os.path.join(ref_dir, "metrics.jsonl"))
    train_got = [r for r in got if "loss" in r]
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in train_got] == \
        [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in ref]
    assert [r["step"] for r in got if "eval_loss" in r] == [2, 4, 6]
    assert read_latest(str(run_dir / "checkpoints")) == tag_for(6)
    assert checkpoint_differences(str(ref_dir / "checkpoints"), str(run_dir / "checkpoints"), tag_for(6)) == []
