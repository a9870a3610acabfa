"""Faults: kill -9 at several steps + ``checkpoint.resume=auto`` gives the uninterrupted loss trajectory bitwise;
SIGTERM checkpoints and exits 75 (EXIT_REQUEUE) with steps to do, 0 when the run is done; non-finite steps are
skipped, counted, and abort the run after K in a row.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_resume.py
"""
import os
import signal
import time

import pytest

from megatrain.train.checkpoint import read_latest
from megatrain.train.metrics import read_metrics
from megatrain.train.trainer import EXIT_REQUEUE
from tests.tiny_data import TINY
from tests.dist_util import launch_pretrain, tail_logs, wait_all

# 2 ranks, SP 2, ZeRO 1: the checkpoint holds ZeRO optimizer shards and per-rank loader/RNG state
COMMON = ["parallel.sequence_parallel_size=2", "parallel.zero_stage=1", "logging.tensorboard=false",
          "checkpoint.keep_last=2"]


def args_for(d, shards, *extra):
    return ["--config", TINY, f"data.shards={shards}", f"run_dir={d}", *COMMON, *extra]


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


@pytest.mark.slow
def test_kill9_and_resume_is_bitwise(tmp_path, tiny_shards):
    steps = ["train.max_steps=24", "checkpoint.every_steps=4", "train.warmup_steps=3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    wait_all(launch_pretrain(args_for(ref_dir, tiny_shards, *steps), 2, str(ref_dir)), 300, str(ref_dir))
    ref = read_metrics(os.path.join(ref_dir, "metrics.jsonl"))

    killed_at = []
    for target in (6, 15):  # kill -9 somewhere after these steps, possibly in the middle of a checkpoint save
        procs = launch_pretrain(args_for(run_dir, tiny_shards, *steps), 2, str(run_dir))
        run_until(procs, str(run_dir), target)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        killed_at.append(last_step(run_dir))
        assert all(p.returncode == -signal.SIGKILL for p in procs)
    wait_all(launch_pretrain(args_for(run_dir, tiny_shards, *steps), 2, str(run_dir)), 300, str(run_dir))
    got = read_metrics(os.path.join(run_dir, "metrics.jsonl"))

    assert killed_at[0] < 24 and killed_at[1] < 24
    assert [r["step"] for r in got] == list(range(1, 25))  # lines after the last checkpoint were replaced
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bitwise: == on floats
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    ckpts = sorted(x for x in os.listdir(run_dir / "checkpoints") if x.startswith("step"))
    assert ckpts == ["step00000020", "step00000024"]  # keep_last=2
    assert read_latest(str(run_dir / "checkpoints")) == "step00000024"


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
