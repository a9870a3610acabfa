"""Long context on one CPU process: peak RSS and tokens/s of one train step from 32K to 1M tokens (issue #9).

    python bench/bench_long_context.py                                  # L = 32K..1M, megatrain + HF where it fits
    python bench/bench_long_context.py --lengths 32768,131072 --budget-gb 6 --out /tmp/lc.json   # small, quick
    python bench/bench_long_context.py --find-max-gb 22 --out lc.json  # + the largest L whose step fits in 22 GB
    python bench/bench_long_context.py --from-json lc.json --out lc2.json   # table + plot from an earlier run

A train step = forward with labels (CLM loss, `return_logits=False`: blockwise loss, no [L, V] logits) + backward
+ AdamW step, batch 1, after one untimed warm-up step (`--warmup`). The benchmark config of bench/bench_model.py
(vocab 8192, hidden 256, 4 layers, intermediate 512, NFFN 512, EMA dim 16, shared 64, chunk 256, causal,
dropout 0), gradient checkpointing on, segmented layers (`--segment-size`, MegaConfig.segment_size). transformers
4.57.6 MEGA (same weights via save_pretrained + load_hf; `use_cache=False`) runs at the lengths whose estimated
peak (HF_BYTES_PER_TOKEN) fits `--budget-gb`. Every measurement is its own subprocess (its `ru_maxrss` is that
run's peak RSS) under an address-space limit of `--budget-gb`, so a run that does not fit is recorded as out of
memory instead of waking the kernel's OOM killer. `--allocator process` (the default) measures what a user's
process gets: no MALLOC_* variable, and megatrain's own choice applied by the process itself at start
(megatrain/host_alloc.py, as launch/pretrain.py does: tcmalloc where the system has it, else glibc's malloc set so
that freed large tensors go back to the kernel; MEGATRAIN_MALLOC=system measures the latter); `--allocator glibc`
leaves glibc's defaults (its dynamic mmap threshold lets 1-32 MiB tensors fragment the arenas), `--allocator env64k`
is the old `MALLOC_MMAP_THRESHOLD_=64 KiB` environment setting.
Output: a table, one JSON object (`--out`, plus the PNG plot next to it: peak RSS and tokens/s against L, both
implementations) and the goals: L = 1,048,576 in <= 8 GB; tokens/s at 1M >= 80% of 32K; the largest L in 22 GB.
`--impls megalodon`: megatrain's Megalodon at the same sizes (bench_model.MEGALODON_CONFIG), checkpointed and
segmented the same way; its 1M-token step has the same <= 8 GB goal.
The per-token cost (slope of peak RSS between the two longest megatrain runs) extrapolates to lengths not run.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_model import (HF_CONFIG, LIVE_MEMORY_ENV, MEGALODON_CONFIG, _peak_rss_mb, megalodon_model,  # noqa: E402
                         save_hf_model)  # (shared with the model bench)

DEFAULT_LENGTHS = (32768, 131072, 262144, 524288, 1048576)
IMPLS = ("megatrain", "hf", "megalodon")
# transformers' MEGA train step at this config: ~0.5 MB per token (it stops near 48K tokens in 24 GB)
HF_BYTES_PER_TOKEN = 24 * 2**30 / 48_000
GOAL_1M_GB, GOAL_SPEED_RATIO = 8.0, 0.8
ALLOCATORS = ("process", "glibc", "env64k")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated L")
    ap.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS))
    ap.add_argument("--budget-gb", type=float, default=22.0,
                    help="address-space limit per run; HF only runs where its estimated peak fits")
    ap.add_argument("--segment-size", type=int, default=16384, help="MegaConfig.segment_size (0 = unsegmented)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed train steps before the timed one(s)")
    ap.add_argument("--steps", type=int, default=1, help="timed train steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    ap.add_argument("--find-max-gb", type=float, default=None,
                    help="also find the largest L (a multiple of --segment-size) whose step fits in this many GB: "
                         "extrapolated from the per-token cost, then run (stepping down until it fits)")
    ap.add_argument("--allocator", choices=ALLOCATORS, default="process",
                    help="process: megatrain's own glibc settings (megatrain.host_alloc; what launch/pretrain.py "
                         "applies: the default process of a user); glibc: glibc's defaults untouched; env64k: "
                         "MALLOC_MMAP_THRESHOLD_=64 KiB in the environment (the old setting)")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="with --allocator process: this M_MMAP_THRESHOLD in bytes instead of megatrain's default")
    ap.add_argument("--out", default=None, help="write the JSON here and the plot next to it (.png)")
    ap.add_argument("--from-json", default=None, help="render an earlier --out JSON (table, goals, plot)")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        a.lengths = [int(s) for s in a.lengths.split(",") if s]
    except ValueError:
        ap.error(f"--lengths: expected comma-separated integers, got {a.lengths!r}")
    a.impls = [s for s in a.impls.split(",") if s]
    if any(i not in IMPLS for i in a.impls):
        ap.error(f"--impls: expected some of {','.join(IMPLS)}, got {','.join(a.impls)}")
    chunk = HF_CONFIG["chunk_size"]
    bad = [L for L in a.lengths if L < 1 or L % chunk]
    if bad:
        ap.error(f"--lengths: {bad[0]} is not a positive multiple of chunk_size={chunk}")
    if a.segment_size < 0 or a.segment_size % chunk:
        ap.error(f"--segment-size: {a.segment_size} is not 0 or a multiple of chunk_size={chunk}")
    if a.budget_gb <= 0 or a.steps < 1 or a.warmup < 0:
        ap.error("--budget-gb must be > 0, --steps >= 1, --warmup >= 0")
    return a


# the user's variables that change host allocation, recorded with the results (a preloaded malloc, PyTorch's THP)
ALLOCATOR_ENV = ("LD_PRELOAD", "MEGATRAIN_MALLOC", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")


# ---------------------------------------------------------------- one measurement (subprocess)

def worker(a) -> dict:
    sys.path.insert(0, ROOT)
    applied = {}
    if a.allocator == "process":  # first, as launch/pretrain.py does it: tcmalloc where installed (a re-exec of
        # this worker), then the settings, before torch allocates anything
        from megatrain.host_alloc import DEFAULT_MMAP_THRESHOLD, configure_host_allocator, preload_fast_malloc
        preload_fast_malloc()
        applied = configure_host_allocator(a.mmap_threshold or DEFAULT_MMAP_THRESHOLD)
    limit = int(a.budget_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    torch.set_num_threads(a.threads)
    if a.worker == "megalodon":
        model = megalodon_model(segment_size=a.segment_size)
        from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing
        apply_checkpointing(model, CheckpointPolicy())
        kw = {"return_logits": False}
    elif a.worker == "hf":
        from transformers.models.deprecated.mega.modeling_mega import MegaForCausalLM
        model = MegaForCausalLM.from_pretrained(a.model_dir)
        model.config.use_cache = False  # its use_cache=True training path differs (see BRIEF: truncation)
        kw = {"use_cache": False}
    else:
        from megatrain.hf import load_hf
        model = load_hf(a.model_dir)
        model.config.segment_size = a.segment_size
        model.config.validate()
        from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing
        apply_checkpointing(model, CheckpointPolicy())   # as the trainer does for model.gradient_checkpointing
        kw = {"return_logits": False}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    loaded = _peak_rss_mb()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
        opt.step()
        return loss.item()

    try:
        losses = [step() for _ in range(a.warmup)]
        wall, cpu = time.perf_counter(), time.process_time()
        losses += [step() for _ in range(a.steps)]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        return dict(status=f"out of memory (> {a.budget_gb:g} GB)", loaded_rss_mb=loaded, peak_rss_mb=_peak_rss_mb())
    tokens = a.steps * a.seq_len
    return dict(status="ok", loss0=losses[0], loaded_rss_mb=loaded, host_alloc=applied,
                malloc=os.environ.get("LD_PRELOAD") or "glibc",
                peak_rss_mb=_peak_rss_mb(), tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu,
                step_s=wall / a.steps)


def run_one(a, impl: str, seq_len: int, model_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--model-dir", model_dir,
           "--seq-len", str(seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(a.threads), "--budget-gb", str(a.budget_gb), "--segment-size", str(a.segment_size),
           "--allocator", a.allocator, *(["--mmap-threshold", str(a.mmap_threshold)] if a.mmap_threshold else [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # a user's default process...
    if a.allocator == "env64k":
        env.update(LIVE_MEMORY_ENV)                                              # ...unless asked otherwise
    base = dict(impl=impl, seq_len=seq_len, segment_size=a.segment_size if impl != "hf" else None)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return dict(base, status=f"too slow (> {a.timeout} s)")
    if p.returncode != 0:
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        tail = (p.stderr.strip().splitlines() or [""])[-1][:200]
        return dict(base, status=f"failed: {why}: {tail}")
    return dict(base, **json.loads(p.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- report

def per_token(results: list[dict], impl: str = "megatrain") -> dict | None:
    """Peak RSS = intercept + slope * L through the two longest successful runs of `impl`."""
    ok = sorted((r for r in results if r["impl"] == impl and r.get("status") == "ok"),
                key=lambda r: r["seq_len"])
    if len(ok) < 2:
        return None
    (l0, m0), (l1, m1) = [(r["seq_len"], r["peak_rss_mb"] * 2**20) for r in ok[-2:]]
    slope = (m1 - m0) / (l1 - l0)
    return dict(bytes_per_token=slope, intercept_mb=(m0 - slope * l0) / 2**20, from_lengths=[l0, l1])


def extrapolate_gb(fit: dict, seq_len: int) -> float:
    return (fit["intercept_mb"] * 2**20 + fit["bytes_per_token"] * seq_len) / 2**30


def goals(results: list[dict], fit: dict | None, max_fit: dict | None) -> dict:
    mt = {r["seq_len"]: r for r in results if r["impl"] == "megatrain" and r.get("status") == "ok"}
    out = {}
    for impl, key, impl_fit in (("megatrain", "peak_1m_gb", fit),
                                ("megalodon", "megalodon_peak_1m_gb", per_token(results, "megalodon"))):
        runs = {r["seq_len"]: r for r in results if r["impl"] == impl and r.get("status") == "ok"}
        if 1048576 in runs:
            gb = runs[1048576]["peak_rss_mb"] / 1024
            out[key] = dict(value=gb, goal=f"<= {GOAL_1M_GB:g}", met=gb <= GOAL_1M_GB, measured=True)
        elif impl_fit is not None:
            gb = extrapolate_gb(impl_fit, 1048576)
            out[key] = dict(value=gb, goal=f"<= {GOAL_1M_GB:g}", met=gb <= GOAL_1M_GB, measured=False)
    if 1048576 in mt and 32768 in mt:
        ratio = mt[1048576]["tokens_per_s"] / mt[32768]["tokens_per_s"]
        out["tokens_per_s_1m_over_32k"] = dict(value=ratio, goal=f">= {GOAL_SPEED_RATIO}",
                                               met=ratio >= GOAL_SPEED_RATIO)
    if max_fit is not None:
        out["largest_l"] = max_fit
    return out


def table(results: list[dict]) -> str:
    head = ["L", "impl", "status", "peak RSS GB", "loaded GB", "KB/token", "tok/s", "tok/CPU-s", "step s", "loss0"]
    lines = []
    for r in sorted(results, key=lambda r: (r["seq_len"], r["impl"])):
        ok = r.get("status") == "ok"
        f = (lambda k, spec: format(r[k], spec) if ok and k in r else "-")  # noqa: E731
        kb = f"{(r['peak_rss_mb'] - r['loaded_rss_mb']) * 1024 / r['seq_len']:.2f}" if ok else "-"
        lines.append([str(r["seq_len"]), r["impl"], r.get("status", "?")[:40],
                      f"{r['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in r else "-",
                      f"{r['loaded_rss_mb'] / 1024:.2f}" if "loaded_rss_mb" in r else "-", kb,
                      f("tokens_per_s", ".0f"), f("tokens_per_cpu_s", ".0f"), f("step_s", ".1f"), f("loss0", ".5f")])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def plot(results: list[dict], path: str, threads: int = 1, budget_lines=(GOAL_1M_GB, 22.0)) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_m, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, style in (("megatrain", "o-"), ("hf", "s--"), ("megalodon", "^-.")):
        ok = sorted((r for r in results if r["impl"] == impl and r.get("status") == "ok"), key=lambda r: r["seq_len"])
        if not ok:
            continue
        label = {"megatrain": "megatrain MEGA", "megalodon": "megatrain Megalodon"}.get(impl, "transformers 4.57.6 MEGA")
        xs = [r["seq_len"] for r in ok]
        ax_m.plot(xs, [r["peak_rss_mb"] / 1024 for r in ok], style, label=label)
        ax_s.plot(xs, [r["tokens_per_s"] for r in ok], style, label=label)
    for gb in budget_lines:
        ax_m.axhline(gb, color="grey", lw=0.8, ls=":")
        ax_m.annotate(f"{gb:g} GB", xy=(0.01, gb), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                      color="grey")
    for ax, title in ((ax_m, "peak RSS (GB), one train step"), (ax_s, f"train tokens / s ({threads} thread{'s' * (threads > 1)})")):
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def find_max(a, fit: dict, gb: float, model_dir: str, results: list[dict]) -> dict:
    """Largest multiple of the segment size whose step peaks at <= `gb` of RSS, among at most 4 tries: the
    extrapolation first, then 5% shorter per miss. (The runs keep the --budget-gb address-space limit: address
    space exceeds RSS by the libraries' mappings, so it cannot be the criterion.)"""
    unit = a.segment_size or HF_CONFIG["chunk_size"]
    guess = int((gb * 2**30 - fit["intercept_mb"] * 2**20) / fit["bytes_per_token"]) // unit * unit
    for _ in range(4):
        r = run_one(a, "megatrain", guess, model_dir)
        results.append(r)
        print(f"# max-fit try L={guess}: {r.get('status')} {r.get('peak_rss_mb', 0) / 1024:.2f} GB",
              file=sys.stderr, flush=True)
        if r.get("status") == "ok" and r["peak_rss_mb"] / 1024 <= gb:
            return dict(value=guess, gb=gb, measured=True, peak_gb=r["peak_rss_mb"] / 1024)
        guess = int(guess * 0.95) // unit * unit
    return dict(value=None, gb=gb, measured=False, note="no try fitted")


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.from_json:
        with open(a.from_json) as f:
            report = json.load(f)
        results, max_fit = report["results"], report.get("goals", {}).get("largest_l")
        meta = {k: v for k, v in report.items() if k not in ("results", "goals", "per_token")}
    else:
        results, max_fit = [], None
        with tempfile.TemporaryDirectory() as model_dir:
            save_hf_model(model_dir)
            for L in a.lengths:
                for impl in a.impls:
                    if impl == "hf" and L * HF_BYTES_PER_TOKEN > a.budget_gb * 2**30:
                        results.append(dict(impl=impl, seq_len=L, status=f"skipped: est. "
                                            f"{L * HF_BYTES_PER_TOKEN / 2**30:.0f} GB > budget {a.budget_gb:g} GB"))
                        continue
                    r = run_one(a, impl, L, model_dir)
                    print(f"# {impl} L={L}: {r.get('status')} {r.get('tokens_per_s', 0):.0f} tok/s, "
                          f"peak RSS {r.get('peak_rss_mb', 0) / 1024:.2f} GB", file=sys.stderr, flush=True)
                    results.append(r)
            fit = per_token(results)
            if a.find_max_gb is not None and fit is not None:
                max_fit = find_max(a, fit, a.find_max_gb, model_dir, results)
        meta = dict(bench="long_context",
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    machine=dict(platform=platform.platform(), cpus=os.cpu_count(), threads=a.threads),
                    config=dict(HF_CONFIG, gradient_checkpointing=True, segment_size=a.segment_size),
                    megalodon_config=MEGALODON_CONFIG,
                    warmup=a.warmup, steps=a.steps, budget_gb=a.budget_gb,
                    allocator=a.allocator, mmap_threshold=a.mmap_threshold,
                    malloc_env=LIVE_MEMORY_ENV if a.allocator == "env64k" else None,
                    env={k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ})
    fit = per_token(results)
    report = dict(meta, results=results, per_token=fit, goals=goals(results, fit, max_fit))
    print(table(results))
    if fit is not None:
        print(f"per token: {fit['bytes_per_token'] / 1024:.2f} KB (+ {fit['intercept_mb']:.0f} MB), from L = "
              f"{fit['from_lengths']}; extrapolated 1M: {extrapolate_gb(fit, 1048576):.2f} GB")
    print(json.dumps(report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        plot(results, os.path.splitext(a.out)[0] + ".png", threads=report.get("machine", {}).get("threads", 1))


if __name__ == "__main__":
    main()
