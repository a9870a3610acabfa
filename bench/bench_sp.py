"""Sequence-parallel weak scaling and boundary bytes on CPU (gloo, one torch thread per rank).

    python bench/bench_sp.py                       # defaults below; prints a table, then one JSON object
    python bench/bench_sp.py --slice-len 1024 --repeats 2 --json sp.json

Weak scaling: SP=2 on 2 ranks with a 2L window vs SP=1 on 1 rank with L (same model, fwd+bwd of a CLM/MLM step
without DeepSpeed). Goal: per-rank tokens/s of SP=2 >= 90% of SP=1. A third run, two independent SP=1 ranks in
lockstep ("sp1x2", L each, no communication), has the same core/cache/memory-bandwidth sharing as SP=2 and so
separates what SP costs from what two busy processes cost each other on a small machine. Runs alternate
`--repeats` times and report medians (the machine may be shared). The gradient all-reduce over the SP group is
timed apart (it is the DP x SP gradient reduction the engine does anyway, not SP-specific).
Bytes: megatrain.parallel.sequence.COMM_STATS after one step at several slice lengths (goal: independent of L,
= layers x directions x 2*B*D*N x 4 bytes x (P-1) per way).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.parallel.env import free_port  # noqa: E402
from megatrain.model import MegaConfig, MegaForCausalLM, MegaForMaskedLM  # noqa: E402
from megatrain.parallel.protocol import sp_forward_backward  # noqa: E402
from megatrain.parallel.sequence import COMM_STATS, reset_comm_stats, sum_grads_over, validate_sp  # noqa: E402


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


def train_step(model, window, sp_group, objective) -> tuple[float, float, float]:
    """One fwd+bwd on this rank's slice of the window, through the trainer's protocol (megatrain/parallel/
    protocol.py: no logits, the fused loss); returns (fwd+bwd wall s, its CPU s, grad all-reduce wall s), max over
    all ranks. CPU time (all threads of the process) is what a rank would take with a core of its own."""
    dist.barrier()
    c0 = time.process_time()
    t0 = time.perf_counter()
    sp_forward_backward(model, window, sp_group, causal=objective == "clm")
    t1 = time.perf_counter()
    c1 = time.process_time()
    if dist.get_world_size(sp_group) > 1:
        sum_grads_over(model.parameters(), sp_group)
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    times = torch.tensor([t1 - t0, c1 - c0, t2 - t1], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return tuple(times.tolist())


def worker(rank, world, sp, port, a, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    # consecutive ranks form an SP group (as megatrain.parallel.groups); new_group is collective: all make all
    groups = [dist.new_group(list(range(g * sp, (g + 1) * sp))) for g in range(world // sp)]
    sp_group = groups[rank // sp]
    model = build_model(a)
    result = {}
    validate_sp(sp * a.slice_len, sp, a.chunk, True)
    window = make_batch(a, sp * a.slice_len)
    fb, cpu, ar = [], [], []
    for i in range(a.warmup + a.steps):
        t_fb, t_cpu, t_ar = train_step(model, window, sp_group, a.objective)
        if i >= a.warmup:
            fb.append(t_fb)
            cpu.append(t_cpu)
            ar.append(t_ar)
    result["step_s"] = statistics.median(fb)
    result["step_cpu_s"] = statistics.median(cpu)
    result["grad_allreduce_s"] = statistics.median(ar)
    if sp > 1 and a.bytes_slice_lens:
        result["bytes"] = []
        for slice_len in [int(s) for s in a.bytes_slice_lens.split(",")]:
            reset_comm_stats()
            train_step(model, make_batch(a, sp * slice_len), sp_group, a.objective)
            result["bytes"].append({"slice_len": slice_len, "forward": COMM_STATS.forward_bytes,
                                    "backward": COMM_STATS.backward_bytes, "setup": COMM_STATS.setup_bytes,
                                    "collectives": COMM_STATS.forward_calls + COMM_STATS.backward_calls})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def run(world: int, sp: int, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.start_processes(worker, args=(world, sp, free_port(), a, path), nprocs=world, join=True,
                           start_method="spawn")
        with open(path) as f:
            return json.load(f)


RUNS = {"sp1": (1, 1), "sp1x2": (2, 1), "sp2": (2, 2)}      # name: (ranks, SP size)


def main(argv=None) -> dict:
    a = parse_args(argv)
    results = {name: [] for name in RUNS}
    bytes_rows = None
    for _ in range(a.repeats):
        for name, (world, sp) in RUNS.items():
            r = run(world, sp, a)
            results[name].append(r)
            if "bytes" in r:
                bytes_rows = r["bytes"]
                a.bytes_slice_lens = ""      # bytes are deterministic: measure them once
    tokens = a.batch * a.slice_len
    dirs = 2 if a.objective == "mlm" else 1
    per_way = a.layers * dirs * 2 * a.batch * a.hidden * a.ema_dim * 4 * (2 - 1)
    n_params = sum(p.numel() for p in build_model(a).parameters())
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), torch {torch.__version__}, gloo, "
                   "1 thread/rank",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "model": {"objective": a.objective, "hidden": a.hidden, "layers": a.layers, "ema_dim": a.ema_dim,
                  "chunk": a.chunk, "vocab": a.vocab, "params": n_params, "batch": a.batch},
    }
    for name, (world, sp) in RUNS.items():
        rs = results[name]
        step = statistics.median(r["step_s"] for r in rs)
        report[name] = {"ranks": world, "sp": sp, "window": sp * a.slice_len, "tokens_per_rank": tokens,
                        "step_s": step, "tokens_per_s_per_rank": tokens / step,
                        "step_cpu_s": statistics.median(r["step_cpu_s"] for r in rs),
                        "grad_allreduce_s": statistics.median(r["grad_allreduce_s"] for r in rs),
                        "runs_step_s": [r["step_s"] for r in rs]}
    sp1, sp1x2, sp2 = report["sp1"], report["sp1x2"], report["sp2"]
    report["weak_scaling_ratio"] = sp1["step_s"] / sp2["step_s"]
    report["weak_scaling_ratio_incl_grad_allreduce"] = sp1["step_s"] / (sp2["step_s"] + sp2["grad_allreduce_s"])
    report["weak_scaling_ratio_cpu_time"] = sp1["step_cpu_s"] / sp2["step_cpu_s"]
    report["sp2_vs_two_busy_ranks"] = sp1x2["step_s"] / sp2["step_s"]
    report["bytes_per_step_sp2"] = bytes_rows
    report["bytes_formula_per_way"] = per_way

    print(f"SP weak scaling, {a.objective}, hidden {a.hidden}, {a.layers} layers, N={a.ema_dim}, chunk {a.chunk}, "
          f"batch {a.batch} ({report['machine']})")
    print(f"{'run':<7}{'ranks':>6}{'SP':>4}{'window':>8}{'tok/rank':>10}{'step ms':>10}{'tok/s/rank':>12}"
          f"{'cpu ms':>10}")
    for name in RUNS:
        r = report[name]
        print(f"{name:<7}{r['ranks']:>6}{r['sp']:>4}{r['window']:>8}{r['tokens_per_rank']:>10}"
              f"{1e3 * r['step_s']:>10.1f}{r['tokens_per_s_per_rank']:>12.0f}{1e3 * r['step_cpu_s']:>10.1f}")
    print(f"SP=2 / SP=1 per-rank tokens/s: {report['weak_scaling_ratio']:.3f} (goal >= 0.90); "
          f"with SP grad all-reduce ({1e3 * sp2['grad_allreduce_s']:.1f} ms): "
          f"{report['weak_scaling_ratio_incl_grad_allreduce']:.3f}; by CPU time: "
          f"{report['weak_scaling_ratio_cpu_time']:.3f}; vs two busy SP=1 ranks: {report['sp2_vs_two_busy_ranks']:.3f}")
    if bytes_rows:
        print(f"\nboundary bytes per step and rank, SP=2 (formula per way: {per_way})")
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
