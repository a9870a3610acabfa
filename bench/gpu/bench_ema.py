"""EMA op on one GPU: every path -- blocked PyTorch, our Triton scan kernel, our chunked tensor-core kernel, and
what `auto` picks (ops/ema/paths.py) -- forward and forward+backward (CUDA only).

    python bench/gpu/bench_ema.py                                  # 350M config, L = 4K/32K/128K, bf16 input
    python bench/gpu/bench_ema.py --seq-lens 4096 --repeats 3 --doc-len 1024
    MEGATRAIN_BENCH_CPU_SMOKE=1 python bench/gpu/bench_ema.py --seq-lens 256 --dim 32 --ndim 4 --repeats 1

Measures `megatrain.ops.ema.ema_scan` (one call = one direction over D channels; the 350M config's bidirectional
EMA is hidden 1024 x 2 directions = D 2048, N 16) at B = 1 with u in bf16 (the chunked kernel's tensor-core mode;
note MultiDimDampedEMA passes u in fp32 today) and fp32 parameters. Per length and path (--backends: torch =
blocked, triton = the scan kernel, chunked, chunked-inplace, auto): forward (no grad) and forward+backward in ms
(CUDA events, median of --repeats after a warm-up that also compiles), peak GPU memory of forward+backward, the
largest difference of out and d u from the first path's, relative to their scale (a correctness sanity check on
real hardware), and the path `auto` picks at that length. The rows are what ops/ema/paths.py's table is filled
from. Each (length, path) is one JSON line (bench "ema"), printed and appended to $BENCH_ROWS as soon as it is
measured (bench/gpu/common.py). Without CUDA it prints one line saying so and exits 0 (nothing measured);
MEGATRAIN_BENCH_CPU_SMOKE=1 runs the script on CPU (wall-clock timing, the Triton kernels under TRITON_INTERPRET=1):
a check of the script, not a number.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
from common import row  # noqa: E402
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

DEV = common.DEVICE


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
    g = torch.Generator(device=DEV).manual_seed(0)
    dev = DEV
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
    common._sync()
    times = []
    for _ in range(repeats):
        if common.SMOKE:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
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
    gout = torch.randn(args.batch, length, args.dim, device=DEV)

    def forward():
        with torch.no_grad():
            return run_path(name, u, a, c, logq, resets, args.block)

    def forward_backward():
        out, state = run_path(name, *leaves, resets, args.block)
        torch.autograd.backward([out, state], [gout, torch.ones_like(state)])

    fwd = timed(forward, args.repeats)
    for t in leaves:
        t.grad = None
    if not common.SMOKE:
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd = timed(forward_backward, args.repeats)
    peak = 0.0 if common.SMOKE else torch.cuda.max_memory_allocated() / 2 ** 30
    for t in leaves:
        t.grad = None
    forward_backward()
    results = [forward()[0].float(), u.grad.float()]
    # auto_picks: the path `auto` takes at this length (ops/ema/paths.py), to hold against the measured rows
    rec = dict(seq_len=length, backend=name, path=choose_path(backend, u, path), auto_picks=choose_path("auto", u),
               fwd_ms=round(fwd, 3), fwd_bwd_ms=round(fwd_bwd, 3), peak_gb=round(peak, 3))
    return rec, results


def main(argv=None) -> int:
    args = parse_args(argv)
    common.require_cuda("bench_ema")
    if common.SMOKE and any(b != "torch" for b in args.backends):
        os.environ["TRITON_INTERPRET"] = "1"  # (read per call by megatrain.ops.backend; set before triton loads)
    head = dict(device=common.device_name(), torch=torch.__version__, batch=args.batch, dim=args.dim,
                ndim=args.ndim, input_dtype="bfloat16", block=args.block, doc_len=args.doc_len, repeats=args.repeats)
    for length in args.seq_lens:
        results = {}
        for backend in args.backends:
            try:
                rec, results[backend] = measure(args, length, backend)
            except Exception as e:  # one failing path must not hide the others' numbers
                rec = dict(seq_len=length, backend=backend, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            if len(results) >= 2 and backend in results and args.backends[0] in results:
                (ref_out, ref_du), (out, du) = results[args.backends[0]], results[backend]
                rel = [((x - y).abs().max() / y.abs().max()).item() for x, y in ((out, ref_out), (du, ref_du))]
                rec["rel_diff_out"], rec["rel_diff_du"] = (float(f"{r:.3g}") for r in rel)
            row("ema", {**head, **rec})
            common.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
