"""Checkpoint bookkeeping: the atomic `latest` pointer, retention, the manifest and what `resume=auto` takes when the
newest checkpoint is incomplete, a failing save, and the metrics file cut back on resume. (Saving/loading through
DeepSpeed is exercised in test_resume.py.)

Run: PYTHONPATH=. python -m pytest -q tests/train/test_checkpoint.py
"""
import json
import os

import pytest

from megatrain.train.checkpoint import (MANIFEST, Checkpointer, CheckpointError, choose_auto, read_latest, tag_for,
                                        verify, write_latest, write_manifest)
from tests.dist_util import run_ranks
from megatrain.train.metrics import MetricsLogger, read_metrics, truncate_metrics


def test_latest_pointer(tmp_path):
    d = str(tmp_path)
    assert read_latest(d) is None
    os.makedirs(tmp_path / tag_for(4))
    write_latest(d, tag_for(4))
    (tmp_path / ".latest.tmp999").write_text("step000")  # debris of a crash mid-write is ignored
    assert read_latest(d) == "step00000004"
    write_latest(d, "step00000008")
    with pytest.raises(FileNotFoundError, match="names checkpoint 'step00000008', which does not exist"):
        read_latest(d)


def test_retention_keeps_last_n_and_latest(tmp_path):
    for s in (2, 4, 6, 8):
        os.makedirs(tmp_path / tag_for(s))
    ck = Checkpointer(str(tmp_path), keep_last=2, rank=0)
    ck._prune(keep=tag_for(8))
    assert sorted(os.listdir(tmp_path)) == [tag_for(6), tag_for(8)]
    os.makedirs(tmp_path / tag_for(10))  # an incomplete newer save must not push out the one `latest` names
    ck.keep_last = 1
    ck._prune(keep=tag_for(8))
    assert sorted(os.listdir(tmp_path)) == [tag_for(8)]


def fake_tag(d, step, files=("mp_rank_00_model_states.pt", "trainer_rank00000.pt", "config.yaml"), manifest=True):
    """A tag folder with a few files of distinct sizes (and its manifest, written last as the Checkpointer does)."""
    tag_dir = os.path.join(str(d), tag_for(step))
    os.makedirs(tag_dir, exist_ok=True)
    for i, f in enumerate(files):
        with open(os.path.join(tag_dir, f), "wb") as fh:
            fh.write(b"x" * (100 + i))
    if manifest:
        write_manifest(tag_dir, step, {"world_size": 1})
    return tag_dir


def test_resolve(tmp_path):
    ck = Checkpointer(str(tmp_path / "ckpt"), keep_last=2, rank=0)
    assert ck.resolve("auto") is None and ck.resolve("none") is None
    fake_tag(tmp_path / "ckpt", 3)
    write_latest(str(tmp_path / "ckpt"), tag_for(3))
    assert ck.resolve("auto") == (str(tmp_path / "ckpt"), tag_for(3))
    assert ck.resolve("none") is None
    assert ck.resolve(str(tmp_path / "ckpt" / tag_for(3)) + "/") == (str(tmp_path / "ckpt"), tag_for(3))
    with pytest.raises(CheckpointError, match="checkpoint.resume="):
        ck.resolve(str(tmp_path / "nope"))


def test_manifest_catches_truncated_and_missing_files(tmp_path):
    tag_dir = fake_tag(tmp_path, 4)
    assert verify(tag_dir) is None
    os.makedirs(os.path.join(tag_dir, "universal"))  # derived on demand, not part of the checkpoint
    (tmp_path / tag_for(4) / "universal" / "x.pt").write_bytes(b"1")
    assert verify(tag_dir) is None
    with open(os.path.join(tag_dir, "trainer_rank00000.pt"), "r+b") as f:
        f.truncate(7)
    assert verify(tag_dir) == "trainer_rank00000.pt has 7 bytes, the manifest says 101 (truncated or rewritten)"
    os.remove(os.path.join(tag_dir, "config.yaml"))
    assert verify(tag_dir) == "config.yaml is missing"
    os.remove(os.path.join(tag_dir, MANIFEST))
    assert "no manifest.json" in verify(tag_dir)


