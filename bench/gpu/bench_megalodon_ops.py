"""Megalodon's two sequence ops on one GPU: the complex EMA (ops/cema) and the timestep norm (ops/tsn), PyTorch path
vs our Triton kernels, forward and forward+backward (CUDA only).

    python bench/gpu/bench_megalodon_ops.py                        # 1.3B shapes (D 2048, N 16, G 64), L = 4K/32K
    python bench/gpu/bench_megalodon_ops.py --seq-lens 32768 --ops cema --doc-len 4096
    MEGATRAIN_BENCH_CPU_SMOKE=1 python bench/gpu/bench_megalodon_ops.py --seq-lens 64 --dim 8 --ndim 2 --groups 2 \
        --repeats 1

One call per op = one layer's worth at B = 1: `cema_scan` over D channels x N complex dimensions (u in bf16, as a
bf16 model hands it), `timestep_norm` over D features in G groups (x bf16). Per (op, length, path): forward (no grad)
and forward+backward in ms (CUDA events, median of --repeats after a warm-up that also compiles), peak GPU memory
of forward+backward, and the largest difference of the output and d input from the PyTorch path's, relative to
their scale (a correctness check on real hardware). Each row is one JSON line (bench "cema" / "tsn") printed and
appended to $BENCH_ROWS at once (bench/gpu/common.py). Without CUDA: one line saying so, exit 0;
MEGATRAIN_BENCH_CPU_SMOKE=1 runs it on CPU (wall clock, Triton under TRITON_INTERPRET=1): a check of the script.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
from bench_ema import timed  # noqa: E402
from common import row  # noqa: E402

DEV = common.DEVICE
OPS = ("cema", "tsn")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", default="4096,32768", help="comma-separated sequence lengths")
    ap.add_argument("--dim", type=int, default=2048, help="features D (Megalodon 1.3B: 2048)")
    ap.add_argument("--ndim", type=int, default=16, help="complex EMA dimension N (cema_ndim)")
    ap.add_argument("--groups", type=int, default=64, help="timestep-norm groups G (norm_num_groups)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--doc-len", type=int, default=0, help="a document start every this many positions (0: none)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ops", default="cema,tsn")
    args = ap.parse_args(argv)
    try:
        args.seq_lens = [int(v) for v in args.seq_lens.split(",")]
    except ValueError:
        ap.error(f"--seq-lens must be comma-separated ints, got {args.seq_lens!r}")
    args.ops = args.ops.split(",")
    if any(o not in OPS for o in args.ops):
        ap.error(f"--ops must name some of {', '.join(OPS)}, got {','.join(args.ops)!r}")
    if min(args.seq_lens + [args.dim, args.ndim, args.groups, args.batch, args.repeats]) < 1 or args.doc_len < 0 \
            or args.dim % args.groups:
        ap.error("--seq-lens/--dim/--ndim/--groups/--batch/--repeats must be positive, --groups must divide --dim")
    return args


def inputs(args, op: str, length: int):
    """(differentiable inputs, the call) of one op at `length`, drawn as the model's init gives them."""
    from megatrain.ops.cema import cema_scan
    from megatrain.ops.tsn import timestep_norm

    g = torch.Generator(device=DEV).manual_seed(0)
    d, n = args.dim, args.ndim
    resets = None
    if args.doc_len:
        resets = torch.zeros(args.batch, length, dtype=torch.bool, device=DEV)
        resets[:, args.doc_len::args.doc_len] = True
    x = torch.randn(args.batch, length, d, device=DEV, generator=g).to(torch.bfloat16)
    if op == "cema":
        p = torch.sigmoid(torch.randn(d, n, device=DEV, generator=g) * 0.2)
        delta = torch.sigmoid(torch.randn(d, n, device=DEV, generator=g) * 0.2)
        angle = torch.rand(d, 1, device=DEV, generator=g) * torch.arange(1, n + 1, device=DEV) * (2 * math.pi / n)
        logq = torch.complex(torch.log1p(-p * delta), angle)
        c = torch.complex(torch.randn(d, n, device=DEV, generator=g), torch.zeros(d, n, device=DEV)) * n ** -0.5
        leaves = [x, p, c, logq]
        return leaves, lambda backend, x, p, c, logq: cema_scan(x, p, c, logq, resets, backend=backend)
    gamma = torch.ones(d, device=DEV)
    beta = torch.zeros(d, device=DEV)
    leaves = [x, gamma, beta]
    return leaves, lambda backend, x, gamma, beta: timestep_norm(x, gamma, beta, args.groups, resets=resets,
                                                                 backend=backend)


def measure(args, op: str, length: int, backend: str):
    leaves, call = inputs(args, op, length)
    leaves = [t.requires_grad_() for t in leaves]
    gout = torch.randn(args.batch, length, args.dim, device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))

    def forward():
        with torch.no_grad():
            return call(backend, *leaves)[0]

    def forward_backward():
        out, _ = call(backend, *leaves)
        out.float().backward(gout)

    fwd = timed(forward, args.repeats)
    if not common.SMOKE:
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd = timed(forward_backward, args.repeats)
    peak = 0.0 if common.SMOKE else torch.cuda.max_memory_allocated() / 2 ** 30
    for t in leaves:
        t.grad = None
    forward_backward()
    rec = dict(seq_len=length, backend=backend, fwd_ms=round(fwd, 3), fwd_bwd_ms=round(fwd_bwd, 3),
               peak_gb=round(peak, 3))
    return rec, [forward().float(), leaves[0].grad.float()]


def main(argv=None) -> int:
    args = parse_args(argv)
    common.require_cuda("bench_megalodon_ops")
    if common.SMOKE:
        os.environ["TRITON_INTERPRET"] = "1"  # (read per call by megatrain.ops.backend; set before triton loads)
    head = dict(device=common.device_name(), torch=torch.__version__, batch=args.batch, dim=args.dim,
                ndim=args.ndim, groups=args.groups, input_dtype="bfloat16", doc_len=args.doc_len,
                repeats=args.repeats)
    for op in args.ops:
        for length in args.seq_lens:
            results = {}
            for backend in ("torch", "triton"):
                try:
                    rec, results[backend] = measure(args, op, length, backend)
                except Exception as e:  # one failing path must not hide the other's numbers
                    rec = dict(seq_len=length, backend=backend,
                               error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                if backend == "triton" and len(results) == 2:
                    rel = [((x - y).abs().max() / y.abs().max()).item()
                           for x, y in zip(results["triton"], results["torch"])]
                    rec["rel_diff_out"], rec["rel_diff_dx"] = (float(f"{r:.3g}") for r in rel)
                row(op, {**head, **rec})
                common.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
