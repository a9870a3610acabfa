"""Checkpoints: DeepSpeed engine state + per-rank loader/RNG/trainer state + resolved config; atomic ``latest``.

Usage (every rank calls both; they are collective)::

    ckpt = Checkpointer(cfg.checkpoint_dir, keep_last=3, rank=rank)
    state = ckpt.resume(engine, cfg.checkpoint.resume)          # None = fresh start, else this rank's state dict
    ckpt.save(engine, step, rank_state, config)

Export reads these folders without an engine: megatrain/convert/checkpoint.py.

Layout of ``<dir>``::

    latest                      text file naming the newest *complete* tag; replaced atomically (tmp + os.replace)
    step00000040/               DeepSpeed's files (model, optimizer / ZeRO shards, LR scheduler)
        trainer_rank00000.pt    this rank's data-loader state, RNG states, counters
        config.yaml             the resolved run config

A crash mid-save leaves ``latest`` on the previous tag, which is only deleted (retention) after the new one is
complete and ``latest`` points at it.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def read_latest(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise FileNotFoundError(f"{path} names checkpoint {tag!r}, which does not exist in {ckpt_dir}")
    return tag


def write_latest(ckpt_dir: str, tag: str) -> None:
    tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))  # atomic: readers see the old or the new tag, never half


class Checkpointer:
    def __init__(self, ckpt_dir: str, keep_last: int, rank: int):
        self.dir, self.keep_last, self.rank = ckpt_dir, keep_last, rank

    def _rank_file(self, tag: str, rank: Optional[int] = None) -> str:
        return os.path.join(self.dir, tag, f"trainer_rank{self.rank if rank is None else rank:05d}.pt")

    def save(self, engine, step: int, rank_state: dict, config) -> str:
        tag = tag_for(step)
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
        # DeepSpeed writes the model/optimizer (ZeRO: one shard per rank); its own `latest` is off: ours is atomic.
        engine.save_checkpoint(self.dir, tag=tag, save_latest=False)
        torch.save({**rank_state, "step": step, "rng": rng_state()}, self._rank_file(tag))
        if self.rank == 0:
            config.save(os.path.join(self.dir, tag, "config.yaml"))
        dist.barrier()  # every rank's files are on disk before the pointer moves
        if self.rank == 0:
            write_latest(self.dir, tag)
            self._prune(keep=tag)
        dist.barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(t for t in os.listdir(self.dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(self.dir, t)))
        # never delete the tag `latest` points at, even if a newer incomplete one exists
        old = [t for t in tags if t != keep][: max(0, len(tags) - self.keep_last)]
        for t in old:
            shutil.rmtree(os.path.join(self.dir, t), ignore_errors=True)

    def resolve(self, resume: str) -> Optional[tuple]:
        """(load_dir, tag) to resume from, or None for a fresh start."""
        if resume == "none":
            return None
        if resume == "auto":
            tag = read_latest(self.dir) if os.path.isdir(self.dir) else None
            return (self.dir, tag) if tag else None
        path = os.path.normpath(resume)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no such checkpoint directory")
        return os.path.dirname(path), os.path.basename(path)

    def resume(self, engine, resume: str, expect: dict) -> Optional[dict]:
        """Load engine + this rank's state. ``expect``: layout keys (dp_size, sp_size...) that must match."""
        where = self.resolve(resume)
        if where is None:
            return None
        load_dir, tag = where
        rank_file = os.path.join(load_dir, tag, f"trainer_rank{self.rank:05d}.pt")
        if not os.path.exists(rank_file):
            raise FileNotFoundError(f"{rank_file} missing: checkpoint {tag} was written by a different world size "
                                    f"or is incomplete")
        state = torch.load(rank_file, weights_only=False)
        for k, v in expect.items():
            if state.get(k) != v:
                raise ValueError(f"checkpoint {os.path.join(load_dir, tag)}: saved with {k}={state.get(k)!r}, "
                                 f"this run has {k}={v!r} (the data-loader state is per DP rank)")
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
        set_rng_state(state["rng"])
        return state

