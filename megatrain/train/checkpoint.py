"""Checkpoints: DeepSpeed engine state + per-rank loader/RNG/trainer state + resolved config; a manifest written
last; an atomic ``latest``; resume that skips incomplete checkpoints and converts between layouts.

Usage (every rank calls these; they are collective)::

    ckpt = Checkpointer(cfg.checkpoint_dir, keep_last=3, rank=rank)
    plan = ckpt.plan(cfg.checkpoint.resume, layout)       # None = fresh start; before deepspeed.initialize
    if plan and plan.universal: ds_config["checkpoint"] = {"load_universal": True}; ckpt.convert(plan)
    state = ckpt.load(engine, plan)                        # this rank's trainer state (rank 0's if the layout changed)
    ckpt.save(engine, step, rank_state, config)           # rank_state: Job.state_dict() ("layout": LAYOUT_KEYS)

Export reads these folders without an engine: megatrain/export/load.py.

Layout of ``<dir>``::

    latest                      text file naming the newest *complete* tag; replaced atomically (megatrain.io)
    step00000040/               DeepSpeed's files (model, optimizer / ZeRO shards, LR schedule position)
        trainer_rank00000.pt    this rank's data-loader state, RNG states, counters, layout
        config.yaml             the resolved run config
        manifest.json           written last (before ``latest`` moves): every file above with its size, the layout
        universal/              made on demand: the DeepSpeed universal checkpoint of this tag (elastic resume)

Guarantees:
* A crash or kill mid-save leaves ``latest`` on the previous tag, which is only deleted (retention) after the new
  one is complete and ``latest`` points at it.
* ``resume=auto`` takes the newest tag not newer than ``latest`` whose files match its manifest (presence and size:
  a stat per file, no reads); each one skipped is named in a warning line; none complete is a one-line error.
  Tags newer than ``latest`` (or, without ``latest``, tags without a manifest) are interrupted saves: ignored.
  Sizes catch truncated and missing files, not bit flips inside a file of the right size.
* A save that cannot write (folder unwritable, disk full before DeepSpeed starts) is a one-line error on every rank
  and ``latest`` keeps naming the previous checkpoint.
* Elastic resume (another world size / SP size): ZeRO model + optimizer state through DeepSpeed's universal
  checkpoint (``deepspeed.checkpoint.ds_to_universal``, converted once per tag, then ``checkpoint.load_universal``);
  ZeRO-0 state is whole on every rank and loads as is. The loader state comes from rank 0's file (the stream state
  must be layout-free); RNG states are per rank and are NOT carried over (dropout / masking draws differ from an
  uninterrupted run; without dropout, as in the exactness tests, nothing depends on them).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatrain.config import ConfigError
from megatrain.io import atomic_write

LATEST = "latest"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"
TAG_RE = re.compile(r"^step(\d{8})$")
MANIFEST_FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from or saved: one line naming the folder/file and what is wrong.
    (A ConfigError so the entry point prints it as one line without a traceback.)"""


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
    atomic_write(os.path.join(ckpt_dir, LATEST), tag, fsync=True)


# ---- manifest: "complete" checkable with one stat per file ----
def _tag_files(tag_dir: str) -> dict:
    """{relative path: bytes} of a tag's files, without the manifest, temporaries and the derived universal/."""
    out = {}
    for root, dirs, files in os.walk(tag_dir):
        if root == tag_dir:
            dirs[:] = [d for d in dirs if not d.startswith(UNIVERSAL)]
        for name in files:
            if name == MANIFEST or name.startswith("."):
                continue
            path = os.path.join(root, name)
            out[os.path.relpath(path, tag_dir)] = os.path.getsize(path)
    return dict(sorted(out.items()))


def write_manifest(tag_dir: str, step: int, layout: dict) -> None:
    atomic_write(os.path.join(tag_dir, MANIFEST), json.dumps(
        {"format": MANIFEST_FORMAT, "step": step, "layout": layout, "files": _tag_files(tag_dir)}, indent=1), fsync=True)


def read_manifest(tag_dir: str) -> Optional[dict]:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verify(tag_dir: str) -> Optional[str]:
    """None if every file the manifest lists is there with its size; else what is wrong, in a few words."""
    try:
        manifest = read_manifest(tag_dir)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    if manifest is None:
        return f"no {MANIFEST} (the save did not finish)"
    for rel, size in manifest.get("files", {}).items():
        path = os.path.join(tag_dir, rel)
        if not os.path.exists(path):
            return f"{rel} is missing"
        got = os.path.getsize(path)
        if got != size:
            return f"{rel} has {got} bytes, the manifest says {size} (truncated or rewritten)"
    return None


def _steps_desc(ckpt_dir: str) -> list:
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, reverse=True)


