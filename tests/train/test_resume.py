"""Faults and resume: kill -9 at random moments + ``checkpoint.resume=auto`` gives the uninterrupted run bitwise
(every tensor of the final checkpoint: weights, Adam moments, counters, loader and RNG states); a longer schedule on
resume is used from the first resumed step; a corrupt newest checkpoint falls back to the previous one; resume on a
different layout (world size, SP size) continues the trajectory; SIGTERM checkpoints and exits 75 (EXIT_REQUEUE) with steps to do, 0 when the run is done; non-finite steps
are skipped, counted, and abort the run after K in a row.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_resume.py
"""
import os
import random
import shutil
import signal
import time

import numpy as np
import torch

import pytest

from megatrain.train.checkpoint import read_latest, tag_for
from megatrain.train.metrics import read_metrics
from megatrain.train.trainer import EXIT_REQUEUE
from tests.tiny_data import TINY
from tests.dist_util import launch_pretrain, tail_logs, wait_all

# 2 ranks, SP 2, ZeRO 1: the checkpoint holds ZeRO optimizer shards and per-rank loader/RNG state
COMMON = ["parallel.sequence_parallel_size=2", "parallel.zero_stage=1", "logging.tensorboard=false",
          "checkpoint.keep_last=2"]


def args_for(d, shards, *extra, config=TINY):
    return ["--config", config, f"data.shards={shards}", f"run_dir={d}", *COMMON, *extra]


def args_1(d, shards, *extra, config=TINY):
    """One rank: no sequence parallelism."""
    return [a for a in args_for(d, shards, *extra, config=config)
            if not a.startswith("parallel.sequence_parallel_size")]


def last_step(d) -> int:
    path = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.endswith("}")]
    return int(lines[-1].split('"step": ')[1].split(",")[0]) if lines else 0


def run_until(procs, d, step, timeout=240):
    """Wait until metrics.jsonl shows `step`; the ranks must still be running (the kill lands mid-run)."""
    t0 = time.time()
    while last_step(d) < step:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"ranks ended before step {step}:\n{tail_logs(d)}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"no step {step} after {timeout}s:\n{tail_logs(d)}")
        time.sleep(0.02)


