"""The faults nobody causes (docs/FAULTS.md, "Faults survived: weeks-long runs"): a loss spike rolled back or
skipped with its windows recorded, a rerun telling hardware from data, a hang caught by the watchdog, a straggler
named, a checkpoint save that fails on a full disk. Each run is the real launch/pretrain.py on the tiny config.

The faults are injected by tests/train/fault_plugin/sitecustomize.py (a fault hook the test puts on the ranks'
PYTHONPATH; megatrain has no fault switch) and by the test's own shards: a poisoned document of a token the data
never holds, whose loss the hook multiplies (a tiny model cannot be confidently wrong enough for a natural spike).

Run: PYTHONPATH=. python -m pytest -q tests/train/test_faults.py
"""
import json
import os
import resource
import shutil
import time

import numpy as np
import pytest

from megatrain.data import ShardStream
from megatrain.data.build import write_shards as write_shard_folder
from megatrain.data.shards import doc_key
from megatrain.train.checkpoint import load_rank_file, read_latest, tag_for, verify
from megatrain.train.metrics import read_metrics
from megatrain.train.trainer import EXIT_HARDWARE, EXIT_REQUEUE
from tests.dist_util import launch_pretrain, tail_logs, wait_all
from tests.tiny_data import SPECIALS, TINY, VOCAB, make_docs
from tests.train.test_resume import checkpoint_differences, kill_all

POISON = 5  # not a content id (tests/tiny_data.py: FIRST = 8)
PLUGIN = os.path.join(os.path.dirname(__file__), "fault_plugin", "sitecustomize.py")
# a short history, and a wide threshold: the tiny model's loss wobbles by ~1% once it learns; the hook's x10 does not
STABLE = ["logging.tensorboard=false", "data.lanes=1", "train.spike.window=16", "train.spike.min_history=4",
          "train.spike.grad_norm=false", "train.spike.sigma=40"]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> str:
    """The tiny corpus plus one document of 64 POISON tokens."""
    out = str(tmp_path_factory.mktemp("poisoned"))
    docs = make_docs(60, 0)
    docs.insert(30, np.full(64, POISON))
    write_shard_folder(out, ((doc_key(i), d.astype(np.int64), {"doc": i}) for i, d in enumerate(docs)), 2000,
                       VOCAB, SPECIALS)
    return os.path.join(out, "index.json")


def poisoned_positions(shards: str, n: int = 200) -> list:
    """Global positions (32-token windows, lanes 1) whose window holds a row of >= 16 POISON tokens: what the hook
    scales."""
    s = ShardStream(shards, seq_len=32, seed=0, dp_rank=0, dp_size=1, lanes=1, loop=True, vocab_size=VOCAB)
    return [k for k, w in zip(range(n), s) if int((w["input_ids"] == POISON).sum()) >= 16]


def plugin(tmp_path, **fault) -> dict:
    d = tmp_path / f"plugin{len(os.listdir(tmp_path))}"
    d.mkdir()
    shutil.copy(PLUGIN, d / "sitecustomize.py")
    (d / "fault.json").write_text(json.dumps(fault))
    return {"PYTHONPATH": str(d)}


def run_args(d, shards, *extra):
    return ["--config", TINY, f"data.shards={shards}", f"run_dir={d}", *STABLE, *extra]


def loader_state(run, step):
    return load_rank_file(os.path.join(run, "checkpoints", tag_for(step), "trainer_rank00000.pt"))["loader"]


def trajectory(run) -> list:
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "tflops", "mfu", "rank_seconds")}
            for r in read_metrics(os.path.join(run, "metrics.jsonl"))]


ROLLBACK = ["train.max_steps=30", "checkpoint.every_steps=5", "train.spike.action=rollback",
            "train.spike.recheck=true", "parallel.zero_stage=1"]


