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
        trainer_rank00000.pt    this rank's data-loader state, RNG states, counters, spike history, layout (plain
                                types and tensors only: it loads with torch.load(weights_only=True))
        config.yaml             the resolved run config
        manifest.json           written last (before ``latest`` moves): every file above with its size and its
                                xxh3-64 checksum (each rank hashes a share of the files), the layout
        universal/              made on demand: the DeepSpeed universal checkpoint of this tag (elastic resume)

Guarantees:
* A crash or kill mid-save leaves ``latest`` on the previous tag, which is only deleted (retention) after the new
  one is complete and ``latest`` points at it.
* ``resume=auto`` takes the newest tag not newer than ``latest`` whose files match its manifest: presence and size
  (a stat per file), then the checksums (every rank reads and hashes a share of the files); each one skipped is
  named in a warning line with the file that did not match; none complete is a one-line error. Tags newer than
  ``latest`` (or, without ``latest``, tags without a manifest) are interrupted saves: ignored.
* A save that cannot write (folder unwritable, disk full, a file-size limit: whatever DeepSpeed or torch.save
  raises) is a one-line error on every rank (CheckpointError) and ``latest`` keeps naming the previous checkpoint,
  which is intact (retention runs only after a complete save).
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
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from megatrain.config import ConfigError
from megatrain.io import atomic_write

