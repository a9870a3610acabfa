"""megatrain vs transformers 4.57.6 MEGA (and a same-size Llama) on CPU: train-step tokens/s, FLOP/s, peak memory.

    python bench/bench_model.py                                   # L = 4K, 16K, 32K; table, then one JSON object
    python bench/bench_model.py --seq-lens 1024 --steps 1         # smoke run
    python bench/bench_model.py --json model.json --markdown      # also write JSON; print a BENCHMARKS.md table
    python bench/bench_model.py --from-json a.json b.json --markdown   # one table from earlier (partial) runs
    python bench/bench_model.py --profile megatrain --seq-lens 4096   # where one train step's time goes (top ops)
    python bench/bench_model.py --ema                             # the EMA sublayer alone, megatrain vs HF
    python bench/bench_model.py --autocast bf16 --seq-lens 16384  # forward under bf16 autocast (other precision)
    python bench/bench_model.py --impls megatrain,llama --modes speed --seq-lens 4096,32768   # "why MEGA" on CPU

The HF model (config below, seed 0) is saved with `save_pretrained` to a temporary folder; megatrain loads that
folder with `megatrain.hf.load_hf`, so both run the same weights on the same tokens (the first-step losses
are compared). Every measurement runs in its own subprocess, so `ru_maxrss` is that run's peak RSS.
A train step = forward with labels (CLM loss) + backward + AdamW step, batch 1; one untimed step first.
Two kinds of run per (implementation, L):
  speed   `--steps` timed steps: tokens/s on the wall clock and per CPU-second (process CPU time; the steadier
          number on a shared machine), and the peak RSS with glibc's default malloc.
  memory  one step with MALLOC_MMAP_THRESHOLD_=64 KiB: every large tensor is its own mapping, returned to the
          OS when freed, so the peak RSS is the peak of live memory rather than of a fragmented heap (with the
          default malloc the RSS high-water mark depends on allocation history; this run is slower, so untimed).
          Also reported: that peak minus the RSS after loading (interpreter + libraries + weights, ~0.4 GB).
Each worker runs under an address-space limit (`--mem-limit-gb`): a run that does not fit fails with an
out-of-memory error instead of the kernel OOM killer taking neighbours' processes.

Speed runs also report the achieved FLOP/s (flops_per_token from megatrain.train.metrics.model_flops_per_token, via
bench/gpu/bench_train_gpu.py's flops_per_token, x tokens/s) and the fraction it is of this CPU's *measured* fp32
GEMM rate at the model's own matmul shapes (every projection and the LM head at M = min(L, 4096) rows, same thread
count, timed in the same process after the steps): "close to the limit" as a number. `llama` is a transformers
Llama of the same width, depth, vocabulary and parameter count (bench_train_gpu.llama_model: SDPA, flash backend
on CPU too, no gradient checkpointing, logits + cross-entropy as transformers computes them), random weights.

Config (from the issue): vocab 8192, hidden 256, 4 layers, intermediate 512, nffn 512, ema_projection 16,
shared_repr 64, chunk 256, causal (is_decoder, unidirectional EMA), dropout 0. Goals: >= 4x HF tokens/s at 16K;
<= 1/9 of HF peak memory at 32K. Variants: `megatrain` (defaults), `megatrain-ckpt` (gradient_checkpointing=True);
both ask for the loss only (`return_logits=False`: blockwise loss, no [L, V] logits), all a train step needs.
`megalodon`: megatrain's Megalodon at the same hidden size, depth, vocabulary and chunk (MEGALODON_CONFIG below;
random weights, seed 0; its FLOPs per token by the same formula from its own parameter count); "vs MEGA" is its
achieved FLOP/s over the `megatrain` row's at the same L (goal: >= 0.8 at 16K).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("megatrain", "megatrain-ckpt", "hf", "llama", "megalodon")
sys.path.insert(0, os.path.join(ROOT, "bench", "gpu"))  # bench_train_gpu: the Llama and flops_per_token
MODES = ("speed", "memory")
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}

HF_CONFIG = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=4, intermediate_size=512, nffn_hidden_size=512,
    ema_projection_size=16, shared_representation_size=64, use_chunking=True, chunk_size=256,
    is_decoder=True, bidirectional=False,
    dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0,
)


# Megalodon at the same sizes (megatrain/model/megalodon/): hidden 256, 4 layers, Z 64, V (intermediate) 512, FFN 512,
# complex EMA dim 16, chunk 256, one head, 16 timestep-norm groups; its own head (untied, no bias), as the reference
MEGALODON_CONFIG = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=1, shared_representation_size=64,
    intermediate_size=512, nffn_hidden_size=512, cema_ndim=16, chunk_size=256, norm_num_groups=16,
)


def megalodon_model(**overrides):
    """The benchmark's Megalodon (seed 0): build_model(MegalodonConfig(**MEGALODON_CONFIG, **overrides))."""
    import torch
    from megatrain.model import MegalodonConfig, build_model
    torch.manual_seed(0)
    return build_model(MegalodonConfig(**{**MEGALODON_CONFIG, **overrides}))