@pytest.mark.slow
def test_spike_rolls_back_skips_the_windows_and_resumes_bitwise(tmp_path, poisoned):
    """1 rank, 2 windows per step; the poisoned windows are 43 and 44. Step 22 (windows 42, 43) spikes: the rerun
    gives the same loss (the data, not the hardware), the run returns to the checkpoint of step 20 and passes over
    windows [40, 44). The new step 21 reads windows 44, 45: a spike again, back to step 20 once more, and this time
    [40, 46) is passed over (everything handed out since that checkpoint). Both ranges are recorded by position in
    the loader state and metrics.jsonl; no poisoned window is trained on. A second run killed after the rollbacks
    and resumed ends bitwise equal to the first."""
    # the shuffle puts the poisoned document at windows 42-44 (43 and 44 hold >= 16 poisoned tokens; the next epoch
    # has it again, past this run)
    assert [p for p in poisoned_positions(poisoned) if p < 100] == [43, 44]
    a = tmp_path / "a"
    a.mkdir()
    env = plugin(tmp_path, poison={"token": POISON, "scale": 10})
    wait_all(launch_pretrain(run_args(a, poisoned, *ROLLBACK), 1, str(a), env=env), 300, str(a))
    log = open(a / "rank0.log").read()
    assert "recheck: step 22 loss" in log and "the rerun gave the same losses on every rank: the data" in log
    assert "spike: step 22 loss" in log and "windows [40, 44) (tokens [1280, 1408)) skipped; rollback 1 of" in log
    assert "spike: step 21 loss" in log and "windows [40, 46) (tokens [1280, 1472)) skipped; rollback 2 of" in log
    events = [r for r in read_metrics(os.path.join(a, "metrics.jsonl")) if r.get("event")]
    assert [(e["event"], e["step"], e["skipped_windows"], e["spike"]["step"]) for e in events] == \
        [("rollback", 20, [40, 44], 22), ("rollback", 20, [40, 46], 21)]
    assert [r["step"] for r in trajectory(a) if not r.get("event")] == list(range(1, 31))
    state = loader_state(a, 30)
    assert state["skipped_windows"] == [
        {"positions": [40, 44], "tokens": [1280, 1408], "reason": "rollback", "spike_step": 22, "from_step": 20},
        {"positions": [40, 46], "tokens": [1280, 1472], "reason": "rollback", "spike_step": 21, "from_step": 20}]
    assert state["position"] == 2 * 30 + 6  # 30 steps trained, 6 windows passed over
    back = 20

    # the same run, killed -9 two steps after its rollback (a checkpoint after it exists), resumed
    b = tmp_path / "b"
    b.mkdir()
    procs = launch_pretrain(run_args(b, poisoned, *ROLLBACK), 1, str(b), env=env)
    t0 = time.time()
    while True:
        lines = read_metrics(os.path.join(b, "metrics.jsonl")) if os.path.exists(b / "metrics.jsonl") else []
        after = [r for r in lines[[i for i, r in enumerate(lines) if r.get("event")][0]:]] \
            if any(r.get("event") for r in lines) else []
        if any(r.get("step", 0) >= back + 7 for r in after):
            break
        assert procs[0].poll() is None and time.time() - t0 < 200, tail_logs(str(b))
        time.sleep(0.02)
    kill_all(procs)
    wait_all(launch_pretrain(run_args(b, poisoned, *ROLLBACK), 1, str(b), env=env), 300, str(b))
    assert trajectory(b) == trajectory(a)
    assert checkpoint_differences(str(a / "checkpoints"), str(b / "checkpoints"), tag_for(30)) == []


@pytest.mark.slow
def test_rollback_skips_more_steps_past_the_spike(tmp_path, poisoned):
    """train.spike.skip_steps_past=2: the windows of the two steps after the spike go too (the PaLM recipe's wider
    skip), so step 21 no longer meets window 44: one rollback, [40, 48) passed over."""
    d = tmp_path / "run"
    d.mkdir()
    wait_all(launch_pretrain(run_args(d, poisoned, *ROLLBACK, "train.spike.skip_steps_past=2"), 1, str(d),
                             env=plugin(tmp_path, poison={"token": POISON, "scale": 10})), 300, str(d))
    events = [r for r in read_metrics(os.path.join(d, "metrics.jsonl")) if r.get("event")]
    assert [(e["step"], e["skipped_windows"], e["spike"]["step"]) for e in events] == [(20, [40, 48], 22)]
    assert loader_state(d, 30)["position"] == 2 * 30 + 8