def differences(a, b, path="") -> list:
    """Paths where two loaded checkpoint objects differ (tensors bitwise, arrays, plain values)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, np.ndarray):
        return [] if np.array_equal(a, b) else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{path} (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float, str, bool, type(None))):
        return [] if a == b else [f"{path}: {a!r} != {b!r}"]
    return [] if repr(a) == repr(b) else [f"{path}: {a!r} != {b!r}"]  # e.g. DeepSpeed's loss-scaler object


def checkpoint_differences(dir_a, dir_b, tag) -> list:
    files = sorted(f for f in os.listdir(os.path.join(dir_a, tag)) if f.endswith(".pt"))
    assert files == sorted(f for f in os.listdir(os.path.join(dir_b, tag)) if f.endswith(".pt"))
    assert any("optim_states" in f for f in files)  # the ZeRO shards (Adam moments, fp32 master weights) are there
    return [f"{f}{d}" for f in files for d in differences(
        torch.load(os.path.join(dir_a, tag, f), weights_only=False),
        torch.load(os.path.join(dir_b, tag, f), weights_only=False))]


def kill_all(procs):
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert all(p.returncode == -signal.SIGKILL for p in procs)


@pytest.mark.slow
def test_kill9_at_random_moments_is_bitwise(tmp_path, tiny_shards):
    """2 ranks, SP 2, ZeRO-2: killed before the first checkpoint, in the middle of a checkpoint save, and at a
    random moment of a step; each time resumed with resume=auto. The final checkpoint equals the uninterrupted
    run's tensor by tensor, and so do the logged losses and grad norms."""
    steps = ["train.max_steps=12", "checkpoint.every_steps=4", "train.warmup_steps=3", "parallel.zero_stage=2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    ref_procs = launch_pretrain(args_for(ref_dir, tiny_shards, *steps), 2, str(ref_dir))
    rng = random.Random(int(os.environ.get("MEGATRAIN_KILL_SEED", "0")))
    ckpt = run_dir / "checkpoints"

    def relaunch():
        return launch_pretrain(args_for(run_dir, tiny_shards, *steps), 2, str(run_dir))

    procs = relaunch()  # 1. before the first checkpoint (step 4)
    run_until(procs, str(run_dir), 2)
    kill_all(procs)
    assert read_latest(str(ckpt)) is None if ckpt.exists() else True
    procs = relaunch()  # 2. during the save of step 8: its folder exists, its manifest does not yet
    t0 = time.time()
    while not (ckpt / tag_for(8)).exists():
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 240, tail_logs(str(run_dir))
        time.sleep(0.002)
    kill_all(procs)
    procs = relaunch()  # 3. a random moment of a step after the one just resumed from
    run_until(procs, str(run_dir), rng.randint(5, 10))
    time.sleep(rng.uniform(0.0, 0.5))
    kill_all(procs)
    wait_all(relaunch(), 300, str(run_dir))
    wait_all(ref_procs, 300, str(ref_dir))

    got, ref = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (run_dir, ref_dir))
    assert [r["step"] for r in got] == list(range(1, 13))  # lines after the last checkpoint were replaced
    assert [(r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in got] == \
        [(r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in ref]  # bitwise: == on floats
    assert read_latest(str(ckpt)) == tag_for(12)
    assert checkpoint_differences(str(ref_dir / "checkpoints"), str(ckpt), tag_for(12)) == []
    assert sorted(x for x in os.listdir(ckpt) if x.startswith("step")) == [tag_for(8), tag_for(12)]  # keep_last=2


@pytest.mark.slow
def test_longer_schedule_on_resume(tmp_path, tiny_shards):
    """Stop at step 3 (the end of a 3-step run), resume with train.max_steps=6: steps 4..6 equal a run configured
    for 6 steps from the start (warmup 3 makes the first 3 steps identical), and the log says what changed."""
    common = ["train.warmup_steps=3", "parallel.zero_stage=1", "checkpoint.every_steps=100"]
    short, full = tmp_path / "short", tmp_path / "full"
    short.mkdir(), full.mkdir()
    ref_procs = launch_pretrain(args_1(full, tiny_shards, *common, "train.max_steps=6"), 1, str(full))
    wait_all(launch_pretrain(args_1(short, tiny_shards, *common, "train.max_steps=3"), 1, str(short)), 300,
             str(short))
    wait_all(launch_pretrain(args_1(short, tiny_shards, *common, "train.max_steps=6"), 1, str(short)), 300,
             str(short))
    wait_all(ref_procs, 300, str(full))
    got, ref = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (short, full))
    assert [(r["step"], r["lr"], r["loss"], r["grad_norm"]) for r in got] == \
        [(r["step"], r["lr"], r["loss"], r["grad_norm"]) for r in ref]
    assert got[3]["lr"] == pytest.approx(3e-3)  # not the old schedule's final 3e-4
    log = open(short / "rank0.log").read()
    assert log.count("train.max_steps 3 -> 6 (schedule recomputed from the config)") == 1
    assert checkpoint_differences(str(full / "checkpoints"), str(short / "checkpoints"), tag_for(6)) == []


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(tmp_path, tiny_shards):
    """Truncate a file of the newest checkpoint: resume=auto warns, naming the file, and resumes from the previous
    one (the redone steps equal the first attempt's bitwise); with no complete checkpoint left the run stops with
    one line and exit 1."""
    d = tmp_path / "run"
    d.mkdir()
    args = args_1(d, tiny_shards, "train.max_steps=4", "checkpoint.every_steps=2", "parallel.zero_stage=1")
    wait_all(launch_pretrain(args, 1, str(d)), 300, str(d))
    first = read_metrics(os.path.join(d, "metrics.jsonl"))
    shard = d / "checkpoints" / tag_for(4) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(1000)
    wait_all(launch_pretrain(args_1(d, tiny_shards, "train.max_steps=5", "checkpoint.every_steps=2",
                                    "parallel.zero_stage=1"), 1, str(d)), 300, str(d))
    log = open(d / "rank0.log").read()
    assert (f"resume: warning: checkpoint {d}/checkpoints/{tag_for(4)} skipped: "
            f"zero_pp_rank_0_mp_rank_00_optim_states.pt has 1000 bytes") in log
    assert f"resume: from {d}/checkpoints/{tag_for(2)}" in log
    again = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in again[:4]] == [r["loss"] for r in first]  # step 4's lr: same schedule position
    assert read_latest(str(d / "checkpoints")) == tag_for(5)
    for t in os.listdir(d / "checkpoints"):  # nothing complete left
        if t.startswith("step"):
            os.remove(d / "checkpoints" / t / "mp_rank_00_model_states.pt")
    procs = launch_pretrain(args, 1, str(d))
    procs[0].wait(timeout=200)
    err = [line for line in open(d / "rank0.log").read().splitlines() if line.startswith("pretrain: error:")]
    assert procs[0].returncode == 2 and len(err) == 1  # like any bad input: exit 2
    assert "no complete checkpoint in" in err[0] and "checkpoint.resume=none" in err[0]


ELASTIC = ["train.max_steps=6", "train.warmup_steps=2", "checkpoint.every_steps=3", "parallel.zero_stage=2",
           "checkpoint.keep_last=5"]


def _resume_from_step3(ref, run) -> None:
    """A new run folder holding only the reference run's step-3 checkpoint and metrics: a job stopped at step 3."""
    (run / "checkpoints").mkdir()
    shutil.copytree(ref / "checkpoints" / tag_for(3), run / "checkpoints" / tag_for(3))
    (run / "checkpoints" / "latest").write_text(tag_for(3))
    shutil.copy(ref / "metrics.jsonl", run / "metrics.jsonl")


def _assert_steps_4_on_equal(run, ref) -> None:
    got, want = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (run, ref))
    assert [r["step"] for r in got] == list(range(1, 7))
    for g, w in zip(got[3:], want[3:]):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5) and g["lr"] == w["lr"]