def test_auto_takes_the_newest_complete_checkpoint(tmp_path, capsys):
    d = str(tmp_path)
    for s in (2, 4, 6):
        fake_tag(d, s)
    write_latest(d, tag_for(6))
    fake_tag(d, 8, manifest=False)  # a save interrupted after `latest` moved to 6: ignored without a word
    assert choose_auto(d) == (tag_for(6), [])
    os.remove(os.path.join(d, tag_for(6), "trainer_rank00000.pt"))
    with open(os.path.join(d, tag_for(4), "mp_rank_00_model_states.pt"), "r+b") as f:
        f.truncate(10)
    tag, warnings = choose_auto(d)
    assert tag == tag_for(2)
    assert warnings == [f"checkpoint {d}/{tag_for(6)} skipped: trainer_rank00000.pt is missing",
                        f"checkpoint {d}/{tag_for(4)} skipped: mp_rank_00_model_states.pt has 10 bytes, the manifest "
                        f"says 100 (truncated or rewritten)"]
    ck = Checkpointer(d, keep_last=2, rank=0)
    assert ck.resolve("auto") == (d, tag_for(2))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("resume: warning: checkpoint") and "is missing" in err[0]
    os.remove(os.path.join(d, tag_for(2), MANIFEST))
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*step00000006.*step00000002 skipped: no "
                                              r"manifest.json.*checkpoint.resume=none"):
        choose_auto(d)
    with pytest.raises(CheckpointError, match="incomplete checkpoint: trainer_rank00000.pt is missing"):
        ck.resolve(os.path.join(d, tag_for(6)))  # an explicit path is taken as it is, or refused


def test_auto_without_latest(tmp_path):
    d = str(tmp_path)
    fake_tag(d, 4, manifest=False)  # killed during the first save: fresh start
    assert choose_auto(d) == (None, [])
    fake_tag(d, 2)  # complete, but the kill came before `latest` moved: take it
    assert choose_auto(d) == (tag_for(2), [])
    write_latest(d, tag_for(9))  # a pointer to nothing: say so, fall back
    tag, warnings = choose_auto(d)
    assert tag == tag_for(2) and "names 'step00000009', which is not a checkpoint folder" in warnings[0]


def test_checkpoint_without_manifest_is_never_taken(tmp_path):
    """0.1.0, the only release, writes manifests: a tag `latest` names without one is an incomplete save."""
    d = str(tmp_path)
    fake_tag(d, 4, manifest=False)
    write_latest(d, tag_for(4))
    with pytest.raises(CheckpointError, match=r"step00000004 skipped: no manifest.json"):
        choose_auto(d)
    with pytest.raises(CheckpointError, match="incomplete checkpoint: no manifest.json"):
        Checkpointer(d, keep_last=2, rank=0).resolve(os.path.join(d, tag_for(4)))


class _FakeEngine:
    """Writes one model file like DeepSpeed's save_checkpoint would; ``fail_on`` ranks raise ENOSPC instead."""

    def __init__(self, rank, fail):
        self.rank, self.fail = rank, fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        if self.fail:
            raise OSError(28, "No space left on device")
        with open(os.path.join(save_dir, tag, f"zero_pp_rank_{self.rank}_optim_states.pt"), "wb") as f:
            f.write(b"w" * 1000)


class _Cfg:
    def save(self, path):
        with open(path, "w") as f:
            f.write("run_dir: x\n")


def _save_twice(rank, world, d):
    """Step 2 saves; at step 4 rank 1's write fails (disk full): every rank gets the same one-line error."""
    ck = Checkpointer(d, keep_last=2, rank=rank)
    state = {"loader": {}, "counters": {}, "layout": {"world_size": world, "sp_size": 1, "dp_size": world,
                                                       "zero_stage": 2}}
    ck.save(_FakeEngine(rank, fail=False), 2, state, _Cfg())
    try:
        ck.save(_FakeEngine(rank, fail=rank == 1), 4, state, _Cfg())
    except CheckpointError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_failed_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path):
    d = str(tmp_path / "ckpt")
    errors = run_ranks(_save_twice, 2, d)
    assert errors[0] == errors[1] and errors[0] == (
        f"checkpoint save at step 4 into {d} failed on rank 1: OSError: [Errno 28] No space left on device; "
        f"{d}/latest still names step00000002")
    assert read_latest(d) == tag_for(2) and verify(os.path.join(d, tag_for(2))) is None
    assert choose_auto(d) == (tag_for(2), [])  # the half-written step 4 is newer than `latest`: ignored