@pytest.mark.slow
def test_spike_skip_withholds_the_update_on_two_ranks(tmp_path, poisoned):
    """DP 2 (4 windows per step), action skip: the poisoned steps' updates are withheld on the device (the engine
    counts skipped steps, the LR holds), their windows recorded; every step logs both ranks' times."""
    poison = poisoned_positions(poisoned)
    steps = sorted({p // 4 + 1 for p in poison if p < 4 * 16})
    d = tmp_path / "run"
    d.mkdir()
    wait_all(launch_pretrain(run_args(d, poisoned, "train.max_steps=16", "checkpoint.every_steps=16",
                                      "train.spike.action=skip", "parallel.zero_stage=1"), 2, str(d),
                             env=plugin(tmp_path, poison={"token": POISON, "scale": 10})), 300, str(d))
    m = read_metrics(os.path.join(d, "metrics.jsonl"))
    withheld = [r["step"] for r in m if r.get("withheld")]
    assert withheld == steps and all(len(r["rank_seconds"]) == 2 for r in m)
    for r in m:
        if r.get("withheld"):
            assert r["spike"]["signal"] == "loss" and r["skipped_windows"] == [4 * (r["step"] - 1), 4 * r["step"]]
    assert m[-1]["skipped_steps"] == len(steps) and "nonfinite" not in json.dumps(m)
    by_step = {r["step"]: r for r in m}
    assert all(by_step[s + 1]["lr"] == by_step[s]["lr"] for s in steps)  # the schedule held its position
    state = loader_state(d, 16)
    assert [s["positions"] for s in state["skipped_windows"]] == [[4 * (s - 1), 4 * s] for s in steps]
    assert "spike: step" in open(d / "rank0.log").read()


@pytest.mark.slow
def test_withheld_update_under_bf16_zero3(tmp_path, poisoned):
    """The NaN-scaled backward is withheld by DeepSpeed's own optimizer paths too (bf16, ZeRO-3: its overflow
    check): skipped and counted, and the next steps' losses are finite (the weights were not touched)."""
    d = tmp_path / "run"
    d.mkdir()
    wait_all(launch_pretrain(run_args(d, poisoned, "train.max_steps=24", "checkpoint.every_steps=24",
                                      "train.spike.action=skip", "train.precision=bf16", "parallel.zero_stage=3"),
                             1, str(d), env=plugin(tmp_path, poison={"token": POISON, "scale": 10})), 300, str(d))
    m = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert [r["step"] for r in m if r.get("withheld")] == [22, 23]
    assert m[-1]["skipped_steps"] == 2 and all(r["loss"] is not None and r["loss"] < 5 for r in m[23:])


@pytest.mark.slow
def test_a_step_that_differs_on_rerun_is_hardware(tmp_path, tiny_shards):
    """Rank 1's forward of step 8 goes wrong once (the hook scales its loss: not reproducible). The rerun from the
    same state differs on rank 1 only: exit EXIT_HARDWARE on every rank, one line naming rank 1 and its host."""
    d = tmp_path / "run"
    d.mkdir()
    procs = launch_pretrain(run_args(d, tiny_shards, "train.max_steps=12", "checkpoint.every_steps=4",
                                     "train.spike.action=skip", "train.spike.recheck=true"), 2, str(d),
                            env=plugin(tmp_path, corrupt={"rank": 1, "call": 8, "scale": 10}))
    wait_all(procs, 300, str(d), expect=EXIT_HARDWARE)
    log = open(d / "rank0.log").read()
    errors = [line for line in log.splitlines() if line.startswith("pretrain: error:")]
    assert len(errors) == 1 and "step 8 loss" in errors[0] and "rank 1 (host " in errors[0], log
    assert "rank 0 (host" not in errors[0] and "suspect hardware" in errors[0]
    assert "Traceback" not in log and not open(d / "rank1.log").read().count("pretrain: error:")
    assert read_latest(str(d / "checkpoints")) == tag_for(4)


@pytest.mark.slow
def test_hang_dumps_every_rank_and_requeues_and_a_straggler_is_named(tmp_path, tiny_shards):
    """Rank 1 is slow in every forward (a straggler: named in a warning after 3 steps), then sleeps inside step 10
    (a hang): both watchdogs write their stacks to run_dir/hangs/10/, rank 0 names rank 1 as the slowest, both
    exit 75; resume=auto then finishes the run."""
    d = tmp_path / "run"
    d.mkdir()
    args = run_args(d, tiny_shards, "train.max_steps=12", "checkpoint.every_steps=4", "train.step_timeout_s=5",
                    "train.straggler_steps=3", "train.straggler_factor=1.5")
    procs = launch_pretrain(args, 2, str(d), env=plugin(tmp_path, sleep={"rank": 1, "call": 10, "seconds": 300,
                                                                           "every": 0.4}))
    t0 = time.time()
    wait_all(procs, 120, str(d), expect=EXIT_REQUEUE)
    assert time.time() - t0 < 100
    log = open(d / "rank0.log").read()
    assert "straggler: rank 1 (host " in log and log.count("straggler:") == 1
    hang = [line for line in log.splitlines() if "megatrain: hang:" in line]
    assert len(hang) == 1 and "step 10 (step)" in hang[0] and "slowest rank 1 (host" in hang[0], log
    stacks = {r: open(d / "hangs" / "10" / f"rank{r}.txt").read() for r in (0, 1)}
    assert "sitecustomize.py" in stacks[1] and "in sp_forward" in stacks[1]   # asleep in the hook
    assert "in train_step" in stacks[0] and "in sp_forward" not in stacks[0]  # waiting for rank 1
    m = read_metrics(os.path.join(d, "metrics.jsonl"))
    assert all(r["rank_seconds"][1] > r["rank_seconds"][0] for r in m)
    assert read_latest(str(d / "checkpoints")) == tag_for(8)
    wait_all(launch_pretrain(args, 2, str(d)), 300, str(d))  # requeued: continues from step 8, no fault now
    assert [r["step"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))] == list(range(1, 13))


@pytest.mark.slow
def test_failed_save_mid_run_exits_1_and_keeps_the_previous_checkpoint(tmp_path, tiny_shards):
    """A disk that fills (a file-size limit, RLIMIT_FSIZE, on the resumed run: its first save cannot write the model
    file) mid-run: one line, exit 1 (a failure while training, not bad input), `latest` and the previous checkpoint
    intact and verified by checksum."""
    d = tmp_path / "run"
    d.mkdir()
    args = run_args(d, tiny_shards, "checkpoint.every_steps=2", "parallel.zero_stage=1")
    wait_all(launch_pretrain(args + ["train.max_steps=4"], 1, str(d)), 300, str(d))
    limit = 100_000  # the model file is ~430 KB; the logs stay far below

    def disk_full():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    procs = launch_pretrain(args + ["train.max_steps=8"], 1, str(d), preexec_fn=disk_full)
    procs[0].wait(timeout=300)
    log = open(d / "rank0.log").read()
    errors = [line for line in log.splitlines() if line.startswith("pretrain: error:")]
    assert procs[0].returncode == 1, log
    assert len(errors) == 1 and "checkpoint save at step 6" in errors[0] and "file-size limit of 100000" in errors[0]
    assert errors[0].endswith(f"still names {tag_for(4)}") and "Traceback" not in log
    assert read_latest(str(d / "checkpoints")) == tag_for(4)
    assert verify(str(d / "checkpoints" / tag_for(4)), checksums=True) is None


# ---- the pieces, without a run ----
def test_spike_detector_robust_threshold_and_history():
    from megatrain.config import SpikeCfg
    from megatrain.train.faults import SpikeDetector
    det = SpikeDetector(SpikeCfg(window=8, min_history=4, sigma=6.0))
    for i, loss in enumerate([4.0, 3.9, 3.95, 3.85]):
        assert det.judge(i + 1, loss, 1.0, withheld=False) is None
    assert det.loss_threshold() == pytest.approx(3.925 + 6 * 1.4826 * 0.05)
    spike = det.judge(5, 9.0, 1.0, withheld=True)
    assert spike.signal == "loss" and spike.withheld and spike.step == 5 and len(det.losses) == 4  # not in history
    assert det.judge(6, 3.8, 50.0, withheld=False).signal == "grad_norm"
    assert det.judge(7, float("nan"), None, withheld=False) is None and len(det.losses) == 4  # non-finite: skipped
    state = det.state_dict()
    again = SpikeDetector(SpikeCfg(window=8, min_history=4))
    again.load_state_dict(state)
    assert again.loss_threshold() == det.loss_threshold()
    assert SpikeDetector(SpikeCfg(action="off")).judge(1, 1e9, 1e9, withheld=False) is None


def test_rollback_limit_counts_within_the_window():
    from megatrain.config import SpikeCfg
    from megatrain.train.faults import SpikeDetector
    det = SpikeDetector(SpikeCfg(max_rollbacks=2, rollback_window=100))
    det.rollbacks = [{"spike_step": 10}, {"spike_step": 150}]
    assert det.count_rollbacks(160) == 1 and det.count_rollbacks(105) == 2


def test_stragglers_named_once_until_they_recover():
    from megatrain.train.faults import Stragglers
    s = Stragglers(factor=1.5, steps=3)
    lines = [s.observe(i, [1.0, 1.0, 2.0], ["a", "b", "c"]) for i in range(1, 6)]
    assert lines[:2] == [None, None] and "rank 2 (host c)" in lines[2] and lines[3:] == [None, None]
    assert s.observe(6, [1.0, 1.0, 1.0]) is None  # recovered: named again if it falls behind again
    assert [s.observe(i, [1.0, 1.0, 2.0]) is not None for i in range(7, 10)] == [False, False, True]


def test_hang_line_names_the_least_progress_or_a_silent_rank():
    from megatrain.train.faults import hang_line
    reports = {0: {"rank": 0, "host": "a", "progress": 9}, 1: {"rank": 1, "host": "b", "progress": 7}}
    assert "slowest rank 1 (host b, progress 7" in hang_line(4, "step", 60, reports, 2, "/r/hangs/4")
    assert "rank 2 (no answer" in hang_line(4, "step", 60, reports, 3, "/r/hangs/4")


def test_metrics_rewind_keeps_rollback_lines_and_resume_drops_those_after_its_checkpoint(tmp_path):
    from megatrain.train.metrics import truncate_metrics
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 1}, {"step": 2}, {"step": 2, "event": "rollback"}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    truncate_metrics(str(path), 2, resume=False)  # a rollback to step 2: the earlier rollback line stays
    assert read_metrics(str(path)) == recs[:3]
    truncate_metrics(str(path), 2)  # a resume at step 2: the rollback line came after that checkpoint
    assert read_metrics(str(path)) == recs[:2]


def test_exit_codes_come_from_one_table():
    from megatrain.config import ConfigError
    from megatrain.data.shards import DataError
    from megatrain.train.checkpoint import CheckpointError
    from megatrain.train.faults import HardwareFault, SpikeAbort
    from megatrain.train.trainer import NonFiniteAbort, exit_code
    assert exit_code(CheckpointError("resume"), started=False) == (2, False)   # bad input before the first step
    assert exit_code(CheckpointError("save"), started=True) == (1, False)      # a failure while training
    assert exit_code(ConfigError("x"), started=False) == (2, False)
    assert exit_code(DataError("shard"), started=True) == (1, True)
    assert exit_code(NonFiniteAbort("x"), True) == exit_code(SpikeAbort("x"), True) == (1, False)
    assert exit_code(HardwareFault("x"), True) == (EXIT_HARDWARE, False)
    assert exit_code(RuntimeError("[pair.cc:537] Read error: Connection reset by peer"), True) == (EXIT_REQUEUE, True)
    assert exit_code(RuntimeError("a bug"), True) is None  # a crash keeps its traceback
