"""MEGA chunk attention on one GPU: the PyTorch path vs FlexAttention (kernel_backend 'triton'), forward+backward.

    python bench/gpu/bench_attention.py                                # 350M config, L = 4K, 32K, 128K, bf16
    python bench/gpu/bench_attention.py --lengths 4096 --v-head-max 128,256,512
    MEGATRAIN_BENCH_CPU_SMOKE=1 python bench/gpu/bench_attention.py --config configs/tiny.yaml --lengths 64,128

Shapes from the config (configs/mega350m_128k.yaml: Z = shared_representation_size 256, E = intermediate_size
2048, chunk 2048, rotary bias): q, k [1, L/C, C, Z], v [1, L/C, C, E], the [C, C] bias built from the rotary
parameters each step (as the model does), so every gradient is computed: q, k, v, alpha, beta.
Masks: "causal" (the CLM case) and "causal+pad" (left padding in the first chunk: the PyTorch path then
materialises scores and probabilities). Per (L, mask, path): median ms of forward+backward, peak allocated MiB
above the inputs. Exactness first, at the smallest L: each path's output and gradients in bf16 (and fp32) against
the fp32 reference (megatrain.ops.attention.reference), max abs error, next to the plain-PyTorch bf16 error.
No CUDA: one line, exit 0. Every row is one JSON line (bench "attention-exactness" / "attention"), printed and
appended to $BENCH_ROWS as soon as it is measured (bench/gpu/common.py).
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


def _inputs(cfg, length, dtype, seed=0):
    from megatrain.model.mega.attention import RotaryRelativeBias

    c, z, e = cfg.chunk_size, cfg.shared_representation_size, cfg.intermediate_size
    n = length // c
    # drawn in fp32 (same values for every dtype), then cast
    g = torch.Generator(device=common.DEVICE).manual_seed(seed)
    q, k = (torch.randn(1, n, c, z, device=common.DEVICE, generator=g).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(1, n, c, e, device=common.DEVICE, generator=g).to(dtype).requires_grad_()
    rel = RotaryRelativeBias(cfg).to(common.DEVICE)
    with torch.no_grad():
        for p in rel.parameters():
            p.normal_(generator=g)
    key_mask = torch.ones(1, n, c, dtype=torch.bool, device=common.DEVICE)
    key_mask[0, 0, : c // 3] = False  # left padding
    return q, k, v, rel, key_mask


def _fn(path, cfg, causal, key_mask, v_head_max=None):
    from megatrain.ops.attention import chunk_attention, chunk_attention_ref
    from megatrain.ops.attention.flex_path import flex_chunk_attention

    scale = cfg.shared_representation_size ** -0.5
    if path == "reference":
        def run(q, k, v, bias):
            c = q.shape[-2]
            valid = torch.ones(c, c, dtype=torch.bool, device=q.device).tril() if causal else None
            if key_mask is not None:
                valid = key_mask[:, :, None, :] if valid is None else valid & key_mask[:, :, None, :]
            return chunk_attention_ref(q, k, v, bias, valid, "softmax", scale)
    elif path == "flex":
        def run(q, k, v, bias):
            return flex_chunk_attention(q, k, v, bias, scale=scale, causal=causal, key_mask=key_mask,
                                        v_head_max=v_head_max)
    else:
        def run(q, k, v, bias):
            return chunk_attention(q, k, v, bias, scale=scale, causal=causal, key_mask=key_mask, backend="torch")
    return run


def _fwd_bwd(run, q, k, v, rel, grad_out=None):
    c = q.shape[-2]
    pos = torch.arange(c, device=q.device)
    out = run(q, k, v, rel(pos, pos).to(q.dtype))
    leaves = [q, k, v, rel.alpha, rel.beta]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) if grad_out is None else grad_out)
    return [out] + list(grads)


def exactness(cfg, length, v_head_max, head):
    want = None
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, rel, km = _inputs(cfg, length, dtype)
        gout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=common.DEVICE, generator=torch.Generator(
            device=common.DEVICE).manual_seed(1)).to(dtype)
        if want is None:  # fp32 reference, the first dtype
            want = [t.detach().double() for t in _fwd_bwd(_fn("reference", cfg, True, km), q, k, v, rel, gout)]
        for path in ("reference", "torch", "flex"):
            rec = {**head, "path": path, "dtype": str(dtype).split(".")[-1], "L": length}
            try:
                got = _fwd_bwd(_fn(path, cfg, True, km, v_head_max), q, k, v, rel, gout)
                errs = [(a.detach().double() - w).abs().max().item() for a, w in zip(got, want)]
                rec["max_abs_err_vs_fp32_reference"] = dict(zip(["out", "dq", "dk", "dv", "dalpha", "dbeta"], errs))
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row("attention-exactness", rec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/mega350m_128k.yaml")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--v-head-max", default="256", help="comma list: flex value-slice widths to try")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    require_cuda("bench_attention")
    if common.SMOKE:  # FlexAttention backward is refused on CPU; the smoke run checks the script, as the tests do
        import torch.nn.attention.flex_attention as flex_mod
        flex_mod._validate_device = lambda *a: None
    cfg = model_config(args.config)
    lengths = [int(x) for x in args.lengths.split(",")]
    v_heads = [int(x) for x in args.v_head_max.split(",")]
    head = {"device": common.device_name(), "torch": torch.__version__, "config": args.config,
            "Z": cfg.shared_representation_size, "E": cfg.intermediate_size, "chunk": cfg.chunk_size}
    exactness(cfg, lengths[0], v_heads[0], head)
    for length in lengths:
        q, k, v, rel, km = _inputs(cfg, length, torch.bfloat16)
        for mask_name, key_mask in (("causal", None), ("causal+pad", km)):
            paths = [("torch", None)] + [(f"flex/v{h}", h) for h in v_heads]
            for name, vh in paths:
                run = _fn("flex" if vh else "torch", cfg, True, key_mask, vh)
                rec = {**head, "dtype": "bf16", "L": length, "mask": mask_name, "path": name}
                rec.update(measure(lambda: _fwd_bwd(run, q, k, v, rel), args.warmup, args.repeat))
                row("attention", rec)
        del q, k, v, rel, km
        common.empty_cache()


if __name__ == "__main__":
    main()
