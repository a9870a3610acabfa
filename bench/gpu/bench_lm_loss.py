"""Fused LM head + cross-entropy on one GPU: blockwise PyTorch vs Liger vs plain F.linear + F.cross_entropy.

    python bench/gpu/bench_lm_loss.py                        # 32K tokens, D and V from the 350M config, bf16
    python bench/gpu/bench_lm_loss.py --tokens 65536
    MEGATRAIN_BENCH_CPU_SMOKE=1 python bench/gpu/bench_lm_loss.py --config configs/tiny.yaml --tokens 256 --exact-tokens 64

Per path: median ms of loss forward+backward (gradients of h, the [V, D] weight and the [V] bias) and peak
allocated MiB above the inputs. Exactness first: loss and every gradient in fp32 at --exact-tokens against the
fp64 reference (megatrain.ops.lm_loss.lm_head_ce_sum_ref), max abs error. No CUDA: one line, exit 0.
Every row is one JSON line (bench "lm_loss-exactness" / "lm_loss"), printed and appended to $BENCH_ROWS as soon as
it is measured (bench/gpu/common.py). A path that cannot run here (Liger without liger-kernel) is an error row.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common  # noqa: E402
from common import measure, model_config, require_cuda, row  # noqa: E402


def _inputs(n, d, v, dtype, seed=0):
    g = torch.Generator(device=common.DEVICE).manual_seed(seed)
    h = torch.randn(n, d, device=common.DEVICE, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=common.DEVICE, generator=g) * d**-0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, device=common.DEVICE, generator=g) * 0.1).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=common.DEVICE, generator=g)
    t[::7] = -100
    return h, w, b, t


def _paths(block):
    from megatrain.ops.lm_loss import lm_head_ce_sum, lm_head_ce_sum_ref

    return {
        "plain": lm_head_ce_sum_ref,
        "blockwise": lambda h, w, b, t: lm_head_ce_sum(h, w, b, t, block, backend="torch"),
        "liger": lambda h, w, b, t: lm_head_ce_sum(h, w, b, t, backend="triton"),
    }


def _fwd_bwd(fn, h, w, b, t):
    loss = fn(h, w, b, t)
    return [loss] + list(torch.autograd.grad(loss, (h, w, b)))


def main(argv=None):
    from megatrain.model.lm import LOSS_BLOCK_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/mega350m_128k.yaml")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--exact-tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=LOSS_BLOCK_TOKENS, help="blockwise path's rows per block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    require_cuda("bench_lm_loss")
    cfg = model_config(args.config)
    d, v = cfg.hidden_size, cfg.vocab_size
    paths = _paths(args.block)
    head = {"device": common.device_name(), "torch": torch.__version__, "config": args.config, "D": d, "V": v,
            "block": args.block}
    want = [x.detach() for x in _fwd_bwd(paths["plain"], *_inputs(args.exact_tokens, d, v, torch.float64))]
    for name, fn in paths.items():
        rec = {**head, "path": name, "dtype": "fp32", "tokens": args.exact_tokens}
        try:
            got = _fwd_bwd(fn, *_inputs(args.exact_tokens, d, v, torch.float32))
            errs = [(a.detach().double() - e).abs().max().item() for a, e in zip(got, want)]
            rec["max_abs_err_vs_fp64"] = dict(zip(["loss", "dh", "dw", "db"], errs))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row("lm_loss-exactness", rec)
    h, w, b, t = _inputs(args.tokens, d, v, torch.bfloat16)
    for name, fn in paths.items():
        rec = {**head, "path": name, "dtype": "bf16", "tokens": args.tokens}
        rec.update(measure(lambda: _fwd_bwd(fn, h, w, b, t), args.warmup, args.repeat))
        row("lm_loss", rec)


if __name__ == "__main__":
    main()