def choose_auto(ckpt_dir: str) -> tuple:
    """(tag or None, [warning lines]) for ``resume=auto``; raises CheckpointError when ``latest`` exists but no
    checkpoint up to it is complete."""
    if not os.path.isdir(ckpt_dir):
        return None, []
    warnings = []
    tags = _steps_desc(ckpt_dir)
    latest_path = os.path.join(ckpt_dir, LATEST)
    latest = None
    if os.path.exists(latest_path):
        with open(latest_path) as f:
            latest = f.read().strip()
        if latest not in tags:
            warnings.append(f"{latest_path} names {latest!r}, which is not a checkpoint folder in {ckpt_dir}")
    if latest is None:
        # No pointer ever written (or it was deleted): a tag with a manifest is a complete save whose pointer move
        # was lost; one without is an interrupted save.
        candidates = [t for t in tags if os.path.exists(os.path.join(ckpt_dir, t, MANIFEST))]
    else:
        # newer tags than `latest` are saves that did not finish: never taken, not worth a warning
        candidates = [t for t in tags if t <= latest]
    for t in candidates:
        tag_dir = os.path.join(ckpt_dir, t)
        why = verify(tag_dir)
        if why is None:
            return t, warnings
        warnings.append(f"checkpoint {tag_dir} skipped: {why}")
    if latest is not None:
        raise CheckpointError(f"checkpoint.resume=auto: no complete checkpoint in {ckpt_dir} ("
                              + "; ".join(warnings or [f"{latest_path} names {latest!r}"])
                              + "); set checkpoint.resume=none to start afresh")
    return None, warnings


LAYOUT_KEYS = ("world_size", "sp_size", "dp_size", "zero_stage")  # what a checkpoint's layout records
RESHARD_KEYS = LAYOUT_KEYS[:3]  # a change in any of these: rank 0's loader state, no RNG states


def saved_layout(tag_dir: str) -> dict:
    """The layout (LAYOUT_KEYS) a checkpoint was written with, from its manifest (verified before this is read)."""
    return read_manifest(tag_dir)["layout"]


def universal_info() -> dict:
    """What ds_to_universal requires a checkpoint to carry (Megatron-DeepSpeed writes the same): no tensor or
    pipeline parallelism, so no slicing patterns, only the format version."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def to_universal(tag_dir: str) -> str:
    """``<tag_dir>/universal``: DeepSpeed's universal checkpoint of a ZeRO-1/2/3 tag, made once (atomic rename)."""
    out = os.path.join(tag_dir, UNIVERSAL)
    if os.path.isdir(out):
        return out
    import argparse
    from deepspeed.checkpoint import ds_to_universal
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress chatter
            ds_to_universal.main(args)
    except Exception as e:
        raise CheckpointError(f"converting {tag_dir} to a DeepSpeed universal checkpoint failed: "
                              f"{type(e).__name__}: {e}\n{log.getvalue()[-2000:]}") from e
    # it also writes a `latest_universal` pointer next to its output folder: ours is `latest`
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tag_dir, "latest_universal"))
    os.replace(tmp, out)
    return out


@dataclass
class ResumePlan:
    load_dir: str           # the checkpoint directory
    tag: str                # the tag folder in it
    saved: dict             # the layout the checkpoint was written with
    layout_changed: bool    # saved layout != this run's (world, SP or DP size): rank 0's loader state, no RNG
    universal: bool         # load the ZeRO state through DeepSpeed's universal checkpoint

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def _warn(msg: str) -> None:
    print(f"resume: warning: {msg}", file=sys.stderr, flush=True)


