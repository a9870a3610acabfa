"""Optional W&B logging (logging.wandb, offline mode): the run files hold the training and evaluation scalars.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_wandb_logging.py        (needs pip install 'megatrain[wandb]')
"""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.dist_util import PRETRAIN, ROOT, pretrain_env
from tests.tiny_data import TINY, write_shards

pytest.importorskip("wandb")


def read_wandb_history(path: str) -> list:
    """History rows of an offline run file (run-ID.wandb: a LevelDB-style log of 32 KB blocks, a 7-byte file
    header, 7-byte chunk headers crc32/length/type; each record a wandb Record protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw, block, pos, buf, rows = open(path, "rb").read(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf, pos = buf + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.mark.slow
def test_offline_run_files_hold_train_and_eval_scalars(tmp_path):
    train, held = write_shards(str(tmp_path / "train"), 40, 0), write_shards(str(tmp_path / "held"), 12, 3)
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, PRETRAIN, "--config", TINY, f"data.shards={train}", f"run_dir={run}",
                        "train.max_steps=2", "train.warmup_steps=0", f"eval.shards={held}", "eval.every_steps=1",
                        "eval.tokens=64", "logging.tensorboard=false", "logging.wandb.project=megatrain-test",
                        "logging.wandb.mode=offline"], cwd=ROOT, env=pretrain_env({"WANDB_SILENT": "true"}),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1 and os.path.basename(files[0]) == f"run-{(run / 'wandb_id').read_text().strip()}.wandb"
    rows = read_wandb_history(files[0])
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train_loss = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    eval_loss = {r["_step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert train_loss == {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert eval_loss == {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m} and set(eval_loss) == {1, 2}
