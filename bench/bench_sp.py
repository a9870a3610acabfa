"""Sequence-parallel weak scaling and boundary bytes on CPU (gloo, one torch thread per rank).

    python bench/bench_sp.py                       # defaults below; prints a table, then one JSON object
    python bench/bench_sp.py --slice-len 1024 --repeats 2 --json sp.json

Weak scaling: SP=2 on 2 ranks with a 2L window vs SP=1 on 1 rank with L (same model, fwd+bwd of a CLM/MLM step
without DeepSpeed). Goal: per-rank tokens/s of SP=2 >= 90% of SP=1. Runs alternate SP=1 / SP=2 `--repeats` times
and report medians, because the machine may be shared. The gradient all-reduce over the SP group is timed apart
(it is the DP x SP gradient reduction the engine does anyway, not SP-specific).
Bytes: megatrain.parallel.sequence.COMM_STATS after one step at several slice lengths (goal: independent of L,
= layers x directions x 2*B*D*N x 4 bytes x (P-1) per way).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.data import sp_slice  # noqa: E402
from megatrain.model import MegaConfig, MegaForCausalLM, MegaForMaskedLM  # noqa: E402
from megatrain.parallel.sequence import (COMM_STATS, make_ema_boundary, reduce_sp_loss,  # noqa: E402
                                         reset_comm_stats, sum_grads_over, validate_sp)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slice-len", type=int, default=2048, help="tokens per rank (SP=1 window = this)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ema-dim", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--objective", choices=("clm", "mlm"), default="clm")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating SP=1 / SP=2 runs")
    ap.add_argument("--bytes-slice-lens", default="256,1024,4096")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    return ap.parse_args(argv)


def build_model(a) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = MegaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                     intermediate_size=2 * a.hidden, nffn_hidden_size=2 * a.hidden, ema_projection_size=a.ema_dim,
                     shared_representation_size=a.hidden // 2, use_chunking=True, chunk_size=a.chunk,
                     bidirectional=a.objective == "mlm", is_decoder=a.objective == "clm", dropout_prob=0.0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)
    return (MegaForCausalLM if a.objective == "clm" else MegaForMaskedLM)(cfg).train()


def make_batch(a, window: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, a.vocab, (a.batch, window), generator=g)
    if a.objective == "clm":
        labels = torch.cat([ids[:, 1:], torch.full((a.batch, 1), -100)], dim=1)    # pre-shifted, as the loader
    else:
        masked = torch.rand(a.batch, window, generator=g) < 0.15
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "labels": labels}


def train_step(model, piece, group, objective) -> tuple[float, float, float]:
    """One fwd+bwd on this rank's slice; returns (fwd+bwd wall s, its CPU s, grad all-reduce wall s), max over
    ranks. CPU time (all threads of the process) is what a rank would take on a machine of its own: on a shared
    machine wall time also counts waiting for a core."""
    dist.barrier(group)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = model(piece["input_ids"], labels=piece["labels"], loss_reduction="sum",
                ema_boundary=make_ema_boundary(group), **({"labels_shifted": True} if objective == "clm" else {}))
    reduce_sp_loss(out.loss, out.num_loss_tokens, group).backward_loss.backward()
    t1 = time.perf_counter()
    c1 = time.process_time()
    if dist.get_world_size(group) > 1:
        sum_grads_over(model.parameters(), group)
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    times = torch.tensor([t1 - t0, c1 - c0, t2 - t1], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return tuple(times.tolist())


def worker(rank, world, port, a, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD
    model = build_model(a)
    result = {}
    window = world * a.slice_len
    validate_sp(window, world, a.chunk, True)
    piece = sp_slice(make_batch(a, window), rank, world)
    fb, cpu, ar = [], [], []
    for i in range(a.warmup + a.steps):
        t_fb, t_cpu, t_ar = train_step(model, piece, group, a.objective)
        if i >= a.warmup:
            fb.append(t_fb)
            cpu.append(t_cpu)
            ar.append(t_ar)
    result["step_s"] = statistics.median(fb)
    result["step_cpu_s"] = statistics.median(cpu)
    result["grad_allreduce_s"] = statistics.median(ar)
    if world > 1 and a.bytes_slice_lens:
        result["bytes"] = []
        for slice_len in [int(s) for s in a.bytes_slice_lens.split(",")]:
            p = sp_slice(make_batch(a, world * slice_len), rank, world)
            reset_comm_stats()
            train_step(model, p, group, a.objective)
            result["bytes"].append({"slice_len": slice_len, "forward": COMM_STATS.forward_bytes,
                                    "backward": COMM_STATS.backward_bytes, "setup": COMM_STATS.setup_bytes,
                                    "collectives": COMM_STATS.forward_calls + COMM_STATS.backward_calls})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.start_processes(worker, args=(world, free_port(), a, path), nprocs=world, join=True,
                           start_method="spawn")
        with open(path) as f:
            return json.load(f)


def main(argv=None) -> dict:
    a = parse_args(argv)
    runs = {1: [], 2: []}
    bytes_rows = None
    for _ in range(a.repeats):
        for world in (1, 2):
            r = run(world, a)
            runs[world].append(r)
            if world > 1 and "bytes" in r:
                bytes_rows = r["bytes"]
                a.bytes_slice_lens = ""      # bytes are deterministic: measure them once
    tokens = a.batch * a.slice_len
    step1 = statistics.median(r["step_s"] for r in runs[1])
    step2 = statistics.median(r["step_s"] for r in runs[2])
    ar2 = statistics.median(r["grad_allreduce_s"] for r in runs[2])
    cpu1 = statistics.median(r["step_cpu_s"] for r in runs[1])
    cpu2 = statistics.median(r["step_cpu_s"] for r in runs[2])
    dirs = 2 if a.objective == "mlm" else 1
    per_way = a.layers * dirs * 2 * a.batch * a.hidden * a.ema_dim * 4 * (2 - 1)
    n_params = sum(p.numel() for p in build_model(a).parameters())
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), torch {torch.__version__}, gloo, "
                   "1 thread/rank",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "model": {"objective": a.objective, "hidden": a.hidden, "layers": a.layers, "ema_dim": a.ema_dim,
                  "chunk": a.chunk, "vocab": a.vocab, "params": n_params, "batch": a.batch},
        "sp1": {"ranks": 1, "window": a.slice_len, "tokens_per_rank": tokens, "step_s": step1,
                "tokens_per_s_per_rank": tokens / step1, "step_cpu_s": cpu1, "runs_step_s": [r["step_s"] for r in runs[1]]},
        "sp2": {"ranks": 2, "window": 2 * a.slice_len, "tokens_per_rank": tokens, "step_s": step2,
                "tokens_per_s_per_rank": tokens / step2, "step_cpu_s": cpu2, "grad_allreduce_s": ar2,
                "runs_step_s": [r["step_s"] for r in runs[2]]},
        "weak_scaling_ratio": step1 / step2,
        "weak_scaling_ratio_incl_grad_allreduce": step1 / (step2 + ar2),
        "weak_scaling_ratio_cpu_time": cpu1 / cpu2,
        "bytes_per_step_sp2": bytes_rows,
        "bytes_formula_per_way": per_way,
    }
    print(f"SP weak scaling, {a.objective}, hidden {a.hidden}, {a.layers} layers, N={a.ema_dim}, chunk {a.chunk}, "
          f"batch {a.batch} ({report['machine']})")
    print(f"{'run':<6}{'ranks':>6}{'window':>8}{'tok/rank':>10}{'step ms':>10}{'tok/s/rank':>12}{'cpu ms':>10}")
    for name in ("sp1", "sp2"):
        r = report[name]
        print(f"{name:<6}{r['ranks']:>6}{r['window']:>8}{r['tokens_per_rank']:>10}{1e3 * r['step_s']:>10.1f}"
              f"{r['tokens_per_s_per_rank']:>12.0f}{1e3 * r['step_cpu_s']:>10.1f}")
    print(f"ratio SP=2/SP=1 per-rank tokens/s: {report['weak_scaling_ratio']:.3f} (goal >= 0.90); "
          f"with SP grad all-reduce ({1e3 * ar2:.1f} ms): {report['weak_scaling_ratio_incl_grad_allreduce']:.3f}; "
          f"by CPU time per rank: {report['weak_scaling_ratio_cpu_time']:.3f}")
    if bytes_rows:
        print(f"\nboundary bytes per step, SP=2 (formula per way: {per_way})")
        print(f"{'slice L':>8}{'forward':>10}{'backward':>10}{'setup':>8}{'collectives':>13}")
        for row in bytes_rows:
            print(f"{row['slice_len']:>8}{row['forward']:>10}{row['backward']:>10}{row['setup']:>8}"
                  f"{row['collectives']:>13}")
    print(json.dumps(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