class Checkpointer:
    def __init__(self, ckpt_dir: str, keep_last: int, rank: int):
        self.dir, self.keep_last, self.rank = ckpt_dir, keep_last, rank

    def _rank_file(self, tag: str, rank: Optional[int] = None) -> str:
        return os.path.join(self.dir, tag, f"trainer_rank{self.rank if rank is None else rank:05d}.pt")

    # ---- save ----
    def save(self, engine, step: int, rank_state: dict, config) -> str:
        tag = tag_for(step)
        tag_dir = os.path.join(self.dir, tag)
        # 1. Can every rank write there? The common failure (folder unwritable, disk full) must be refused before
        #    DeepSpeed starts its collective save: a rank failing inside it would leave the others waiting.
        err = None
        if self.rank == 0:
            try:
                os.makedirs(self.dir, exist_ok=True)
                if os.path.isdir(tag_dir):  # an interrupted / corrupt save of this step: start it afresh
                    shutil.rmtree(tag_dir)
                os.makedirs(tag_dir)
            except OSError as e:
                err = f"{type(e).__name__}: {e}"
        self._agree(err, step)
        err = None
        try:
            probe = os.path.join(tag_dir, f".probe{self.rank}")
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
            os.remove(probe)
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
        self._agree(err, step)
        # 2. DeepSpeed writes the model/optimizer (ZeRO: one shard per rank); its own `latest` is off: ours is
        #    atomic and moves only after the manifest. The universal-checkpoint info makes the tag convertible.
        err = None
        try:
            engine.save_checkpoint(self.dir, tag=tag, client_state=universal_info(), save_latest=False)
            torch.save({**rank_state, "step": step, "rng": rng_state()}, self._rank_file(tag))
            if self.rank == 0:
                config.save(os.path.join(tag_dir, "config.yaml"))
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
        self._agree(err, step)  # also the barrier: every rank's files are on disk
        if self.rank == 0:
            try:
                write_manifest(tag_dir, step, rank_state["layout"])
                write_latest(self.dir, tag)
            except OSError as e:
                err = f"{type(e).__name__}: {e}"
            else:
                self._prune(keep=tag)
        self._agree(err if self.rank == 0 else None, step)
        return tag

    def _agree(self, err: Optional[str], step: int) -> None:
        """Collective: raise CheckpointError on every rank if any rank failed (naming the first failure)."""
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
        failed = [(r, e) for r, e in enumerate(errs) if e]
        if failed:
            r, e = failed[0]
            prev = None
            with contextlib.suppress(OSError):
                prev = read_latest(self.dir)
            raise CheckpointError(f"checkpoint save at step {step} into {self.dir} failed on rank {r}: {e}; "
                                  f"{os.path.join(self.dir, LATEST)} still names "
                                  f"{prev or 'no checkpoint'}")

    def _prune(self, keep: str) -> None:
        tags = sorted(t for t in os.listdir(self.dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(self.dir, t)))
        # never delete the tag `latest` points at, even if a newer incomplete one exists
        old = [t for t in tags if t != keep][: max(0, len(tags) - self.keep_last)]
        for t in old:
            shutil.rmtree(os.path.join(self.dir, t), ignore_errors=True)

    # ---- resume ----
    def resolve(self, resume: str) -> Optional[tuple]:
        """(load_dir, tag) to resume from, or None for a fresh start. Prints a warning line for each newer
        checkpoint skipped as incomplete; raises CheckpointError when nothing complete can be found."""
        if resume == "none":
            return None
        if resume == "auto":
            tag, warnings = choose_auto(self.dir)
            for w in warnings:
                _warn(w)
            return (self.dir, tag) if tag else None
        path = os.path.normpath(resume)
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint.resume={resume!r}: no such checkpoint directory")
        why = verify(path)
        if why is not None:
            raise CheckpointError(f"checkpoint.resume={resume!r}: incomplete checkpoint: {why}")
        return os.path.dirname(path), os.path.basename(path)

    def plan(self, resume: str, layout: dict) -> Optional[ResumePlan]:
        """Collective. Rank 0 picks the checkpoint (and prints any warning) and tells the others; every rank gets
        the same plan. Call before deepspeed.initialize: a universal load is a DeepSpeed config setting."""
        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", self.resolve(resume))
            except (CheckpointError, OSError) as e:
                box[0] = ("error", str(e))
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        kind, where = box[0]
        if kind == "error":
            raise CheckpointError(where)
        if where is None:
            return None
        load_dir, tag = where
        saved = saved_layout(os.path.join(load_dir, tag))
        changed = any(saved[k] != layout[k] for k in RESHARD_KEYS)
        s_zero, zero = saved["zero_stage"], layout["zero_stage"]
        # ZeRO state is sharded over all world_size ranks: another world size (or another sharding format: stage
        # 0 keeps it whole, 3 shards parameters) needs the universal form; stages 1 and 2 share one format.
        same_shards = saved["world_size"] == layout["world_size"] and (s_zero == zero or {s_zero, zero} <= {1, 2})
        if s_zero == 0 and zero != 0:
            raise CheckpointError(f"checkpoint {os.path.join(load_dir, tag)} was written with parallel.zero_stage=0 "
                                  f"and cannot be resumed with parallel.zero_stage={zero}: resume with 0")
        universal = s_zero > 0 and not same_shards
        if universal and zero == 0:
            raise CheckpointError(f"checkpoint {os.path.join(load_dir, tag)} was written with parallel.zero_stage="
                                  f"{s_zero} on {saved['world_size']} ranks: resume with a ZeRO stage >= 1")
        return ResumePlan(load_dir, tag, saved, changed, universal)

    def convert(self, plan: ResumePlan) -> None:
        """Collective: rank 0 makes the tag's universal checkpoint (once), the others wait."""
        err = None
        if self.rank == 0:
            try:
                to_universal(plan.tag_dir)
            except CheckpointError as e:
                err = str(e)
        box = [err]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise CheckpointError(box[0])

    def load(self, engine, plan: Optional[ResumePlan]) -> Optional[dict]:
        """Load engine + trainer state. Same layout: this rank's file and RNG states. Changed layout: rank 0's
        file (loader state and counters; the stream state must load under any DP size), RNG states untouched."""
        if plan is None:
            return None
        load_dir, tag = (plan.tag_dir, UNIVERSAL) if plan.universal else (plan.load_dir, plan.tag)
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
        if plan.layout_changed:
            return torch.load(os.path.join(plan.tag_dir, "trainer_rank00000.pt"), weights_only=False)
        state = torch.load(os.path.join(plan.tag_dir, f"trainer_rank{self.rank:05d}.pt"), weights_only=False)
        set_rng_state(state["rng"])
        return state