def _csv(ap, name: str, value: str, allowed=None, cast=str) -> list:
    try:
        items = [cast(s) for s in value.split(",") if s]
    except ValueError:
        ap.error(f"{name}: expected comma-separated values, got {value!r}")
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad:
        ap.error(f"{name}: unknown value {bad[0]!r} (expected some of {','.join(allowed)})")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", default="4096,16384,32768", help="comma-separated sequence lengths")
    ap.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS))
    ap.add_argument("--modes", default=",".join(MODES), help="subset of speed,memory (see the module doc)")
    ap.add_argument("--steps", type=int, default=2, help="timed train steps per speed run (after one untimed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is recorded as too slow")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space limit per run")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--from-json", nargs="+", default=None, help="render earlier JSON outputs as one table")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (for BENCHMARKS.md)")
    ap.add_argument("--ema", action="store_true",
                    help="instead of the table: fwd+bwd CPU time of one EMA sublayer (hidden 256, N 16), megatrain "
                         "(no documents / documents of 3000 / of 80 tokens) vs HF, in this process")
    ap.add_argument("--autocast", choices=("none", "bf16"), default="none",
                    help="run the forward under torch.autocast('cpu', bfloat16) (a different precision: rows are "
                         "labelled, ratios are to HF under the same autocast)")
    ap.add_argument("--profile", choices=IMPLS, default=None,
                    help="instead of the table: torch.profiler top ops of one train step of this implementation")
    # internal: one measurement
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES + ("profile",), default="speed", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.seq_lens = _csv(ap, "--seq-lens", a.seq_lens, cast=int)
    a.impls = _csv(ap, "--impls", a.impls, IMPLS)
    a.modes = _csv(ap, "--modes", a.modes, MODES)
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
    sys.path.insert(0, ROOT)
    from bench_train_gpu import flops_per_token, llama_model
    from megatrain.model import MegaConfig
    mcfg = MegaConfig(**HF_CONFIG)
    sdpa = contextlib.nullcontext
    if a.worker == "hf":
        from transformers.models.deprecated.mega.modeling_mega import MegaForCausalLM
        model = MegaForCausalLM.from_pretrained(a.model_dir)
    elif a.worker == "megalodon":
        model = megalodon_model()
        mcfg = model.config
    elif a.worker == "llama":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        torch.manual_seed(0)
        model, _ = llama_model(mcfg, a.seq_len, "cpu", checkpointing=False)
        sdpa = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731
    else:
        sys.path.insert(0, ROOT)
        from megatrain.hf import load_hf
        model = load_hf(a.model_dir)
        # same weights; checkpointing (applied from outside, as the trainer does) recomputes each layer in backward
        # instead of keeping its activations
        from megatrain.parallel.checkpointing import apply_checkpointing, policy_from_config
        apply_checkpointing(model, policy_from_config(a.worker == "megatrain-ckpt"))
    # a train step needs only the loss: megatrain can compute it blockwise without the [L, V] logits
    loss_only = {"return_logits": False} if "return_logits" in inspect.signature(model.forward).parameters else {}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, HF_CONFIG["vocab_size"], (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    loaded_rss = _peak_rss_mb()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        # autocast around the forward only (backward follows the forward's dtypes), as torch recommends
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast == "bf16"), sdpa():
            loss = model(input_ids=ids, labels=ids, **loss_only).loss
        loss.backward()
        opt.step()
        return loss.item()

    if a.mode == "profile":
        step()  # warm-up; then one profiled step, operators grouped by input shape
        from torch.profiler import profile
        with profile(record_shapes=True) as prof:
            step()
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
        return dict(status="ok", profile=table)
    steps = a.steps if a.mode == "speed" else 1
    try:
        loss0 = step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        return dict(status=f"out of memory (> {a.mem_limit_gb:g} GB)", loaded_rss_mb=loaded_rss,
                    peak_rss_mb=_peak_rss_mb())
    # step_mb: what the train step adds on top of the loaded model (interpreter, libraries, weights)
    out = dict(status="ok", loss0=loss0, loaded_rss_mb=loaded_rss, peak_rss_mb=_peak_rss_mb(),
               step_mb=_peak_rss_mb() - loaded_rss)
    if a.mode == "speed":
        tokens = steps * a.seq_len
        out.update(tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu, step_s=wall / steps)
        n_params = sum(p.numel() for p in model.parameters())
        fpt = flops_per_token("llama" if a.worker == "llama" else "megatrain", mcfg, n_params, a.seq_len)
        gemm = gemm_rate(matmul_shapes(a.worker, model, min(a.seq_len, 4096)))
        out.update(flops_per_token=fpt, gflops=fpt * out["tokens_per_s"] / 1e9, gemm_gflops=gemm / 1e9,
                   of_gemm=fpt * out["tokens_per_s"] / gemm)
    return out