LATEST = "latest"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"
TAG_RE = re.compile(r"^step(\d{8})$")
MANIFEST_FORMAT = 2  # 2: {"bytes", "xxh3_64"} per file; 1: bytes only
HASH_BLOCK = 8 << 20


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from or saved: one line naming the folder/file and what is wrong.
    (A ConfigError so the entry point prints it as one line without a traceback.)"""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    """Every generator's state as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def plain(obj):
    """numpy scalars/arrays -> Python numbers/lists, recursively (what torch.load(weights_only=True) accepts)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def load_rank_file(path: str) -> dict:
    """A trainer_rank*.pt file, with weights_only=True. Files written before RNG states were plain hold numpy's
    state as an ndarray: allowed by name for those (numpy's array reconstruction only)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        from numpy.core.multiarray import _reconstruct
        dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
        with torch.serialization.safe_globals([_reconstruct, np.ndarray, np.dtype, *dtypes]):
            return torch.load(path, weights_only=True)


def file_hash(path: str) -> str:
    """xxh3-64 of a file's bytes (hex): a fast non-cryptographic checksum (bit rot, torn copies; not tampering)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


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


# ---- manifest: sizes (a stat per file) and checksums (a read) ----
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


def hash_share(tag_dir: str, rank: int = 0, world: int = 1) -> dict:
    """{relative path: {"bytes", "xxh3_64"}} of every world-th file of the tag, from the rank-th (all: 0, 1)."""
    files = list(_tag_files(tag_dir).items())[rank::world]
    return {rel: {"bytes": size, "xxh3_64": file_hash(os.path.join(tag_dir, rel))} for rel, size in files}


def write_manifest(tag_dir: str, step: int, layout: dict, files: Optional[dict] = None) -> None:
    """``files``: the checksummed entries (hash_share of every rank); None: hash them all here."""
    files = hash_share(tag_dir) if files is None else files
    atomic_write(os.path.join(tag_dir, MANIFEST), json.dumps(
        {"format": MANIFEST_FORMAT, "step": step, "layout": layout, "files": dict(sorted(files.items()))},
        indent=1), fsync=True)


def _entry(v) -> tuple:
    """(bytes, xxh3_64 or None) of a manifest entry of either format."""
    return (v["bytes"], v.get("xxh3_64")) if isinstance(v, dict) else (v, None)


def read_manifest(tag_dir: str) -> Optional[dict]:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verify(tag_dir: str, checksums: bool = False, rank: int = 0, world: int = 1) -> Optional[str]:
    """None if every file the manifest lists is there with its size (and, with ``checksums``, the rank-th of every
    world files hashes to its checksum); else what is wrong, in a few words naming the file."""
    try:
        manifest = read_manifest(tag_dir)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    if manifest is None:
        return f"no {MANIFEST} (the save did not finish)"
    entries = list(manifest.get("files", {}).items())
    for rel, v in entries:
        size = _entry(v)[0]
        path = os.path.join(tag_dir, rel)
        if not os.path.exists(path):
            return f"{rel} is missing"
        got = os.path.getsize(path)
        if got != size:
            return f"{rel} has {got} bytes, the manifest says {size} (truncated or rewritten)"
    if checksums:
        for rel, v in entries[rank::world]:
            want = _entry(v)[1]
            if want is not None:
                got = file_hash(os.path.join(tag_dir, rel))
                if got != want:
                    return f"{rel} has checksum {got}, the manifest says {want} (corrupted)"
    return None


def verify_collective(tag_dir: str) -> Optional[str]:
    """verify(checksums=True) with the reads shared by every rank of the process group (any rank's problem)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    why = verify(tag_dir, checksums=True, rank=rank, world=world)
    if world == 1:
        return why
    whys = [None] * world
    dist.all_gather_object(whys, why)
    return next((w for w in whys if w), None)


def step_tags(ckpt_dir: str) -> list:
    """The step######## folders of a checkpoint directory, newest first."""
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, reverse=True)


def auto_candidates(ckpt_dir: str) -> tuple:
    """(``latest`` or None, [tags to try, newest first], [warning lines]) for ``resume=auto``: tags newer than
    ``latest`` are saves that did not finish (never taken, not worth a warning); without ``latest``, tags without a
    manifest are interrupted saves."""
    if not os.path.isdir(ckpt_dir):
        return None, [], []
    warnings = []
    tags = step_tags(ckpt_dir)
    latest_path = os.path.join(ckpt_dir, LATEST)
    latest = None
    if os.path.exists(latest_path):
        with open(latest_path) as f:
            latest = f.read().strip()
        if latest not in tags:
            warnings.append(f"{latest_path} names {latest!r}, which is not a checkpoint folder in {ckpt_dir}")
    if latest is None:
        return None, [t for t in tags if os.path.exists(os.path.join(ckpt_dir, t, MANIFEST))], warnings
    return latest, [t for t in tags if t <= latest], warnings


def choose_auto(ckpt_dir: str, checksums: bool = True, verify_fn=None) -> tuple:
    """(tag or None, [warning lines]) for ``resume=auto``: the newest candidate whose sizes and (``checksums``)
    checksums match its manifest; raises CheckpointError when ``latest`` exists but no checkpoint up to it is
    complete. ``verify_fn(tag_dir) -> why | None``: the checksum check (default: ``verify`` here, alone)."""
    latest, candidates, warnings = auto_candidates(ckpt_dir)
    for t in candidates:
        tag_dir = os.path.join(ckpt_dir, t)
        why = verify(tag_dir)  # sizes first: a stat per file
        if why is None and checksums:
            why = verify_fn(tag_dir) if verify_fn is not None else verify(tag_dir, checksums=True)
        if why is None:
            return t, warnings
        warnings.append(f"checkpoint {tag_dir} skipped: {why}")
    if latest is not None:
        raise CheckpointError(no_complete(ckpt_dir, latest, warnings))
    return None, warnings


def no_complete(ckpt_dir: str, latest: str, warnings: list) -> str:
    return (f"checkpoint.resume=auto: no complete checkpoint in {ckpt_dir} ("
            + "; ".join(warnings or [f"{os.path.join(ckpt_dir, LATEST)} names {latest!r}"])
            + "); set checkpoint.resume=none to start afresh")


def prune(ckpt_dir: str, keep_last: int, keep: str, dry_run: bool = False) -> list:
    """Delete the oldest tags so that ``keep_last`` remain, never ``keep`` (the tag ``latest`` names, even if a
    newer incomplete one exists). Returns the tags deleted (or, ``dry_run``, that would be)."""
    old = [t for t in step_tags(ckpt_dir)[::-1] if t != keep]
    old = old[: max(0, len(old) + 1 - keep_last)]
    if not dry_run:
        for t in old:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    return old


def describe(tag_dir: str) -> dict:
    """What ``launch/checkpoints.py ls`` shows of a tag: step, tokens, files, bytes, layout (None where unknown)."""
    out = {"tag": os.path.basename(tag_dir), "step": None, "tokens": None, "files": None, "bytes": None,
           "layout": None}
    m = TAG_RE.match(out["tag"])
    out["step"] = int(m.group(1)) if m else None
    with contextlib.suppress(OSError, ValueError):
        manifest = read_manifest(tag_dir)
        if manifest is not None:
            sizes = [_entry(v)[0] for v in manifest.get("files", {}).values()]
            out.update(step=manifest.get("step"), files=len(sizes), bytes=sum(sizes), layout=manifest.get("layout"))
    with contextlib.suppress(Exception):  # an unreadable rank file: tokens unknown
        out["tokens"] = load_rank_file(os.path.join(tag_dir, "trainer_rank00000.pt"))["counters"]["tokens"]
    return out


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


def _one_line(e: Exception) -> str:
    """An exception as one line (torch's write errors carry a C++ context over several lines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _write_limits(folder: str) -> str:
    """Why a write may have failed, when torch's error does not say (its C++ writer reports only a position)."""
    import resource
    notes = []
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        notes.append(f"this process has a file-size limit of {soft} bytes (ulimit -f)")
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
        if free < 1 << 30:
            notes.append(f"{free} bytes free on the checkpoint disk")
    return f" ({'; '.join(notes)})" if notes else ""


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
                err = _one_line(e)
        self._agree(err, step)
        err = None
        try:
            probe = os.path.join(tag_dir, f".probe{self.rank}")
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
            os.remove(probe)
        except OSError as e:
            err = _one_line(e)
        self._agree(err, step)
        # 2. DeepSpeed writes the model/optimizer (ZeRO: one shard per rank); its own `latest` is off: ours is
        #    atomic and moves only after the manifest. The universal-checkpoint info makes the tag convertible.
        err = None
        try:
            engine.save_checkpoint(self.dir, tag=tag, client_state=universal_info(), save_latest=False)
            torch.save(plain({**rank_state, "step": step, "rng": rng_state()}), self._rank_file(tag))
            if self.rank == 0:
                config.save(os.path.join(tag_dir, "config.yaml"))
        except Exception as e:  # OSError, or torch's RuntimeError around a failed write (disk full, file-size limit)
            err = _one_line(e) + _write_limits(self.dir)
        self._agree(err, step)  # also the barrier: every rank's files are on disk
        # 3. Checksums: every rank hashes a share of the files (right after writing: mostly from the page cache).
        share, err = {}, None
        try:
            share = hash_share(tag_dir, self.rank, dist.get_world_size())
        except OSError as e:
            err = _one_line(e)
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (err, share))
        self._agree(next((e for e, _ in shares if e), None), step)
        # 4. The manifest, then `latest`; retention only after both.
        if self.rank == 0:
            try:
                write_manifest(tag_dir, step, rank_state["layout"], {k: v for _, sh in shares for k, v in sh.items()})
                write_latest(self.dir, tag)
            except OSError as e:
                err = _one_line(e)
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
        prune(self.dir, self.keep_last, keep)

    # ---- resume ----
    def resolve(self, resume: str) -> Optional[tuple]:
        """Collective: (load_dir, tag) to resume from, or None for a fresh start. Rank 0 lists the candidates
        (sizes: a stat per file), then every rank hashes a share of each candidate's files until one matches its
        manifest. Rank 0 prints a warning line for each checkpoint skipped; CheckpointError (on every rank) when
        nothing complete can be found."""
        if resume == "none":
            return None
        box = [None]
        if self.rank == 0:
            try:
                if resume == "auto":
                    latest, tags, warnings = auto_candidates(self.dir)
                    box[0] = ("ok", self.dir, [(t, verify(os.path.join(self.dir, t))) for t in tags], warnings,
                              latest)
                else:
                    path = os.path.normpath(resume)
                    if not os.path.isdir(path):
                        raise CheckpointError(f"checkpoint.resume={resume!r}: no such checkpoint directory")
                    box[0] = ("ok", os.path.dirname(path), [(os.path.basename(path), verify(path))], [], None)
            except (CheckpointError, OSError) as e:
                box[0] = ("error", str(e))
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise CheckpointError(box[0][1])
        _, load_dir, tags, warnings, latest = box[0]
        found = None
        for tag, why in tags:
            tag_dir = os.path.join(load_dir, tag)
            if why is None:
                why = verify_collective(tag_dir)
            if why is None:
                found = tag
                break
            if resume != "auto":
                raise CheckpointError(f"checkpoint.resume={resume!r}: incomplete checkpoint: {why}")
            warnings.append(f"checkpoint {tag_dir} skipped: {why}")
        if self.rank == 0:
            for w in warnings:
                _warn(w)
        if found is None and latest is not None:
            raise CheckpointError(no_complete(load_dir, latest, warnings))
        return None if found is None else (load_dir, found)

    def plan(self, resume: str, layout: dict) -> Optional[ResumePlan]:
        """Collective: every rank gets the same plan (``resolve``). Call before deepspeed.initialize: a universal
        load is a DeepSpeed config setting."""
        where = self.resolve(resume)
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
            return load_rank_file(os.path.join(plan.tag_dir, "trainer_rank00000.pt"))
        state = load_rank_file(os.path.join(plan.tag_dir, f"trainer_rank{self.rank:05d}.pt"))
        set_rng_state(state["rng"])
        return state
