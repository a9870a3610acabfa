"""megatrain vs transformers 4.57.6 MEGA on CPU: train-step tokens/s and peak RSS, identical weights.

    python bench/bench_model.py                                   # L = 4K, 16K, 32K; table, then one JSON object
    python bench/bench_model.py --seq-lens 1024 --steps 1         # smoke run
    python bench/bench_model.py --json model.json --markdown      # also write JSON; print a BENCHMARKS.md table
    python bench/bench_model.py --profile megatrain --seq-lens 4096   # where one train step's time goes (top ops)

The HF model (config below, seed 0) is saved with `save_pretrained` to a temporary folder; megatrain loads that
folder with `megatrain.convert.hf.load_hf`, so both run the same weights on the same tokens (the first-step losses
are compared). Every (implementation, L) runs in its own subprocess, so `ru_maxrss` is that run's peak RSS.
A train step = forward with labels (CLM loss) + backward + AdamW step, batch 1. One untimed step first (its loss
is the one compared), then `--steps` timed steps. Reported: tokens/s on the wall clock and tokens per CPU-second
(process CPU time; robust when the machine is shared), peak RSS and RSS after loading (before the first step).
Each worker runs under an address-space limit (`--mem-limit-gb`) so that a run that does not fit fails with an
out-of-memory error instead of the kernel OOM killer taking neighbours' processes.

Config (from the issue): vocab 8192, hidden 256, 4 layers, intermediate 512, nffn 512, ema_projection 16,
shared_repr 64, chunk 256, causal (is_decoder, unidirectional EMA), dropout 0. Goals: >= 4x HF tokens/s at 16K;
<= 1/9 of HF peak memory at 32K.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("megatrain", "megatrain-ckpt", "hf")  # -ckpt: megatrain with gradient_checkpointing=True

HF_CONFIG = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=4, intermediate_size=512, nffn_hidden_size=512,
    ema_projection_size=16, shared_representation_size=64, use_chunking=True, chunk_size=256,
    is_decoder=True, bidirectional=False,
    dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0,
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", default="4096,16384,32768", help="comma-separated sequence lengths")
    ap.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS))
    ap.add_argument("--steps", type=int, default=2, help="timed train steps per run (after one untimed step)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is recorded as too slow")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space limit per run")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (for BENCHMARKS.md)")
    ap.add_argument("--profile", choices=IMPLS, default=None,
                    help="instead of the table: torch.profiler top ops of one train step of this implementation")
    # internal: one measurement
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile-step", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        a.seq_lens = [int(s) for s in a.seq_lens.split(",") if s]
    except ValueError:
        ap.error(f"--seq-lens must be comma-separated integers, got {a.seq_lens!r}")
    a.impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in a.impls if s not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown implementation {bad[0]!r} (expected some of {','.join(IMPLS)})")
    bad = [L for L in a.seq_lens if L < 1 or L % HF_CONFIG["chunk_size"]]
    if bad:
        ap.error(f"--seq-lens: {bad[0]} is not a positive multiple of chunk_size={HF_CONFIG['chunk_size']} "
                 "(transformers' chunked MEGA needs whole chunks)")
    if a.steps < 1:
        ap.error(f"--steps must be >= 1, got {a.steps}")
    return a


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- one measurement (subprocess)

def worker(a) -> dict:
    limit = int(a.mem_limit_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    torch.set_num_threads(a.threads)
    if a.worker == "hf":
        from transformers.models.deprecated.mega.modeling_mega import MegaForCausalLM
        model = MegaForCausalLM.from_pretrained(a.model_dir)
    else:
        sys.path.insert(0, ROOT)
        from megatrain.convert.hf import load_hf
        model = load_hf(a.model_dir)
        # same weights; the megatrain extra recomputes each layer in backward instead of keeping its activations
        model.config.gradient_checkpointing = a.worker == "megatrain-ckpt"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    loaded_rss = _peak_rss_mb()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.item()

    if a.profile_step:
        step()  # warm-up; then one profiled step, operators grouped by input shape
        from torch.profiler import profile
        with profile(record_shapes=True) as prof:
            step()
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
        return dict(status="ok", profile=table)
    try:
        loss0 = step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        return dict(status=f"out of memory (> {a.mem_limit_gb:g} GB address space)", loaded_rss_mb=loaded_rss,
                    peak_rss_mb=_peak_rss_mb())
    tokens = a.steps * a.seq_len
    return dict(status="ok", loss0=loss0, tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu,
                step_s=wall / a.steps, loaded_rss_mb=loaded_rss, peak_rss_mb=_peak_rss_mb())


def run_one(a, impl: str, seq_len: int, model_dir: str, profile: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--model-dir", model_dir,
           "--seq-len", str(seq_len), "--steps", str(a.steps), "--threads", str(a.threads),
           "--mem-limit-gb", str(a.mem_limit_gb)] + (["--profile-step"] if profile else [])
    base = dict(impl=impl, seq_len=seq_len)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(base, status=f"too slow (> {a.timeout} s for {a.steps + 1} steps)")
    if p.returncode != 0:
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        tail = (p.stderr.strip().splitlines() or [""])[-1][:200]
        return dict(base, status=f"failed: {why}: {tail}")
    return dict(base, **json.loads(p.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- driver

def save_hf_model(model_dir: str) -> None:
    import torch
    from transformers.models.deprecated.mega.configuration_mega import MegaConfig
    from transformers.models.deprecated.mega.modeling_mega import MegaForCausalLM
    torch.manual_seed(0)
    MegaForCausalLM(MegaConfig(**HF_CONFIG)).save_pretrained(model_dir)


def summarize(results: list[dict]) -> list[dict]:
    """Adds, to every megatrain run, its ratios to the HF run at the same L."""
    hf = {r["seq_len"]: r for r in results if r["impl"] == "hf"}
    for r in results:
        ref = hf.get(r["seq_len"], {})
        if r["impl"] == "hf":
            continue
        if r.get("status") == "ok" and ref.get("status") == "ok":
            r["speedup_vs_hf"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["cpu_speedup_vs_hf"] = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]
            r["loss0_abs_diff_vs_hf"] = abs(r["loss0"] - ref["loss0"])
        if r.get("peak_rss_mb") and ref.get("peak_rss_mb"):
            r["peak_rss_vs_hf"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
    return results


def table(results: list[dict], markdown: bool) -> str:
    head = ["L", "impl", "tok/s", "tok/CPU-s", "vs HF (wall)", "vs HF (CPU)", "peak RSS MB", "RSS vs HF",
            "|loss0 - HF|"]

    def num(r, key, spec, prefix=""):
        return prefix + format(r[key], spec) if key in r else "-"

    lines = []
    for r in results:
        ok = r.get("status") == "ok"
        lines.append([
            str(r["seq_len"]), r["impl"],
            num(r, "tokens_per_s", ".0f") if ok else r.get("status", "not run"),
            num(r, "tokens_per_cpu_s", ".0f"),
            num(r, "speedup_vs_hf", ".2f") + ("x" if "speedup_vs_hf" in r else ""),
            num(r, "cpu_speedup_vs_hf", ".2f") + ("x" if "cpu_speedup_vs_hf" in r else ""),
            num(r, "peak_rss_mb", ".0f"),
            f"1/{1 / r['peak_rss_vs_hf']:.1f}" if "peak_rss_vs_hf" in r else "-",
            num(r, "loss0_abs_diff_vs_hf", ".1e"),
        ])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def goals(results: list[dict]) -> dict:
    """The issue's goals, each from the best megatrain variant measured."""
    def best(seq_len, key, pick):
        vals = [r[key] for r in results if r["seq_len"] == seq_len and key in r]
        return pick(vals) if vals else None

    out = {}
    speed = best(16384, "speedup_vs_hf", max)
    if speed is not None:
        out["speedup_16k"] = dict(value=speed, goal=">= 4", met=speed >= 4)
    mem = best(32768, "peak_rss_vs_hf", min)
    if mem is not None:
        out["peak_rss_ratio_32k"] = dict(value=mem, goal="<= 1/9", met=mem <= 1 / 9)
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    results = []
    with tempfile.TemporaryDirectory() as model_dir:
        save_hf_model(model_dir)
        if a.profile:
            for L in a.seq_lens:
                r = run_one(a, a.profile, L, model_dir, profile=True)
                print(f"## {a.profile} L={L}: one train step\n{r.get('profile', r.get('status'))}")
            return
        for L in a.seq_lens:
            for impl in a.impls:
                r = run_one(a, impl, L, model_dir)
                print(f"# {impl} L={L}: {r.get('status')} "
                      f"{r.get('tokens_per_s', 0):.0f} tok/s, peak RSS {r.get('peak_rss_mb', 0):.0f} MB",
                      file=sys.stderr, flush=True)
                results.append(r)
    results = summarize(results)
    report = dict(
        bench="model", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     threads=a.threads),
        config=HF_CONFIG, steps=a.steps, results=results, goals=goals(results),
    )
    print(table(results, a.markdown))
    print(json.dumps(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
