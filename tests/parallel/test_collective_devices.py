"""Every collective of a training step gets device tensors (the NCCL crash class, issue #15 section 1), on CPU.

Run: PYTHONPATH=. python -m pytest -q tests/parallel/test_collective_devices.py

NCCL has no CPU collectives: a host tensor in an all-reduce ends a GPU run with "No backend type associated with
device type cpu". CPU CI runs gloo, where host and device are the same memory, so the bug is invisible. The probe
makes it visible: during the training steps it marks every tensor that a GPU run would have on the *host* --
made by a factory without ``device=`` (``torch.tensor([..])``, ``torch.zeros(())``), or by ``.cpu()``, and what
is computed from host tensors only -- while ``.to(device)`` places a tensor on the device. A dispatch mode then sees every c10d op (megatrain's, DeepSpeed's and the ones inside torch's object
collectives, however the function was bound) and records each host tensor it is handed, with the caller.
The trainer runs for real: 2 gloo ranks, SP 2 (the EMA boundary's collectives), ZeRO-2, 2 steps, a checkpoint.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.dist_util import run_ranks
from tests.tiny_data import ROOT, TINY, write_shards

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye, torch.scalar_tensor}
HOST = "_megatrain_host"


def _tensors(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _mark(out, host: bool):
    for t in _tensors(out):
        setattr(t, HOST, host)


class HostTensors(TorchFunctionMode):
    """Marks the tensors a GPU run would hold on the host (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            if kwargs.get("device") is None:
                _mark(out, True)
        elif getattr(func, "__name__", None) in ("cpu", "numpy"):  # Tensor methods arrive as TensorBase's
            _mark(out, True)
        elif getattr(func, "__name__", None) == "to":
            dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if dev is not None:  # placed on a device: on CPU, .to("cpu") cannot be told from .to(accelerator name)
                _mark(out, False)
        else:
            inputs = _tensors((args, kwargs))
            if inputs and all(getattr(t, HOST, False) for t in inputs):
                _mark(out, True)
        return out


class CollectiveProbe(TorchDispatchMode):
    """Records every c10d op that receives a host-marked tensor: (op, where it was called from)."""

    def __init__(self):
        super().__init__()
        self.host, self.seen = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.seen += 1
            if any(getattr(t, HOST, False) for t in _tensors((args, kwargs))):
                # the innermost frame of this repository (DeepSpeed's own collectives: its caller here); not of
                # a venv inside it (CI's .venv: torch's own frames would count as ours)
                caller = next((f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in
                               reversed(traceback.extract_stack()) if f.filename.startswith(ROOT)
                               and "site-packages" not in f.filename and not f.name.startswith("__torch_")), "?")
                ds = next((f"deepspeed/{f.filename.split('/deepspeed/', 1)[1]}:{f.lineno}" for f in
                           reversed(traceback.extract_stack()) if "/deepspeed/" in f.filename
                           and "/deepspeed/comm/" not in f.filename), None)
                self.host.append((str(func), caller) + ((ds,) if ds else ()))
        return func(*args, **(kwargs or {}))


def _worker(rank, world, shards, run_dir):
    from megatrain.config import load_config
    from megatrain.train import trainer
    cfg = load_config(TINY, [f"data.shards={shards}", f"run_dir={run_dir}", "logging.tensorboard=false",
                             "train.max_steps=2", "checkpoint.every_steps=2", "parallel.sequence_parallel_size=2",
                             "parallel.zero_stage=2"])
    probe = CollectiveProbe()
    step = trainer.train_step

    def probed_step(job):
        with HostTensors(), probe:
            return step(job)

    agreed = trainer.StopFlag.agreed

    def probed_agreed(self, *a):
        with HostTensors(), probe:
            return agreed(self, *a)

    trainer.train_step, trainer.StopFlag.agreed = probed_step, probed_agreed
    try:
        trainer.train(cfg)
    finally:
        trainer.train_step, trainer.StopFlag.agreed = step, agreed
    return probe.seen, probe.host


@pytest.mark.timeout(300)
def test_every_collective_of_a_train_step_gets_device_tensors(tmp_path):
    shards = write_shards(str(tmp_path / "shards"))
    (seen, host), _ = run_ranks(_worker, 2, shards, str(tmp_path / "run"))
    assert seen > 20, seen  # the probe saw the boundary exchanges, DeepSpeed's reductions and the loss/stop ones
    assert host == [], f"collectives handed host tensors (an NCCL group fails on these): {host}"


def test_probe_catches_a_host_tensor():
    """The probe is shown to see the bug: a host scalar reaching a collective is reported, a device one is not."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one rank is enough here
    try:
        probe = CollectiveProbe()
        device = torch.device("cpu")
        with HostTensors(), probe:
            dist.all_reduce(torch.zeros((), dtype=torch.float64))              # today's loss_sum
            dist.all_reduce(torch.tensor([1.0]))                               # today's StopFlag
            dist.all_reduce(torch.ones(2, device=device).sum().double().cpu())  # today's per-micro-batch copy
            dist.all_reduce(torch.tensor([0.0], device=device))                # fine: on the device
            dist.all_reduce(torch.zeros(3).to(device) * 2)                     # fine: moved there
        assert [op for op, _ in probe.host] == ["c10d.allreduce_.default"] * 3 and probe.seen == 5
        assert probe.host[0][1].startswith("tests/parallel/test_collective_devices.py:")
    finally:
        dist.destroy_process_group()


def test_nccl_groups_also_serve_cpu_tensors():
    """On CUDA the group is "cpu:gloo,cuda:nccl": device tensors over NCCL, CPU tensors and objects over gloo."""
    from megatrain.parallel.env import process_group_backend
    assert process_group_backend("auto", cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("nccl", cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("auto", cuda=False) == "gloo"
    assert process_group_backend("gloo", cuda=True) == "gloo"
