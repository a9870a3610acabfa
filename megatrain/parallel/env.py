"""Rank discovery for every way a run is started, then the process group.

Usage::

    from megatrain.parallel.env import discover, init_process_group
    env = discover()            # DistEnv(rank, world_size, local_rank, master_addr, master_port, launcher)
    init_process_group(env, backend="auto")   # CUDA: "cpu:gloo,cuda:nccl" (see process_group_backend); else gloo

Sources, first match wins:
  1. ``RANK``/``WORLD_SIZE`` (deepspeed launcher, torchrun, or hand-set env)  -> launcher "torchrun" or "env"
  2. ``SLURM_PROCID``/``SLURM_NTASKS`` (an ``srun`` task)                      -> launcher "slurm"
  3. an MPI launcher (``mpiexec -n N``: PMI_*/OMPI_*/PMIX_* env) via mpi4py   -> launcher "mpi"
  4. nothing: one plain process                                               -> launcher "single"
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str

    def export(self, environ=None) -> None:
        """Write the torch ``env://`` variables so torch.distributed / DeepSpeed pick up this rank."""
        environ = os.environ if environ is None else environ
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int(environ: Mapping[str, str], key: str) -> int:
    raw = environ[key]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def _port(environ: Mapping[str, str], default: int) -> int:
    return _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else default


def expand_slurm_nodelist(nodelist: str) -> list:
    """``"gpu[01-03,07],login5"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login5"]`` (zero padding kept)."""
    hosts = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        if "[" in suffix:
            raise ValueError(f"SLURM nodelist {nodelist!r}: multi-dimensional host ranges are not supported")
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                    raise ValueError(f"SLURM nodelist {nodelist!r}: bad range {r!r}")
                hosts.extend(f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    if not hosts:
        raise ValueError(f"SLURM nodelist {nodelist!r} names no host")
    return hosts


def find_launcher(name: str) -> Optional[str]:
    """Path of a console script (deepspeed, torchrun, mpiexec) of *this* interpreter's environment first, then PATH.

    Why: `python -m pip install` into a pyenv/venv interpreter puts the scripts next to it, which is not always on
    PATH (pyenv shims need a rehash), and a launcher from another environment would start the wrong Python."""
    scripts = sysconfig.get_path("scripts")
    return shutil.which(name, path=os.pathsep.join([scripts, os.environ.get("PATH", "")]))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (single-node runs, tests, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MPI_MARKERS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def discover(environ: Optional[Mapping[str, str]] = None, mpi_comm=None) -> DistEnv:
    """Find this process's rank/world/master from the launcher's environment (see module doc)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        env = DistEnv(rank, world, local, environ.get("MASTER_ADDR", "127.0.0.1"), _port(environ, DEFAULT_PORT),
                      "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "env")
    elif "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
            or environ.get("SLURM_NODELIST")
        if "MASTER_ADDR" in environ:
            addr = environ["MASTER_ADDR"]
        elif nodelist:
            addr = expand_slurm_nodelist(nodelist)[0]
        else:
            raise ValueError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is")
        # every task derives the same port from the job id, so jobs sharing a node do not collide
        job = _int(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
        env = DistEnv(_int(environ, "SLURM_PROCID"), _int(environ, world_key),
                      _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
                      addr, _port(environ, 15000 + job % 20000), "slurm")
    elif mpi_comm is not None or any(k in environ for k in MPI_MARKERS):
        env = _discover_mpi(environ, mpi_comm)
    else:
        env = DistEnv(0, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"),
                      _port(environ, 0) or free_port(), "single")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} is outside world size {env.world_size} (launcher {env.launcher})")
    return env


def _discover_mpi(environ: Mapping[str, str], comm=None) -> DistEnv:
    if comm is None:
        from mpi4py import MPI  # imported only here: importing it initialises MPI
        comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    # rank 0 picks the rendezvous address/port; everyone takes its answer
    if rank == 0:
        addr = environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = _port(environ, 0) or free_port()
        root = (addr, port)
    else:
        root = None
    addr, port = comm.bcast(root, root=0)
    hosts = comm.allgather(socket.gethostname())
    local = hosts[:rank].count(hosts[rank])
    return DistEnv(rank, world, local, addr, port, "mpi")


def process_group_backend(backend: str, cuda: bool) -> str:
    """The torch backend string for ``parallel.backend`` (auto | nccl | gloo) on a machine with/without CUDA.

    NCCL has no CPU collectives: a CPU tensor in an NCCL-only group fails ("No backend type associated with device
    type cpu"). So wherever NCCL is used, the group is made with torch's per-device form "cpu:gloo,cuda:nccl":
    device tensors go over NCCL, CPU tensors and object collectives (all_gather_object, broadcast_object_list pick
    the CPU backend when there is one) over gloo. megatrain's own collectives still take the engine's device
    (tests/parallel/test_collective_devices.py): gloo on the step path would be a host sync and a slow copy."""
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def init_process_group(env: DistEnv, backend: str = "auto", timeout_s: float = 600.0) -> str:
    """Initialise torch.distributed (through DeepSpeed's comm layer, which the engine needs) for ``env``;
    ``timeout_s``: how long a collective may wait (config parallel.timeout_s).

    Returns the backend used. On CPU, DeepSpeed's shared-memory all-reduce op is switched off first: it is only
    used by inference all-reduce, and building it would JIT-compile C++ (~4 min) on the first launch."""
    import datetime

    import torch

    env.export()
    if not torch.cuda.is_available():
        # a machine without CUDA runs on CPU (gloo): say so rather than let DeepSpeed guess, which it does at import
        # with a warning ("Setting accelerator to CPU ... unable to detect it") on every rank
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torch >= 2.10 deprecates two collectives DeepSpeed 0.19's ZeRO-3 still calls (megatrain uses their successors
    # where torch has them: parallel/sequence.py); a warning per process that no user can act on
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            r"deprecated", FutureWarning)
    backend = process_group_backend(backend, torch.cuda.is_available())
    if "nccl" in backend:
        # NCCL's communicators belong to the current device; set before the group exists (DeepSpeed binds it too)
        torch.cuda.set_device(env.local_rank)
    else:
        disable_deepspeed_shm_op()
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun (--max-restarts) keeps its store across restarts of the workers: a restarted group that used it
        # as is would read the dead attempt's addresses ("Connection refused"). One key space per attempt; DeepSpeed
        # then takes the group as it finds it.
        import torch.distributed as dist
        store = dist.PrefixStore(f"megatrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                                 dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout))
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    return backend


def disable_deepspeed_shm_op() -> None:
    """Mark DeepSpeed's CPU shm comm op incompatible so its TorchBackend falls back to plain gloo collectives."""
    import deepspeed.ops
    # deepspeed.ops caches this dict on first access, and edits to it persist (see deepspeed/ops/__init__.py)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def exit_process(code: int) -> None:
    """End a training process with `code` without Python's interpreter finalization.

    After destroy_process_group(), gloo's worker threads can still hold work objects whose destruction during
    finalization aborts the process ("terminate called without an active exception", SIGABRT; pytorch/pytorch
    #179291): about one clean stop in ten turned exit 75 into -6 here. Everything megatrain owns is closed by then
    (loader workers, logs, checkpoints behind barriers), so flush, finalize MPI if mpi4py started it (mpiexec
    expects it), and leave with os._exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
