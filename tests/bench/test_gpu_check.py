"""bench/gpu/check.sh --dry-run: every stage's script end to end on CPU (--tiny, gloo), so the GPU check cannot rot
between GPU sessions; plus the pieces of the GPU benchmarks that decide what is measured (bf16 master weights,
the offload gate) and the budget table in bench/gpu/README.md == the limits in check.sh.

Run: PYTHONPATH=. python -m pytest -q tests/bench/test_gpu_check.py      (the dry run is slow: minutes on 2 cores)
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench", "gpu"))

import bench_train_gpu  # noqa: E402
import timing_model  # noqa: E402

STAGES = ["pretrain", "model", "bench-ema", "bench-megalodon", "bench-attention", "bench-lm_loss", "ops-tests",
          "longest"]


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]  # every line valid JSON: the files are JSON lines


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_streams_rows(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=ROOT)
    p = subprocess.run(["bash", os.path.join(ROOT, "bench/gpu/check.sh"), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=1800)
    log = (tmp_path / "check.log").read_text()
    assert p.returncode == 0, log[-3000:]
    stages = {r["stage"]: r for r in _rows(tmp_path / "stages.json")}
    assert list(stages) == STAGES, log[-3000:]
    assert all(r["exit"] == 0 for r in stages.values()), (stages, log[-3000:])

    for name in ("pretrain_metrics.jsonl", "model.json", "ops.json", "longest.json"):
        rows = _rows(tmp_path / name)
        assert rows, name
        for r in rows:
            assert r["commit"] not in ("", "unknown"), (name, r)
            if name != "ops.json":
                assert r["flops_per_token"] > 0 and r["op_backends"], (name, r)
    assert len(_rows(tmp_path / "pretrain_metrics.jsonl")) == 3  # every step of the smoke run
    model = _rows(tmp_path / "model.json")
    assert {r["impl"] for r in model if r["status"] == "ok"} == {"megatrain", "llama", "hf"}
    assert all(r["precision"] == "bf16" for r in model)
    assert {r["bench"] for r in _rows(tmp_path / "ops.json")} >= {"ema", "cema", "tsn", "attention",
                                                                  "attention-exactness", "lm_loss",
                                                                  "lm_loss-exactness"}
    longest = _rows(tmp_path / "longest.json")
    assert {r["seq_len"] for r in longest if r["impl"] == "megatrain" and r["status"] == "ok"} == {128, 256}
    # the timing model's counts: FlexAttention traced by dynamo (MEGATRAIN_FLEX_COMPILE=eager) was counted
    compiles = _rows(tmp_path / "compiles.jsonl")
    assert any(r["stage"] == "bench-attention" and r["graphs"] > 0 for r in compiles), compiles
    assert "stage" in p.stdout and "total" in p.stdout  # the timing model's table, printed at the end


def test_readme_budget_table_equals_check_sh_limits():
    limits = timing_model.limits()
    assert list(limits) == STAGES
    text = open(os.path.join(ROOT, "bench/gpu/README.md")).read()
    table = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `([\w-]+)` \|[^\n]*\| (\d+) \|$", text, re.M)}
    assert table == limits
    assert sum(limits.values()) + 30 <= 540  # + wheel install and environment: one device call


def test_bf16_master_weights_keep_updates_below_bf16_resolution():
    # DeepSpeed bf16: bf16 parameters, the update applied to an fp32 copy; a step smaller than bf16's spacing at
    # 1.0 (2^-7) is lost in a bf16 parameter but accumulates in the master
    model = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = bench_train_gpu.MasterWeights(model, lr=1e-3, fused=False)
    for _ in range(20):
        model(torch.ones(1, 4, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        assert model.weight.grad is None and model.weight.dtype == torch.bfloat16
    assert opt.master[0].dtype == torch.float32
    assert torch.allclose(opt.master[0], torch.full((1, 4), 1 - 20e-3), atol=2e-4)
    assert torch.equal(model.weight, opt.master[0].to(torch.bfloat16))


def test_offload_pins_power_of_two_blocks_per_piece():
    cfg = bench_train_gpu.mega_config(bench_train_gpu.parse_args(["--tiny"])).replace(segment_size=0)
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    assert bench_train_gpu.offload_pinned_bytes(cfg, 3 * 64, 2) == layers * 512 * d  # 384 D bytes -> 512 D
    seg = cfg.replace(segment_size=128)
    assert bench_train_gpu.offload_pinned_bytes(seg, 1024, 2) == layers * 8 * 256 * d


@pytest.mark.slow
def test_a_killed_check_keeps_the_pretrain_steps_it_logged(tmp_path):
    # the device tool's timeout sends TERM: the EXIT trap must end the running stage and copy what the trainer
    # logged (before: the copy ran only after a successful run, under set -e)
    run = tmp_path / "run"
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHONPATH=ROOT, STAGES="pretrain", P_STEPS="100000",
               PRETRAIN_RUN=str(run))
    p = subprocess.Popen(["bash", os.path.join(ROOT, "bench/gpu/check.sh"), "--dry-run"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2:
                break
            time.sleep(1)
        assert p.poll() is None, "the pretrain stage ended before it could be killed"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
    finally:
        if p.poll() is None:
            p.kill()
    rows = _rows(tmp_path / "out" / "pretrain_metrics.jsonl")
    assert len(rows) >= 2 and all(r["commit"] and r["flops_per_token"] > 0 for r in rows)
    assert not run.exists()  # the trap cleaned up; and no trainer is left running:
    ps = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert ps == [], ps