def matmul_shapes(impl: str, model, m: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every projection and the LM head of one layer stack at M rows: the matmuls 6 N counts."""
    import torch
    shapes = [(m, mod.in_features, mod.out_features) for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    emb = model.get_input_embeddings().weight
    if not any(n == emb.shape[0] for _, _, n in shapes):  # a tied LM head is no nn.Linear of its own
        shapes.append((m, emb.shape[1], emb.shape[0]))
    return shapes


def gemm_rate(shapes, repeat: int = 3) -> float:
    """This CPU's fp32 FLOP/s on these matmul shapes (total FLOPs / total best-of-`repeat` time), this process's
    thread count: the ceiling a train step of these shapes could reach."""
    import torch
    flops = secs = 0.0
    for m, k, n in shapes:
        x, w = torch.randn(m, k), torch.randn(k, n)
        x @ w  # warm-up
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            x @ w
            best = min(best, time.perf_counter() - t0)
        flops, secs = flops + 2.0 * m * k * n, secs + best
    return flops / secs


def run_one(a, impl: str, seq_len: int, mode: str, model_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--mode", mode, "--model-dir", model_dir,
           "--seq-len", str(seq_len), "--steps", str(a.steps), "--threads", str(a.threads),
           "--mem-limit-gb", str(a.mem_limit_gb), "--autocast", a.autocast]
    env = dict(os.environ, **(LIVE_MEMORY_ENV if mode == "memory" else {}))
    base = dict(impl=impl, seq_len=seq_len, mode=mode, autocast=a.autocast)
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

def merge(results: list[dict]) -> list[dict]:
    """One row per (L, impl) from its speed and memory runs, plus ratios to HF at the same L."""
    rows: dict = {}
    for r in results:
        ac = r.get("autocast", "none")  # older JSON has no autocast: fp32
        row = rows.setdefault((r["seq_len"], r["impl"], ac), dict(seq_len=r["seq_len"], impl=r["impl"], autocast=ac))
        row[r["mode"]] = r
    for (L, impl, ac), row in rows.items():
        hf = rows.get((L, "hf", ac), {})
        if impl == "hf":
            continue
        for mode, key, out in (("speed", "tokens_per_s", "speedup_vs_hf"),
                               ("speed", "tokens_per_cpu_s", "cpu_speedup_vs_hf"),
                               ("speed", "peak_rss_mb", "rss_vs_hf"), ("memory", "peak_rss_mb", "live_vs_hf"),
                               ("memory", "step_mb", "step_vs_hf")):
            mine, ref = row.get(mode, {}), hf.get(mode, {})
            if mine.get("status") == "ok" and ref.get("status") == "ok":
                row[out] = mine[key] / ref[key]
        mega = rows.get((L, "megatrain", ac), {}).get("speed", {})
        if impl == "megalodon" and row.get("speed", {}).get("status") == "ok" and mega.get("status") == "ok":
            row["flops_vs_mega"] = row["speed"]["gflops"] / mega["gflops"]      # achieved FLOP/s, same hidden size
        llama = rows.get((L, "llama", ac), {}).get("speed", {})
        if impl != "llama" and row.get("speed", {}).get("status") == "ok" and llama.get("status") == "ok":
            row["speedup_vs_llama"] = row["speed"]["tokens_per_s"] / llama["tokens_per_s"]
        mine, ref = row.get("speed", row.get("memory", {})), hf.get("speed", hf.get("memory", {}))
        if "loss0" in mine and "loss0" in ref and impl not in ("llama", "megalodon"):  # (other weights)
            row["loss0_abs_diff_vs_hf"] = abs(mine["loss0"] - ref["loss0"])
    order = {impl: i for i, impl in enumerate(IMPLS)}
    return sorted(rows.values(), key=lambda r: (r["seq_len"], r["autocast"] != "none", order.get(r["impl"], 99)))


def ac_label(row: dict) -> str:
    ac = row.get("autocast", "none")
    return "" if ac == "none" else f" ({ac} autocast)"


def table(rows: list[dict], markdown: bool) -> str:
    head = ["L", "impl", "tok/s", "tok/CPU-s", "vs HF (wall)", "vs HF (CPU)", "vs Llama", "FLOPs/token",
            "GFLOP/s", "vs MEGA", "of GEMM",
            "peak RSS MB", "vs HF", "peak live MB", "vs HF", "live - loaded MB", "vs HF", "loss0 diff vs HF"]

    def cell(run: dict, key: str, spec: str) -> str:
        if not run:
            return "-"
        if run.get("status") != "ok":
            return run["status"] if key in ("tokens_per_s", "peak_rss_mb") else "-"
        return format(run[key], spec) if key in run else "-"

    def ratio(row: dict, key: str, as_fraction: bool) -> str:
        if key not in row:
            return "-"
        return f"1/{1 / row[key]:.1f}" if as_fraction else f"{row[key]:.2f}x"

    lines = []
    for row in rows:
        speed, memory = row.get("speed", {}), row.get("memory", {})
        lines.append([
            str(row["seq_len"]), row["impl"] + ac_label(row), cell(speed, "tokens_per_s", ".0f"),
            cell(speed, "tokens_per_cpu_s", ".0f"), ratio(row, "speedup_vs_hf", False),
            ratio(row, "cpu_speedup_vs_hf", False), ratio(row, "speedup_vs_llama", False),
            cell(speed, "flops_per_token", ".3g"), cell(speed, "gflops", ".1f"), ratio(row, "flops_vs_mega", False),
            cell(speed, "of_gemm", ".0%"),
            cell(speed, "peak_rss_mb", ".0f"), ratio(row, "rss_vs_hf", True),
            cell(memory, "peak_rss_mb", ".0f"), ratio(row, "live_vs_hf", True),
            cell(memory, "step_mb", ".0f"), ratio(row, "step_vs_hf", True),
            f"{row['loss0_abs_diff_vs_hf']:.1e}" if "loss0_abs_diff_vs_hf" in row else "-",
        ])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def goals(rows: list[dict]) -> dict:
    """The issue's goals, each from the best megatrain variant measured."""
    def best(seq_len, key, pick):
        vals = [r[key] for r in rows if r["seq_len"] == seq_len and key in r]
        return pick(vals) if vals else None

    out = {}
    rows = [r for r in rows if r.get("autocast", "none") == "none"]  # the goals are about the fp32 model
    mlo = best(16384, "flops_vs_mega", max)
    if mlo is not None:
        out["megalodon_flops_vs_mega_16k"] = dict(value=mlo, goal=">= 0.8", met=mlo >= 0.8)
    speed = best(16384, "speedup_vs_hf", max)
    if speed is not None:
        out["speedup_16k"] = dict(value=speed, goal=">= 4", met=speed >= 4)
    for key in ("live_vs_hf", "rss_vs_hf", "step_vs_hf"):
        mem = best(32768, key, min)
        if mem is not None:
            out[f"{key}_32k"] = dict(value=mem, goal="<= 1/9", met=mem <= 1 / 9)
    return out


def bench_ema(a) -> dict:
    """CPU seconds (best of 3) of forward+backward of one causal EMA sublayer, batch 1."""
    import torch
    from transformers.models.deprecated.mega.configuration_mega import MegaConfig
    from transformers.models.deprecated.mega.modeling_mega import MegaMultiDimensionDampedEma
    sys.path.insert(0, ROOT)
    from megatrain.model.mega.ema import MultiDimDampedEMA
    torch.set_num_threads(a.threads)
    dim, ndim = HF_CONFIG["hidden_size"], HF_CONFIG["ema_projection_size"]
    ours = MultiDimDampedEMA(dim, ndim, bidirectional=False)
    hf = MegaMultiDimensionDampedEma(MegaConfig(hidden_size=dim, ema_projection_size=ndim, bidirectional=False))
    hf.load_state_dict(ours.state_dict())

    def best_cpu_s(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return min(times)

    rows = []
    for L in a.seq_lens:
        x = torch.randn(1, L, dim, requires_grad=True)
        row = dict(seq_len=L)
        for name, doc_len in (("megatrain", None), ("megatrain_docs3000", 3000), ("megatrain_docs80", 80)):
            doc_ids = None if doc_len is None else (torch.arange(L) // doc_len)[None]
            row[name] = best_cpu_s(lambda: ours(x, doc_ids=doc_ids)[0].sum().backward())
        row["hf"] = best_cpu_s(lambda: hf(x.transpose(0, 1))[0].sum().backward())
        row["speedup"] = row["hf"] / row["megatrain"]
        rows.append(row)
        print(f"# ema L={L}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "seq_len"),
              file=sys.stderr, flush=True)
    return dict(bench="model-ema", threads=a.threads, unit="CPU s per fwd+bwd", rows=rows)


def ema_table(report: dict, markdown: bool) -> str:
    head = ["L", "megatrain s", "docs of 3000", "docs of 80", "HF s", "HF / megatrain"]
    lines = [[str(r["seq_len"]), f"{r['megatrain']:.3f}", f"{r['megatrain_docs3000']:.3f}",
              f"{r['megatrain_docs80']:.3f}", f"{r['hf']:.3f}", f"{r['speedup']:.1f}x"] for r in report["rows"]]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def save_hf_model(model_dir: str) -> None:
    import torch
    from transformers.models.deprecated.mega.configuration_mega import MegaConfig
    from transformers.models.deprecated.mega.modeling_mega import MegaForCausalLM
    torch.manual_seed(0)
    MegaForCausalLM(MegaConfig(**HF_CONFIG)).save_pretrained(model_dir)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.ema:
        report = bench_ema(a)
        print(ema_table(report, a.markdown))
        print(json.dumps(report))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
        return
    if a.from_json:
        reports = []
        for path in a.from_json:
            with open(path) as f:
                reports.append(json.load(f))
        results = [r for rep in reports for r in rep["results"]]
        meta = {k: v for k, v in reports[-1].items() if k not in ("results", "rows", "goals")}
    else:
        results = []
        with tempfile.TemporaryDirectory() as model_dir:
            save_hf_model(model_dir)
            if a.profile:
                for L in a.seq_lens:
                    r = run_one(a, a.profile, L, "profile", model_dir)
                    print(f"## {a.profile} L={L}: one train step\n{r.get('profile', r.get('status'))}")
                return
            for L in a.seq_lens:
                for mode in a.modes:
                    for impl in a.impls:
                        r = run_one(a, impl, L, mode, model_dir)
                        print(f"# {mode} {impl} L={L}: {r.get('status')} {r.get('tokens_per_s', 0):.0f} tok/s, "
                              f"peak RSS {r.get('peak_rss_mb', 0):.0f} MB", file=sys.stderr, flush=True)
                        results.append(r)
        meta = dict(bench="model", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    machine=dict(platform=platform.platform(), cpus=os.cpu_count(), threads=a.threads),
                    config=HF_CONFIG, megalodon_config=MEGALODON_CONFIG, steps=a.steps, live_memory_env=LIVE_MEMORY_ENV, autocast=a.autocast)
    rows = merge(results)
    report = dict(meta, results=results, rows=rows, goals=goals(rows))
    print(table(rows, a.markdown))
    print(json.dumps(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
