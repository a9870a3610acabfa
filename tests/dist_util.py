"""Multi-process helpers shared by the tests (CPU, gloo).

* ``run_ranks(fn, world, *args)``: run ``fn(rank, world, *args)`` in ``world`` spawned processes whose environment
  looks like a launcher's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), after
  ``megatrain.parallel.env.discover()`` + ``init_process_group()`` — the same path ``launch/pretrain.py`` takes.
  Returns the list of the ranks' return values; a failing rank raises here with its traceback.
* ``launch_pretrain(args, world, ...)``: start ``launch/pretrain.py`` as ``world`` plain subprocesses with those env
  vars (what torchrun / the deepspeed launcher do), returning the Popen objects (tests may kill -9 them).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sysconfig
import sys
import tempfile
import traceback

import torch.multiprocessing as mp

from megatrain.parallel.env import free_port  # noqa: F401  (re-exported for the tests)

from tests.tiny_data import ROOT

PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")


def rank_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _entry(rank, fn, world, port, outdir, args):
    os.environ.update(rank_env(rank, world, port))
    import torch
    torch.set_num_threads(1)  # small shared machine; also keeps CPU results deterministic
    from megatrain.parallel.env import discover, init_process_group
    import torch.distributed as dist
    try:
        init_process_group(discover(), "gloo", timeout_s=120)
        result = fn(rank, world, *args)
        dist.barrier()
        with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.start_processes(_entry, args=(fn, world, free_port(), outdir, args), nprocs=world, join=True,
                               start_method="spawn")
        except Exception as e:
            errs = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.endswith(".err")]
            # A rank that died below Python (a signal, the OOM killer) writes no .err: say how it ended.
            raise AssertionError(f"rank failed ({type(e).__name__}: {e}):\n" + "\n".join(errs)) from e
        out = []
        for r in range(world):
            with open(os.path.join(outdir, f"{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out


def pretrain_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # launchers (deepspeed, torchrun, mpiexec) of this interpreter, even where its scripts dir is not on PATH
    env["PATH"] = sysconfig.get_path("scripts") + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def launch_pretrain(args: list, world: int, log_dir: str, port: int | None = None, env: dict | None = None,
                    preexec_fn=None) -> list:
    """Start ``world`` ranks of launch/pretrain.py; stdout+stderr of rank r go to ``log_dir/rank{r}.log``. ``env``:
    more environment (a PYTHONPATH given there goes first); ``preexec_fn``: run in each child before it starts."""
    port = port or free_port()
    procs = []
    for r in range(world):
        log = open(os.path.join(log_dir, f"rank{r}.log"), "ab")
        e = pretrain_env(rank_env(r, world, port))
        if env:
            e.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
            if "PYTHONPATH" in env:
                e["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + e["PYTHONPATH"]
        procs.append(subprocess.Popen([sys.executable, PRETRAIN, *args], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, env=e, preexec_fn=preexec_fn))
    return procs


def wait_all(procs: list, timeout: float, log_dir: str, expect: int = 0) -> None:
    """Wait for every rank; on timeout kill them (by pid) and fail; on an exit code other than ``expect`` fail with
    the logs."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"pretrain ranks timed out after {timeout}s:\n{tail_logs(log_dir)}")
    codes = [p.returncode for p in procs]
    if any(c != expect for c in codes):
        raise AssertionError(f"pretrain ranks exited with {codes}:\n{tail_logs(log_dir)}")


def tail_logs(log_dir: str, n: int = 3000) -> str:
    out = []
    for f in sorted(os.listdir(log_dir)):
        if f.endswith(".log"):
            with open(os.path.join(log_dir, f), errors="replace") as fh:
                out.append(f"--- {f}\n{fh.read()[-n:]}")
    return "\n".join(out)
