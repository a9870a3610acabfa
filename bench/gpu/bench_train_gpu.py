"""One GPU, bf16 train steps: megatrain MEGA vs transformers 4.57.6 MEGA (same weights) vs a same-size Llama (SDPA).

    python bench/gpu/bench_train_gpu.py --out results.json                     # 4K, 32K, 128K; all three
    python bench/gpu/bench_train_gpu.py --longest --out longest.json           # doubling L until OOM / time cap
    python bench/gpu/bench_train_gpu.py --device cpu --tiny --lengths 256,512  # smoke run of this script (CPU)

A train step = forward with labels (causal LM loss) + backward + AdamW (fused on CUDA) step, batch 1, under
torch.autocast(bfloat16) with fp32 parameters (mixed precision, as DeepSpeed bf16 computes), gradient checkpointing
on for megatrain (the config's setting) and the Llama; transformers' MEGA does not support it (runs without). One untimed warm-up step, then `--steps` timed steps.
Model: `configs/mega350m_128k.yaml`'s model section (344M parameters) unless `--tiny`. HF MEGA gets the same
weights (megatrain.hf.save_hf -> from_pretrained) and runs its use_cache=False path. The Llama has the same
hidden size, depth, vocabulary and tied embeddings, with intermediate size chosen to match the parameter count, and
PyTorch SDPA attention (flash on H100/H200).

FLOPs per token (reported TFLOP/s and MFU = TFLOP/s / peak):
  MEGA  : 6 N + 12 * layers * chunk * (Z + E) * 1/2     (chunked attention: span = chunk_size, causal)
  Llama : 6 N + 12 * layers * L * D * 1/2               (full causal attention over the whole sequence)
  (megatrain.train.metrics.model_flops_per_token; N = all parameters.)
Each implementation runs in its own process (one CUDA context; OOM at one length does not stop the others); a
length that runs out of memory is recorded as "oom". Prints one JSON line per measurement and writes all to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run from a plain checkout on the GPU machine (no pip install there)

IMPLS = ("megatrain", "hf", "llama")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
TINY_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  shared_representation_size=32, nffn_hidden_size=128, ema_projection_size=8, use_chunking=True,
                  chunk_size=64, max_positions=64, normalization_type="layernorm", gradient_checkpointing=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,32768,131072", help="comma-separated sequence lengths")
    ap.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per length (after one warm-up)")
    ap.add_argument("--longest", action="store_true",
                    help="instead: double L from --start-length until a step runs out of memory or exceeds "
                         "--time-cap seconds (megatrain and llama)")
    ap.add_argument("--start-length", type=int, default=131072)
    ap.add_argument("--max-length", type=int, default=1 << 24)
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds per step that end the --longest search")
    ap.add_argument("--offload", action="store_true",
                    help="megatrain: train.offload_activations (checkpointed layer inputs in host memory)")
    ap.add_argument("--kernel-backend", default="auto", help="megatrain MegaConfig.kernel_backend")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke runs on CPU)")
    ap.add_argument("--out", default=None, help="write all records here (JSON list)")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.lengths = [int(s) for s in a.lengths.split(",") if s]
    a.impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in a.impls if s not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown {bad[0]!r} (expected some of {','.join(IMPLS)})")
    return a


def mega_config(a):
    from megatrain.config import load_config
    from megatrain.model import MegaConfig
    if a.tiny:
        cfg = MegaConfig(**TINY_MODEL, is_decoder=True, bidirectional=False)
    else:
        cfg = load_config(os.path.join(ROOT, "configs", "mega350m_128k.yaml"), ["data.shards=unused"]).model
    extra = {"kernel_backend": a.kernel_backend}
    return cfg.replace(dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       nffn_activation_dropout_prob=0.0, **extra)


def llama_model(cfg, length: int):
    """A Llama of MEGA's width, depth and vocabulary with the intermediate size that matches the parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from megatrain.model import MegaForCausalLM
    import torch
    with torch.device("meta"):
        target = sum(p.numel() for p in MegaForCausalLM(cfg).parameters())
    d, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    per_layer = (target - v * d) / layers           # tied embeddings; per layer 4 D^2 (attention) + 3 D I (MLP)
    inter = max(64, int(round((per_layer - 4 * d * d - 2 * d) / (3 * d) / 64)) * 64)
    heads = max(1, d // 64)
    lc = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(length, 4096),
                     tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(lc)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, {"intermediate_size": inter, "heads": heads}


def flops_per_token(impl: str, cfg, n_params: int, length: int) -> float:
    from megatrain.train.metrics import model_flops_per_token
    if impl == "llama":
        return 6.0 * n_params + 12.0 * cfg.num_hidden_layers * length * cfg.hidden_size * 0.5
    return model_flops_per_token(n_params, cfg.num_hidden_layers, cfg.chunk_size, cfg.shared_representation_size,
                                 cfg.intermediate_size, causal=True)


def worker(a) -> list:
    import torch
    dev = torch.device(a.device)
    cfg = mega_config(a)
    lengths = a.lengths
    if a.longest:
        lengths, L = [], a.start_length
        while L <= a.max_length:
            lengths.append(L)
            L *= 2
    extra = {}
    if a.worker == "megatrain":
        from megatrain.model import MegaForCausalLM
        from megatrain.parallel.checkpointing import apply_checkpointing, policy_from_config
        torch.manual_seed(0)
        model = MegaForCausalLM(cfg)
        # what the trainer applies for model.gradient_checkpointing and train.offload_activations
        apply_checkpointing(model, policy_from_config(cfg.gradient_checkpointing, a.offload))
    elif a.worker == "hf":
        from transformers.models.deprecated.mega.modeling_mega import MegaForCausalLM as HFMega
        model = HFMega.from_pretrained(a.model_dir)
        model.config.use_cache = False  # transformers' MEGA has no gradient checkpointing: it runs without
        extra["gradient_checkpointing"] = False
    else:
        torch.manual_seed(0)
        model, extra = llama_model(cfg, max(lengths))
    model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items()
                 if dev.type == "cuda" and k in torch.cuda.get_device_name()), None)
    records = []

    def step(ids):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            if a.worker == "megatrain":
                out = model(ids, labels=ids, return_logits=False)
            else:
                out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    for L in lengths:
        rec = {"impl": a.worker, "seq_len": L, "params": n_params, **extra,
               "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
        try:
            g = torch.Generator().manual_seed(L)
            ids = torch.randint(5, cfg.vocab_size, (1, L), generator=g).to(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            rec["loss_first"] = step(ids)
            _sync(dev)
            rec["warmup_s"] = time.perf_counter() - t0
            steps = 1 if a.longest else a.steps
            t0 = time.perf_counter()
            for _ in range(steps):
                step(ids)
            _sync(dev)
            dt = (time.perf_counter() - t0) / steps
            rec.update(step_s=dt, tokens_per_s=L / dt)
            fpt = flops_per_token(a.worker, cfg, n_params, L)
            rec["tflops"] = fpt * L / dt / 1e12
            if peak:
                rec["mfu"] = rec["tflops"] / peak
            if dev.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except torch.OutOfMemoryError:
            rec["status"] = "oom"
        except RuntimeError as e:  # e.g. cuDNN/cuBLAS allocation failures surface as RuntimeError
            if "out of memory" not in str(e).lower():
                raise
            rec["status"] = "oom"
        ids = None
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rec.setdefault("status", "ok")
        print(json.dumps(rec), flush=True)
        records.append(rec)
        if a.longest and (rec["status"] != "ok" or rec.get("warmup_s", 0) > a.time_cap):
            break
    return records


def _sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("bench_train_gpu: no CUDA device here; nothing measured (use --device cpu --tiny for a smoke run)",
                  file=sys.stderr)
            return 0
    impls = [i for i in a.impls if not (a.longest and i == "hf")]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        if "hf" in impls:  # megatrain's initial weights, as a transformers folder: both run the same model
            import torch
            from megatrain.hf import save_hf
            from megatrain.model import MegaForCausalLM
            torch.manual_seed(0)
            save_hf(MegaForCausalLM(mega_config(a)), tmp)
        for impl in impls:
            argv_w = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--model-dir", tmp,
                      "--lengths", ",".join(map(str, a.lengths)), "--steps", str(a.steps), "--device", a.device,
                      "--start-length", str(a.start_length), "--max-length", str(a.max_length),
                      "--time-cap", str(a.time_cap), "--kernel-backend", a.kernel_backend]
            argv_w += ["--longest"] * a.longest + ["--tiny"] * a.tiny + ["--offload"] * a.offload
            p = subprocess.run(argv_w, stdout=subprocess.PIPE, text=True)
            got = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
            for r in got:
                print(json.dumps(r), flush=True)
            if p.returncode:
                got.append({"impl": impl, "status": f"failed (exit {p.returncode})"})
                print(json.dumps(got[-1]), flush=True)
            records += got
    if a.out:
        with open(a.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
