"""The fault hook of the fault tests: a test copies this file into a folder beside a ``fault.json`` and puts that
folder first on PYTHONPATH of the ranks it launches; Python imports ``sitecustomize`` at start-up, and this one
patches ``megatrain.train.trainer.sp_forward`` (the forward of every micro-batch) as the JSON says. Nothing in
megatrain reads it: production code has no fault switch.

fault.json keys (all optional):
  "poison": {"token": 5, "scale": 10}          a window holding a row of >= 16 copies of ``token`` (a poisoned
                                                 window of the test's shards) has its loss scaled (every time: data)
  "corrupt": {"rank": 1, "call": 30, "scale": 10}  that rank's call-th forward only (not reproducible: hardware)
  "sleep": {"rank": 1, "call": 12, "seconds": 120, "every": 0.0}  that rank sleeps in its call-th forward (a
                                                 hang); ``every``: seconds slept in every forward (a straggler)
"""
import importlib.abc
import importlib.util
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_FAULT = json.load(open(os.path.join(_HERE, "fault.json")))
_TARGET = "megatrain.train.trainer"


def _patch(trainer) -> None:
    real = trainer.sp_forward
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # srun: RANK comes later
    calls = [0]

    def scaled(loss, k):
        return type(loss)(loss.backward_loss * k, loss.mean_loss * k, loss.total_tokens)

    def sp_forward(model, window, *a, **kw):
        calls[0] += 1
        sl = _FAULT.get("sleep")
        if sl and rank == sl["rank"]:
            time.sleep(sl.get("every", 0.0))
            if calls[0] == sl["call"]:
                time.sleep(sl["seconds"])
        loss = real(model, window, *a, **kw)
        p = _FAULT.get("poison")
        if p and int((window["input_ids"] == p["token"]).sum(dim=-1).max()) >= 16:
            loss = scaled(loss, p["scale"])
        c = _FAULT.get("corrupt")
        if c and rank == c["rank"] and calls[0] == c["call"]:
            loss = scaled(loss, c["scale"])
        return loss

    trainer.sp_forward = sp_forward


class _After(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import the trainer as usual, then patch it."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        self._real = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        self._real.exec_module(module)
        _patch(module)


sys.meta_path.insert(0, _After())