def test_metrics_truncated_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    truncate_metrics(str(path), 4)
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4]
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, resume_step=2, print_every=100)
    log.log({"step": 3, "loss": 0.5, "lr": 1e-3, "grad_norm": None, "tokens": 9, "tokens_per_s": 1.0,
             "skipped_steps": 0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, resume_step=0).close()  # fresh run: empty
    assert read_metrics(str(path)) == []


def test_checksums_catch_a_flipped_byte_and_auto_falls_back(tmp_path, capsys):
    """A bit flip inside a file of the right size: the manifest's xxh3-64 names the file; resume=auto takes the
    previous checkpoint with a warning line naming it. A manifest of the first format (sizes only) still verifies."""
    d = str(tmp_path)
    for s in (2, 4):
        fake_tag(d, s)
    write_latest(d, tag_for(4))
    path = os.path.join(d, tag_for(4), "mp_rank_00_model_states.pt")
    with open(path, "r+b") as f:
        f.seek(50)
        f.write(b"y")
    assert verify(os.path.join(d, tag_for(4))) is None  # sizes alone cannot see it
    assert verify(os.path.join(d, tag_for(4)), checksums=True).startswith(
        "mp_rank_00_model_states.pt has checksum ")
    assert Checkpointer(d, keep_last=2, rank=0).resolve("auto") == (d, tag_for(2))
    err = capsys.readouterr().err
    assert f"checkpoint {d}/{tag_for(4)} skipped: mp_rank_00_model_states.pt has checksum" in err and \
        "(corrupted)" in err
    manifest = os.path.join(d, tag_for(2), MANIFEST)
    m = json.load(open(manifest))
    json.dump({**m, "format": 1, "files": {k: v["bytes"] for k, v in m["files"].items()}}, open(manifest, "w"))
    assert verify(os.path.join(d, tag_for(2)), checksums=True) is None


def test_rank_file_loads_with_weights_only(tmp_path):
    """The trainer's own file holds tensors and plain values only: RNG states (numpy's too) survive the round trip."""
    import random
    import numpy as np
    import torch
    from megatrain.train.checkpoint import load_rank_file, plain, rng_state, set_rng_state
    np.random.seed(3)
    random.seed(3)
    state = {"loader": {"position": np.int64(7), "cursors": np.arange(3)}, "rng": rng_state()}
    torch.save(plain(state), tmp_path / "r.pt")
    back = torch.load(tmp_path / "r.pt", weights_only=True)
    assert back["loader"] == {"position": 7, "cursors": [0, 1, 2]}
    want = (np.random.rand(), random.random())
    set_rng_state(load_rank_file(str(tmp_path / "r.pt"))["rng"])
    assert (np.random.rand(), random.random()) == want
    legacy = {"rng": {**rng_state(), "numpy": np.random.get_state()}}  # written before: numpy's ndarray
    torch.save(legacy, tmp_path / "old.pt")
    set_rng_state(load_rank_file(str(tmp_path / "old.pt"))["rng"])


@pytest.mark.slow
def test_checkpoints_cli(tmp_path, tiny_shards):
    """launch/checkpoints.py on a real run: ls (step, tokens, size, latest), verify (a flipped byte: exit 1, the
    file named), prune (latest stays), to-universal; bad input: one line, exit 2."""
    import subprocess
    import sys
    from tests.dist_util import launch_pretrain, pretrain_env, wait_all
    from tests.tiny_data import ROOT, TINY
    d = tmp_path / "run"
    d.mkdir()
    wait_all(launch_pretrain(["--config", TINY, f"data.shards={tiny_shards}", f"run_dir={d}", "train.max_steps=6",
                              "checkpoint.every_steps=2", "checkpoint.keep_last=3", "parallel.zero_stage=1",
                              "logging.tensorboard=false"], 1, str(d)), 300, str(d))

    def cli(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "checkpoints.py"), *args],
                              capture_output=True, text=True, env=pretrain_env(), timeout=300)

    out = cli(str(d), "ls")
    rows = out.stdout.splitlines()[1:]
    assert out.returncode == 0 and [r.split()[:3] for r in rows] == \
        [[tag_for(s), str(s), str(s * 64)] for s in (2, 4, 6)] and rows[-1].endswith("<- latest")
    assert cli(str(d), "verify").stdout.splitlines() == [f"{tag_for(s)}: ok" for s in (2, 4, 6)]
    with open(d / "checkpoints" / tag_for(4) / "trainer_rank00000.pt", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    bad = cli(str(d / "checkpoints"), "verify", tag_for(4))
    assert bad.returncode == 1 and bad.stdout.startswith(f"{tag_for(4)}: trainer_rank00000.pt has checksum")
    assert cli(str(d), "prune", "--keep", "1").stdout.strip() == f"deleted: {tag_for(2)}, {tag_for(4)}"
    assert sorted(x for x in os.listdir(d / "checkpoints") if x.startswith("step")) == [tag_for(6)]
    conv = cli(str(d), "to-universal")
    assert conv.returncode == 0 and os.path.isdir(d / "checkpoints" / tag_for(6) / "universal"), conv.stderr
    for args, msg in (([str(tmp_path / "none"), "ls"], "no such folder"), ([str(d), "verify", "step9"], "TAG step9"),
                      ([str(d), "prune", "--keep", "0"], "--keep 0")):
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr
