"""A rank killed with -9 in the middle of a step (docs/FAULTS.md): under `torchrun --max-restarts 1` the agent
restarts the workers, which resume from `latest` and end with the uninterrupted run's final checkpoint, tensor by
tensor; under the deepspeed launcher the job ends at once (the survivor's next collective fails: it says so and
exits 75, the launcher stops), not in a hang, and the next start (what a requeue does) finishes the run.
(The same under Slurm: tests/train/test_slurm_cluster.py.)

Run: PYTHONPATH=. python -m pytest -q tests/train/test_lost_rank.py
"""
import os
import signal
import subprocess
import time

import psutil
import pytest

from megatrain.train.checkpoint import read_latest, tag_for
from megatrain.train.metrics import read_metrics
from tests.dist_util import PRETRAIN, ROOT, free_port, launch_pretrain, pretrain_env, wait_all
from tests.tiny_data import TINY
from tests.train.test_resume import checkpoint_differences, last_step

pytestmark = pytest.mark.slow

STEPS = ["train.max_steps=12", "checkpoint.every_steps=4", "parallel.zero_stage=1", "logging.tensorboard=false",
         "checkpoint.keep_last=5"]


def args(d, shards):
    return ["--config", TINY, f"data.shards={shards}", f"run_dir={d}", *STEPS]


def launcher_env():
    env = pretrain_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the launcher provides them
    return env


def worker(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> psutil.Process:
    """The launcher's worker process of ``rank`` (found by the RANK its launcher gave it)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if "pretrain.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                    return p
            except psutil.Error:
                pass
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


def kill_mid_run(launcher, d, after_step: int) -> None:
    t0 = time.time()
    while last_step(d) < after_step:
        assert launcher.poll() is None and time.time() - t0 < 200, open(d / "launcher.log").read()[-3000:]
        time.sleep(0.02)
    worker(launcher, 1).send_signal(signal.SIGKILL)


def test_torchrun_restarts_the_workers_and_the_run_ends_bitwise(tmp_path, tiny_shards):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    ref_procs = launch_pretrain(args(ref, tiny_shards), 2, str(ref))
    log = open(run / "launcher.log", "wb")
    # the c10d rendezvous (what --standalone uses): each restart rendezvouses afresh (the static one keeps the first
    # round's store, and the restarted ranks would read the dead ranks' addresses from it)
    agent = subprocess.Popen(["torchrun", "--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"127.0.0.1:{free_port()}", PRETRAIN, *args(run, tiny_shards)],
                             cwd=ROOT, env=launcher_env(),
                             stdout=log, stderr=subprocess.STDOUT)
    kill_mid_run(agent, run, 6)
    assert agent.wait(timeout=300) == 0, open(run / "launcher.log").read()[-4000:]
    wait_all(ref_procs, 300, str(ref))
    out = open(run / "launcher.log").read()
    assert "resume: from" in out and "a peer rank is gone or stuck: exiting 75" in out
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == list(range(1, 13))
    assert checkpoint_differences(str(ref / "checkpoints"), str(run / "checkpoints"), tag_for(12)) == []


def test_deepspeed_launcher_ends_instead_of_hanging(tmp_path, tiny_shards):
    run = tmp_path / "run"
    run.mkdir()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN, *args(run, tiny_shards)]
    log = open(run / "launcher.log", "wb")
    ds = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT)
    kill_mid_run(ds, run, 5)
    t0 = time.time()
    code = ds.wait(timeout=120)
    assert code != 0 and time.time() - t0 < 60
    assert read_latest(str(run / "checkpoints")) == tag_for(4)
    ds = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert ds.returncode == 0, ds.stdout[-3000:] + ds.stderr[-3000:]
    assert f"resume: from {run}/checkpoints/{tag_for(4)}" in ds.stdout + ds.stderr
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == list(range(1, 13))
