"""Fused LM head + cross-entropy on one GPU: blockwise PyTorch vs Liger vs plain F.linear + F.cross_entropy.

    python bench/gpu/bench_lm_loss.py                        # 32K tokens, D and V from the 350M config, bf16
    python bench/gpu/bench_lm_loss.py --tokens 65536 --json loss.json

Per path: median ms of loss forward+backward (gradients of h, the [V, D] weight and the [V] bias) and peak
allocated MiB above the inputs. Exactness first: loss and every gradient in fp32 at --exact-tokens against the
fp64 reference (megatrain.ops.lm_loss.lm_head_ce_sum_ref), max abs error. No CUDA: one line, exit 0.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common  # noqa: E402
from common import emit, measure, model_config, require_cuda  # noqa: E402


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
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    require_cuda("bench_lm_loss")
    cfg = model_config(args.config)
    d, v = cfg.hidden_size, cfg.vocab_size
    paths = _paths(args.block)
    result = {"device": common.device_name(), "torch": torch.__version__, "config": args.config, "D": d, "V": v,
              "tokens": args.tokens, "dtype": "bf16", "block": args.block, "exact_tokens": args.exact_tokens,
              "exactness_fp32_max_abs_err_vs_fp64": {}, "runs": []}
    want = [x.detach() for x in _fwd_bwd(paths["plain"], *_inputs(args.exact_tokens, d, v, torch.float64))]
    for name, fn in paths.items():
        try:
            got = _fwd_bwd(fn, *_inputs(args.exact_tokens, d, v, torch.float32))
            errs = [(a.detach().double() - e).abs().max().item() for a, e in zip(got, want)]
            result["exactness_fp32_max_abs_err_vs_fp64"][name] = dict(zip(["loss", "dh", "dw", "db"], errs))
        except Exception as e:
            result["exactness_fp32_max_abs_err_vs_fp64"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    h, w, b, t = _inputs(args.tokens, d, v, torch.bfloat16)
    for name, fn in paths.items():
        row = {"path": name}
        row.update(measure(lambda: _fwd_bwd(fn, h, w, b, t), args.warmup, args.repeat))
        result["runs"].append(row)
        print(row, file=sys.stderr, flush=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