@pytest.mark.slow
def test_elastic_resume_on_another_world_and_sp_size(tmp_path, tiny_shards):
    """2 ranks (SP 2, ZeRO-2, so the ZeRO shards are split two ways) -> stop at step 3 -> resume on 1 rank (SP 1):
    DeepSpeed's universal checkpoint carries the weights and Adam moments over; steps 4..6 equal the uninterrupted
    2-rank run (≤ 1e-5 relative; SP 1 vs 2 sums in another order)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    wait_all(launch_pretrain(args_for(ref, tiny_shards, *ELASTIC), 2, str(ref)), 300, str(ref))
    _resume_from_step3(ref, run)
    wait_all(launch_pretrain(args_1(run, tiny_shards, *ELASTIC), 1, str(run)), 300, str(run))
    log = open(run / "rank0.log").read()
    assert "layout world_size 2 -> 1, sp_size 2 -> 1 (model/optimizer via DeepSpeed universal checkpoint" in log
    assert "RNG states not carried over" in log
    _assert_steps_4_on_equal(run, ref)
    assert os.path.isdir(run / "checkpoints" / tag_for(3) / "universal")  # converted once, kept with its tag


@pytest.mark.slow
def test_elastic_resume_dp2_to_1_rank_with_accumulation(tmp_path, tiny_shards):
    """DP 2 -> stop at step 3 -> 1 rank with grad_accum_steps=2 (same global batch): steps 4.. equal the
    uninterrupted DP 2 run (≤ 1e-5 rel)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    wait_all(launch_pretrain(args_1(ref, tiny_shards, *ELASTIC), 2, str(ref)), 300, str(ref))
    _resume_from_step3(ref, run)
    wait_all(launch_pretrain(args_1(run, tiny_shards, *ELASTIC, "train.grad_accum_steps=2"), 1, str(run)), 300, str(run))
    _assert_steps_4_on_equal(run, ref)


@pytest.mark.slow
def test_sigterm_saves_and_exits_for_requeue(tmp_path, tiny_shards):
    d = tmp_path / "run"
    d.mkdir()
    procs = launch_pretrain(args_for(d, tiny_shards, "train.max_steps=100000", "checkpoint.every_steps=1000"),
                            2, str(d))
    run_until(procs, str(d), 3)
    procs[1].send_signal(signal.SIGTERM)  # one rank only (as a scheduler might): both must stop together
    wait_all(procs, 120, str(d), expect=EXIT_REQUEUE)  # steps still to do: run me again
    step = last_step(d)
    assert 3 <= step < 1000
    assert read_latest(str(d / "checkpoints")) == f"step{step:08d}"
    assert f"stop signal: checkpoint at step {step} saved; {100000 - step} steps to do: exiting 75" in \
        open(d / "rank0.log").read()


@pytest.mark.slow
@pytest.mark.parametrize("max_steps,code", [(1, 0), (2, EXIT_REQUEUE)])
def test_signal_during_startup_stops_after_step_one(tmp_path, tiny_shards, max_steps, code):
    """A signal that arrives while the job starts (after main() installed the handlers: the banner line) stops it
    after step 1: a run that is then done exits 0 (a scheduler must not requeue it), one with steps to do 75."""
    d = tmp_path / "run"
    d.mkdir()
    procs = launch_pretrain(["--config", TINY, f"data.shards={tiny_shards}", f"run_dir={d}",
                             f"train.max_steps={max_steps}", "train.warmup_steps=0", "logging.tensorboard=false"],
                            1, str(d))
    t0 = time.time()
    while "megatrain: launcher=" not in open(d / "rank0.log").read():
        assert procs[0].poll() is None and time.time() - t0 < 120, tail_logs(d)
        time.sleep(0.02)
    procs[0].send_signal(signal.SIGUSR1)
    wait_all(procs, 120, str(d), expect=code)
    assert last_step(d) == 1 and read_latest(str(d / "checkpoints")) == "step00000001"
    assert ("the run is complete" if code == 0 else "1 steps to do: exiting 75") in open(d / "rank0.log").read()


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_abort(tmp_path, tiny_shards):
    """An absurd learning rate blows the weights up: the non-finite steps are skipped and counted, and the run
    stops with a clear message after train.max_consecutive_nonfinite of them."""
    d = tmp_path / "run"
    d.mkdir()
    procs = launch_pretrain(["--config", TINY, f"data.shards={tiny_shards}", f"run_dir={d}", "train.lr=1e30",
                             "train.grad_clip=0", "train.warmup_steps=0", "train.lr_schedule=constant",
                             "train.max_steps=50", "train.max_consecutive_nonfinite=3",
                             "logging.tensorboard=false"], 1, str(d))
    procs[0].wait(timeout=200)
    log = open(d / "rank0.log").read()
    assert procs[0].returncode == 1
    assert "consecutive steps with non-finite loss/gradient" in log and "max_consecutive_nonfinite=3" in log
    m = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert m[-1]["skipped_steps"] == 3 and m[-1]["step"] < 50
    assert m[0]["skipped_steps"] == 0
