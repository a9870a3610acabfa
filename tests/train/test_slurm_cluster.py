"""launch/slurm/pretrain.sbatch on a real Slurm cluster: a one-node cluster on this machine (munged, slurmctld,
slurmd; launch/slurm/local_cluster.sh) runs the unmodified batch script through `sbatch`, whose `srun` starts 2
tasks that find their ranks from SLURM_* (megatrain/parallel/env.py) and train the tiny config with SP 2. The job
must end COMPLETED with the expected metrics, and its losses must equal a plain single-process (ZeRO 1) run's, as
in test_launchers.py. Only resources are overridden on the sbatch command line (1 node, 2 tasks, no GPUs, 1 CPU
per task, a short time limit, the log in tmp), plus MEGATRAIN_PYTHON = this interpreter.

Preemption: a running job gets the time-limit warning (`scancel --signal=USR1`, what --signal=USR1@T sends; or
`scancel -b`, what --signal=B:USR1@T sends to the batch script) or is requeued by the scheduler (`scontrol
requeue`). It must checkpoint, go back to the queue (the sbatch requeues itself on the trainer's exit 75), start
again, resume from `latest` and end COMPLETED, its metrics.jsonl bitwise equal to an uninterrupted job's. The
uninterrupted job finishes without being requeued.

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


def _submit(env, out, run_dir, shards, *overrides) -> str:
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=10", f"--output={out}", SBATCH, TINY, f"data.shards={shards}", f"run_dir={run_dir}",
           "parallel.sequence_parallel_size=2", "logging.tensorboard=false", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"sbatch failed (exit {p.returncode}): {p.stderr}"
    job = p.stdout.strip().split(";")[0]
    assert job.isdigit(), p.stdout
    return job


def _wait_done(job, env, out, timeout=JOB_TIMEOUT_S) -> tuple:
    """(final state, `scontrol show job` line, job log) once the job is in a terminal state."""
    deadline, state, info = time.monotonic() + timeout, None, ""
    while time.monotonic() < deadline:
        state, info = _job_state(job, env)
        if state in TERMINAL:
            break
        time.sleep(0.5)
    log = out.read_text(errors="replace") if out.exists() else "(no job output)"
    if state not in TERMINAL:
        subprocess.run(["scancel", job], env=env, timeout=30)
        pytest.fail(f"job {job} still {state} after {timeout}s\n{info}\n{log[-4000:]}")
    return state, info, log


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
    job = _submit(env, out, run_dir, tiny_shards, f"train.max_steps={STEPS}")
    state, info, log = _wait_done(job, env, out)
    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"job {job} ended {state}\n{info}\n{log[-4000:]}"

    assert f"megatrain: job {job} (start 1) on 1 nodes" in log, log[-3000:]
    assert "launcher=slurm world=2" in log and "sp=2" in log, log[-3000:]  # ranks came from srun's SLURM_*
    got = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [g["step"] for g in got] == list(range(1, STEPS + 1))
    assert [g["loss"] for g in got] == pytest.approx([s["loss"] for s in single], rel=1e-6, abs=0)
    assert open(run_dir / "checkpoints" / "latest").read() == f"step{STEPS:08d}"


# ---- preemption: checkpoint, requeue, resume ----
LONG = ["train.max_steps=60", "checkpoint.every_steps=10"]  # ~2 s of steps here: the signal lands mid-run
COMPARED = ("step", "loss", "lr", "grad_norm", "tokens", "skipped_steps")  # all but the timings


def _restarts(info: str) -> int:
    return int(re.search(r"\bRestarts=(\d+)", info).group(1))


def _last_step(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.endswith("}")]
    return int(re.search(r'"step": (\d+)', lines[-1]).group(1)) if lines else 0


def _wait_for(cond, what, job, env, out, timeout=JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not cond():
        state, info = _job_state(job, env)
        if state in TERMINAL or time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, timeout=30)
            log = out.read_text(errors="replace") if out.exists() else ""
            pytest.fail(f"job {job}: no {what} (state {state})\n{info}\n{log[-4000:]}")
        time.sleep(0.05)


def _trajectory(run_dir) -> list:
    return [{k: r.get(k) for k in COMPARED} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def uninterrupted(slurm_conf, tiny_shards, tmp_path_factory):
    """The LONG job, never signalled: it finishes on its first start and is not requeued."""
    env, d = _job_env(slurm_conf), tmp_path_factory.mktemp("uninterrupted")
    job = _submit(env, d / "job.out", d / "run", tiny_shards, *LONG)
    state, info, log = _wait_done(job, env, d / "job.out")
    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"job {job} ended {state}\n{info}\n{log[-4000:]}"
    return {"restarts": _restarts(info), "log": log, "metrics": _trajectory(d / "run")}


def test_finished_job_is_not_requeued(uninterrupted):
    assert uninterrupted["restarts"] == 0
    log = uninterrupted["log"]
    assert "(start 1)" in log and "(start 2)" not in log and "requeueing" not in log, log[-3000:]
    assert [r["step"] for r in uninterrupted["metrics"]] == list(range(1, 61))


@pytest.mark.parametrize("how", ["usr1", "usr1-batch-script", "scontrol-requeue"])
def test_preempted_job_requeues_and_resumes_bitwise(slurm_conf, tiny_shards, tmp_path, uninterrupted, how):
    env, run_dir, out = _job_env(slurm_conf), tmp_path / "run", tmp_path / "job.out"
    job = _submit(env, out, run_dir, tiny_shards, *LONG)
    if how == "scontrol-requeue":  # the scheduler takes the node back: SIGTERM to every process, then requeue
        _wait_for(lambda: os.path.exists(run_dir / "checkpoints" / "latest"), "checkpoint", job, env, out)
        subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=30)
    else:  # the time-limit warning, to the tasks (--signal=USR1@T) or to the batch script (--signal=B:USR1@T)
        _wait_for(lambda: _last_step(run_dir) >= 2, "step 2", job, env, out)
        signal_cmd = ["scancel", "--signal=USR1", *(["--batch"] if how == "usr1-batch-script" else []), job]
        subprocess.run(signal_cmd, env=env, check=True, timeout=30)
    state, info, log = _wait_done(job, env, out)

    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"job {job} ended {state}\n{info}\n{log[-4000:]}"
    assert _restarts(info) == 1, f"{info}\n{log[-4000:]}"
    # one log for both starts (--open-mode=append)
    assert f"megatrain: job {job} (start 1)" in log and f"megatrain: job {job} (start 2)" in log, log[-4000:]
    if how != "scontrol-requeue":
        stop = re.search(r"stop signal: checkpoint at step (\d+) saved; (\d+) steps to do: exiting 75", log)
        assert stop and int(stop.group(1)) + int(stop.group(2)) == 60, log[-4000:]
        assert f"megatrain: job {job} stopped with steps to do: requeueing it" in log, log[-4000:]
    assert _trajectory(run_dir) == uninterrupted["metrics"]  # bitwise: == on floats
    assert open(run_dir / "checkpoints" / "latest").read() == "step00000060"


def test_lost_rank_requeues_and_resumes_bitwise(slurm_conf, tiny_shards, tmp_path, uninterrupted):
    """A task killed with -9 mid-run: the other one's next collective fails (it exits 75), srun ends, the batch
    script requeues the job (a failure requeue, counted in the job's Comment), which resumes from `latest` and ends
    COMPLETED with the uninterrupted job's metrics, bitwise."""
    import psutil
    env, run_dir, out = _job_env(slurm_conf), tmp_path / "run", tmp_path / "job.out"
    job = _submit(env, out, run_dir, tiny_shards, *LONG)
    _wait_for(lambda: _last_step(run_dir) >= 12, "step 12", job, env, out)

    def task1():
        for p in psutil.process_iter():
            try:
                if f"run_dir={run_dir}" in " ".join(p.cmdline()) and p.environ().get("SLURM_PROCID") == "1":
                    return p
            except psutil.Error:
                pass
    victim = task1()
    assert victim is not None
    victim.kill()
    state, info, log = _wait_done(job, env, out)
    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"job {job} ended {state}\n{info}\n{log[-4000:]}"
    assert _restarts(info) == 1, f"{info}\n{log[-4000:]}"
    assert re.search(rf"megatrain: job {job} (lost a rank \(exit \d+\)|stopped with steps to do): requeueing", log), \
        log[-4000:]
    assert _trajectory(run_dir) == uninterrupted["metrics"]


def test_suspect_hardware_requeues_without_the_node(slurm_conf, tiny_shards, tmp_path):
    """Exit 71 (a rerun of a step differed on rank 1: the fault hook of tests/train/test_faults.py): the batch
    script requeues the job without the node the trainer's line names. Here that is the cluster's only node, so the
    requeued job waits (PENDING) instead of running on it again."""
    from tests.train.test_faults import plugin
    env = _job_env(slurm_conf)
    env["PYTHONPATH"] = plugin(tmp_path, corrupt={"rank": 1, "call": 8, "scale": 10})["PYTHONPATH"] + os.pathsep + \
        env["PYTHONPATH"]
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = _submit(env, out, run_dir, tiny_shards, "parallel.sequence_parallel_size=1", "train.max_steps=12",
                  "train.spike.action=skip", "train.spike.recheck=true", "train.spike.min_history=4",
                  "train.spike.window=16", "train.spike.grad_norm=false", "train.spike.sigma=40")
    deadline, info = time.monotonic() + JOB_TIMEOUT_S, ""
    while time.monotonic() < deadline:
        state, info = _job_state(job, env)
        if state == "PENDING" and _restarts(info) == 1 and "ExcNodeList=(null)" not in info:
            break  # requeued, and the node excluded (the script does it once the job is pending)
        assert state not in TERMINAL, f"{info}\n{out.read_text(errors='replace')[-4000:]}"
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env, timeout=30)
    log = out.read_text(errors="replace")
    host = re.search(r"rank 1 \(host ([^)]+)\)", log).group(1)
    assert re.search(rf"\bExcNodeList={re.escape(host)}\b", info) and "Comment=megatrain_failures=1" in info, info
    assert "suspect hardware" in log and "requeueing it without that node" in log, log[-4000:]
