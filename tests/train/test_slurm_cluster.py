"""launch/slurm/pretrain.sbatch on a real Slurm cluster: a one-node cluster on this machine (munged, slurmctld,
slurmd; launch/slurm/local_cluster.sh) runs the unmodified batch script through `sbatch`, whose `srun` starts 2
tasks that find their ranks from SLURM_* (megatrain/parallel/env.py) and train the tiny config with SP 2. The job
must end COMPLETED with the expected metrics, and its losses must equal a plain single-process (ZeRO 1) run's, as
in test_launchers.py. Only resources are overridden on the sbatch command line (1 node, 2 tasks, no GPUs, 1 CPU
per task, a short time limit, the log in tmp), plus MEGATRAIN_PYTHON = this interpreter.

Needs Debian's slurm-wlm + munge (.ci/run installs them when it can) and root; skipped otherwise. The cluster is
started once per session and stopped at the end unless it was already running before the session.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_slurm_cluster.py
"""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from megatrain.train.metrics import read_metrics
from tests.tiny_data import TINY
from tests.dist_util import PRETRAIN, ROOT, pretrain_env

CLUSTER = os.path.join(ROOT, "launch", "slurm", "local_cluster.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm", "pretrain.sbatch")
STEPS = 2
JOB_TIMEOUT_S = 150
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}

pytestmark = pytest.mark.slow


def _skip_reason():
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH: no Slurm installed (apt-get install -y slurm-wlm munge)"
    missing = [c for c in ("munged", "slurmctld", "slurmd") if shutil.which(c) is None]
    if missing:
        return f"Slurm client found but not the daemons for a local cluster: {', '.join(missing)} missing"
    if os.geteuid() != 0:
        return "a local Slurm cluster (slurmd) needs root"
    return None


def _cluster(cmd, env):
    return subprocess.run(["bash", CLUSTER, cmd], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_conf():
    """SLURM_CONF of a running one-node cluster (started here if needed, stopped at session end if started here)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    already = _cluster("status", env).returncode == 0
    p = _cluster("start", env)
    if p.returncode != 0:
        pytest.fail(f"local_cluster.sh start failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    conf = re.search(r"^SLURM_CONF=(.+)$", p.stdout, re.M).group(1)
    yield conf
    if not already:
        _cluster("stop", env)


def _job_env(conf):
    env = pretrain_env({"MEGATRAIN_PYTHON": sys.executable})
    # the job's ranks must come from srun, and sbatch must not read a surrounding allocation's settings
    for k in list(env):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or \
                k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
            del env[k]
    env["SLURM_CONF"] = conf
    return env


def _job_state(job, env):
    p = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30)
    m = re.search(r"\bJobState=(\S+)", p.stdout)
    return (m.group(1) if m else None), p.stdout


def test_sbatch_pretrain_on_local_cluster(slurm_conf, tiny_shards, tmp_path):
    # reference: one plain process, ZeRO 1 (what test_launchers compares every launcher with)
    ref = tmp_path / "single"
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, f"data.shards={tiny_shards}", f"run_dir={ref}",
                        f"train.max_steps={STEPS}", "parallel.zero_stage=1", "logging.tensorboard=false"],
                       cwd=ROOT, env=_job_env(slurm_conf), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"single run: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    single = read_metrics(os.path.join(ref, "metrics.jsonl"))

    env = _job_env(slurm_conf)
    run_dir, out = tmp_path / "slurm", tmp_path / "job.out"
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=10", f"--output={out}", SBATCH, TINY, f"data.shards={tiny_shards}", f"run_dir={run_dir}",
           f"train.max_steps={STEPS}", "parallel.sequence_parallel_size=2", "logging.tensorboard=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"sbatch failed (exit {p.returncode}): {p.stderr}"
    job = p.stdout.strip().split(";")[0]
    assert job.isdigit(), p.stdout

    deadline, state, info = time.monotonic() + JOB_TIMEOUT_S, None, ""
    while time.monotonic() < deadline:
        state, info = _job_state(job, env)
        if state in TERMINAL:
            break
        time.sleep(1)
    log = out.read_text(errors="replace") if out.exists() else "(no job output)"
    if state not in TERMINAL:
        subprocess.run(["scancel", job], env=env, timeout=30)
        pytest.fail(f"job {job} still {state} after {JOB_TIMEOUT_S}s\n{info}\n{log[-4000:]}")
    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"job {job} ended {state}\n{info}\n{log[-4000:]}"

    assert f"megatrain: job {job} on 1 nodes" in log, log[-3000:]
    assert "launcher=slurm world=2" in log and "sp=2" in log, log[-3000:]  # ranks came from srun's SLURM_*
    got = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [g["step"] for g in got] == list(range(1, STEPS + 1))
    assert [g["loss"] for g in got] == pytest.approx([s["loss"] for s in single], rel=1e-6, abs=0)
    assert open(run_dir / "checkpoints" / "latest").read() == f"step{STEPS:08d}"
