"""EMA op on one GPU: every path -- blocked PyTorch, our Triton scan kernel, our chunked tensor-core kernel, and
what `auto` picks (ops/ema/paths.py) -- forward and forward+backward (CUDA only).

    python bench/gpu/bench_ema.py                                  # 350M config, L = 4K/32K/128K, bf16 input
    python bench/gpu/bench_ema.py --seq-lens 4096 --repeats 3 --doc-len 1024 --json ema.json

Measures `megatrain.ops.ema.ema_scan` (one call = one direction over D channels; the 350M config's bidirectional
EMA is hidden 1024 x 2 directions = D 2048, N 16) at B = 1 with u in bf16 (the chunked kernel's tensor-core mode;
note MultiDimDampedEMA passes u in fp32 today) and fp32 parameters. Per length and path (--backends: torch =
blocked, triton = the scan kernel, chunked, chunked-inplace, auto): forward (no grad) and forward+backward in ms
(CUDA events, median of --repeats after a warm-up that also compiles), peak GPU memory of forward+backward, the
largest difference of out and d u from the first path's, relative to their scale (a correctness sanity check on
real hardware), and the path `auto` picks at that length. The rows are what ops/ema/paths.py's table is filled
from. Prints a table, then one JSON object. Without CUDA it prints one line saying so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatrain.ops.ema import choose_path, ema_scan  # noqa: E402

# --backends name -> ema_scan's (backend, path); chunked-inplace: the chunked kernels on [B, L, D] directly (stride-D
# gathers) instead of channel-major copies -- the layout choice in ops/ema/triton_chunked.py, unmeasured so far
PATHS = {"torch": ("torch", "blocked"), "triton": ("triton", "scan"), "chunked": ("triton", "chunked"),
         "chunked-inplace": ("triton", "chunked"), "auto": ("auto", "auto")}


def run_path(name: str, u, a, c, logq, resets, block: int):
    backend, path = PATHS[name]
    if name == "chunked-inplace":
        from megatrain.ops.ema.paths import chunk_length, device_row
        from megatrain.ops.ema.triton_chunked import ema_scan_chunked
        return ema_scan_chunked(u, a, c, logq, resets, None, chunk_length(block, device_row(u)), channel_major=False)
    return ema_scan(u, a, c, logq, resets, block=block, backend=backend, path=path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", default="4096,32768,131072", help="comma-separated sequence lengths")
    ap.add_argument("--dim", type=int, default=2048, help="channels D (350M: hidden 1024 x 2 directions)")
    ap.add_argument("--ndim", type=int, default=16, help="EMA dimension N (ema_projection_size)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=128, help="block (torch) / chunk (triton) length")
    ap.add_argument("--doc-len", type=int, default=0, help="a document reset every this many positions (0: none)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backends", default="torch,triton,chunked,chunked-inplace",
                    help="paths: torch (blocked), triton (scan kernel), chunked (tensor-core kernel), "
                         "chunked-inplace (its [B, L, D] layout), auto (the table)")
    ap.add_argument("--json", default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    try:
        args.seq_lens = [int(v) for v in args.seq_lens.split(",")]
    except ValueError:
        ap.error(f"--seq-lens must be comma-separated ints, got {args.seq_lens!r}")
    args.backends = args.backends.split(",")
    if any(b not in PATHS for b in args.backends):
        ap.error(f"--backends must name some of {', '.join(PATHS)}, got {','.join(args.backends)!r}")
    if min(args.seq_lens + [args.dim, args.ndim, args.batch, args.block, args.repeats]) < 1 or args.doc_len < 0:
        ap.error("--seq-lens/--dim/--ndim/--batch/--block/--repeats must be positive, --doc-len >= 0")
    return args


def inputs(args, length: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    u = torch.randn(args.batch, length, args.dim, device=dev, generator=g).to(torch.bfloat16)
    a = torch.randn(args.dim, args.ndim, device=dev, generator=g)
    c = torch.randn(args.dim, args.ndim, device=dev, generator=g) / args.ndim ** 0.5
    # decays as MEGA's init gives them: p, alpha = sigmoid(N(0, 0.2)) -> q = 1 - p alpha around 0.75
    p_alpha = torch.sigmoid(torch.randn(args.dim, args.ndim, device=dev, generator=g) * 0.2) ** 2
    logq = torch.log1p(-p_alpha)
    resets = None
    if args.doc_len:
        resets = torch.zeros(args.batch, length, dtype=torch.bool, device=dev)
        resets[:, args.doc_len::args.doc_len] = True
    return u, a, c, logq, resets


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and Triton compile)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(args, length: int, name: str) -> tuple[dict, list]:
    backend, path = PATHS[name]
    u, a, c, logq, resets = inputs(args, length)
    leaves = [t.requires_grad_() for t in (u, a, c, logq)]
    gout = torch.randn(args.batch, length, args.dim, device="cuda")

    def forward():
        with torch.no_grad():
            return run_path(name, u, a, c, logq, resets, args.block)

    def forward_backward():
        out, state = run_path(name, *leaves, resets, args.block)
        torch.autograd.backward([out, state], [gout, torch.ones_like(state)])

    fwd = timed(forward, args.repeats)
    for t in leaves:
        t.grad = None
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd = timed(forward_backward, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    for t in leaves:
        t.grad = None
    forward_backward()
    results = [forward()[0].float(), u.grad.float()]
    # auto_picks: the path `auto` takes at this length (ops/ema/paths.py), to hold against the measured rows
    row = dict(seq_len=length, backend=name, path=choose_path(backend, u, path), auto_picks=choose_path("auto", u),
               fwd_ms=round(fwd, 3), fwd_bwd_ms=round(fwd_bwd, 3), peak_gb=round(peak, 3))
    return row, results


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ema: no CUDA device here; this benchmark measures GPU kernels only (nothing measured)")
        return 0
    rows = []
    print(f"{'L':>8} {'backend':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak GB':>8} {'rel diff out / du':>18}")
    for length in args.seq_lens:
        results = {}
        for backend in args.backends:
            row, results[backend] = measure(args, length, backend)
            rows.append(row)
            diff = ""
            if len(results) >= 2:
                (ref_out, ref_du), (out, du) = results[args.backends[0]], results[backend]
                rel = [((x - y).abs().max() / y.abs().max()).item() for x, y in ((out, ref_out), (du, ref_du))]
                row["rel_diff_out"], row["rel_diff_du"] = (float(f"{r:.3g}") for r in rel)
                diff = f"{rel[0]:.2e} / {rel[1]:.2e}"
            print(f"{length:>8} {backend:>8} {row['fwd_ms']:>9.3f} {row['fwd_bwd_ms']:>11.3f} {row['peak_gb']:>8.3f} "
                  f"{diff:>18}", flush=True)
            torch.cuda.empty_cache()
    report = dict(bench="ema-gpu", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  batch=args.batch, dim=args.dim, ndim=args.ndim, input_dtype="bfloat16", block=args.block,
                  doc_len=args.doc_len, repeats=args.repeats, rows=rows)
    text = json.dumps(report)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
