"""One GPU, train steps as `precision: bf16` runs them: megatrain MEGA vs transformers 4.57.6 MEGA (same weights) vs
a same-size Llama (SDPA flash attention, Liger's fused linear cross-entropy).

    python bench/gpu/bench_train_gpu.py                                         # 32K, 4K, 128K; megatrain, llama, hf
    python bench/gpu/bench_train_gpu.py --longest --impls megatrain,llama       # doubling L until OOM / step time cap
    python bench/gpu/bench_train_gpu.py --device cpu --tiny --lengths 128,256   # check of this script (CPU)
    python bench/gpu/bench_train_gpu.py --impls megatrain,megalodon,llama --lengths 32768   # Megalodon beside them

A train step = forward with labels (causal LM loss) + backward + optimizer step, batch 1. --precision bf16 (the
default) is what DeepSpeed does for `train.precision: bf16`: bf16 parameters and gradients, an fp32 master copy
that AdamW updates and copies back (no autocast); fp32 is plain fp32. Gradient checkpointing on for megatrain (the
config's setting) and the Llama; transformers' MEGA does not support it (runs without). One untimed warm-up step
(it holds the compiles), then `--steps` timed steps.
Model: `configs/mega350m_128k.yaml`'s model section (344M parameters) unless `--tiny`. HF MEGA gets the same
weights (megatrain.hf.save_hf -> from_pretrained) and runs its use_cache=False path. The Llama has the same hidden size, depth,
vocabulary and tied embeddings, intermediate size matching the parameter count, SDPA restricted to its flash
backend (an error row where flash cannot run, never a silent fallback) and, where liger-kernel imports, Liger's
fused linear cross-entropy (no [L, V] logits: 16.8 GB fp32 at 128K) -- so the comparison is attention vs EMA.
Every row says what ran (op_backends) and its flops_per_token (megatrain.train.metrics.model_flops_per_token).

Each implementation runs in its own process (one CUDA context; OOM at one length does not stop the others); a
length that runs out of memory is a row with status "oom". Every row is one JSON line, printed and appended to
$BENCH_ROWS (or --out) the moment it is measured (bench/gpu/common.py), so a stage killed at its limit keeps them.
--longest stops at the first length whose *timed* step (not the warm-up, which holds compile time) exceeds
--time-cap; --offload keeps checkpointed layer inputs in host memory, but only where host RAM holds what that
pins (CUDA's pinned host allocator rounds each block up to a power of two) -- else the row runs without it and says.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run from a plain checkout on the GPU machine (no pip install there)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMPLS = ("megatrain", "llama", "hf")  # the order they run in: the most valuable rows first
# megatrain's Megalodon at the MEGA config's sizes (`--impls ...,megalodon`: not in the default list, so the GPU
# check's budget is unchanged; one more compiled attention variant per length)
ALL_IMPLS = IMPLS + ("megalodon",)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
TINY_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  shared_representation_size=32, nffn_hidden_size=128, ema_projection_size=8, use_chunking=True,
                  chunk_size=64, max_positions=64, normalization_type="layernorm", gradient_checkpointing=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32768,4096,131072", help="comma-separated sequence lengths (in order)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="bf16: bf16 params + fp32 master weights (DeepSpeed bf16); fp32: plain fp32")
    ap.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(ALL_IMPLS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per length (after one warm-up)")
    ap.add_argument("--hf-max-length", type=int, default=32768,
                    help="transformers' MEGA only up to this length (slow, and out of memory beyond)")
    ap.add_argument("--longest", action="store_true",
                    help="instead: double L from --start-length until a step runs out of memory or exceeds "
                         "--time-cap seconds (megatrain and llama)")
    ap.add_argument("--start-length", type=int, default=131072)
    ap.add_argument("--max-length", type=int, default=1 << 24)
    ap.add_argument("--time-cap", type=float, default=60.0,
                    help="seconds per timed step (not the warm-up) that end the --longest search")
    ap.add_argument("--offload", action="store_true",
                    help="megatrain: train.offload_activations (checkpointed layer inputs in host memory)")
    ap.add_argument("--kernel-backend", default="auto", help="megatrain MegaConfig.kernel_backend")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke runs on CPU)")
    ap.add_argument("--out", default=None, help="append every row here as a JSON line (default: $BENCH_ROWS)")
    ap.add_argument("--worker", choices=ALL_IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.lengths = [int(s) for s in a.lengths.split(",") if s]
    a.impls = [s for s in a.impls.split(",") if s]
    bad = [s for s in a.impls if s not in ALL_IMPLS]
    if bad:
        ap.error(f"--impls: unknown {bad[0]!r} (expected some of {','.join(ALL_IMPLS)})")
    return a


def megalodon_config(cfg):
    """Megalodon at a MEGA config's sizes: hidden, depth, vocabulary, Z, V (intermediate), FFN, chunk, segments,
    kernels and checkpointing; one head, timestep-norm groups of 32 features, no dropout."""
    from megatrain.model import MegalodonConfig
    return MegalodonConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                           num_hidden_layers=cfg.num_hidden_layers,
                           shared_representation_size=cfg.shared_representation_size,
                           intermediate_size=cfg.intermediate_size, nffn_hidden_size=cfg.nffn_hidden_size,
                           chunk_size=cfg.chunk_size, norm_num_groups=max(1, cfg.hidden_size // 32),
                           kernel_backend=cfg.kernel_backend, gradient_checkpointing=cfg.gradient_checkpointing,
                           segment_size=cfg.segment_size)


def mega_config(a):
    from megatrain.config import load_config
    from megatrain.model import MegaConfig
    if a.tiny:
        cfg = MegaConfig(**TINY_MODEL, is_decoder=True, bidirectional=False)
    else:
        cfg = load_config(os.path.join(ROOT, "configs", "mega350m_128k.yaml"), ["data.shards=unused"]).model
    extra = {"kernel_backend": a.kernel_backend}
    if a.tiny and a.longest:
        extra["segment_size"] = 2 * TINY_MODEL["chunk_size"]  # as the 350M config: segments within the context
    return cfg.replace(dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       nffn_activation_dropout_prob=0.0, **extra)


def llama_model(cfg, length: int, device, checkpointing: bool = True):
    """A Llama of MEGA's width, depth and vocabulary with the intermediate size that matches the parameter count;
    Liger's fused linear cross-entropy where liger-kernel runs here."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from megatrain.model import MegaForCausalLM
    import torch
    with torch.device("meta"):
        target = sum(p.numel() for p in MegaForCausalLM(cfg).parameters())
    d, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    per_layer = (target - v * d) / layers           # tied embeddings; per layer 4 D^2 (attention) + 3 D I (MLP)
    inter = max(64, int(round((per_layer - 4 * d * d - 2 * d) / (3 * d) / 64)) * 64)
    heads = max(1, d // 64)
    loss = "logits+cross_entropy (liger-kernel does not run here)"
    if torch.device(device).type == "cuda":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, cross_entropy=False)
            loss = "liger_fused_linear_cross_entropy"
        except ImportError as e:
            loss = f"logits+cross_entropy (liger-kernel: {e})"
    lc = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(length, 4096),
                     tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(lc)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, {"intermediate_size": inter, "heads": heads,
                   "op_backends": {"attention": "sdpa_flash", "lm_loss": loss}}


def flops_per_token(impl: str, cfg, n_params: int, length: int, heads: int = 1) -> float:
    """megatrain.train.metrics.model_flops_per_token: MEGA's chunked single-head attention (span = chunk, Z + E),
    the Llama's full causal attention (span = L, q.k over D and p.v over D: all heads together)."""
    from megatrain.train.metrics import model_flops_per_token
    if impl == "llama":
        return model_flops_per_token(n_params, cfg.num_hidden_layers, length, cfg.hidden_size, cfg.hidden_size,
                                     causal=True)
    span = min(cfg.chunk_size, length) if cfg.use_chunking else length
    return model_flops_per_token(n_params, cfg.num_hidden_layers, span, cfg.shared_representation_size,
                                 cfg.intermediate_size, causal=True)


class MasterWeights:
    """What DeepSpeed's bf16 mode does to the parameters: they (and their gradients) are bf16; an fp32 copy is the
    one AdamW updates (its states fp32 too), copied back into the bf16 parameters after each step."""

    def __init__(self, model, lr: float, fused: bool):
        import torch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, fused=fused)

    def step(self):
        import torch
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)
        for p, m in zip(self.params, self.master):
            p.grad = m.grad = None


def host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


def offload_pinned_bytes(cfg, length: int, elem_bytes: int) -> int:
    """Host memory offload pins: every layer's checkpointed input [L, D], each block rounded up to a power of two
    by CUDA's caching host allocator (segments: one block per (layer, segment) piece)."""
    piece = cfg.segment_size if cfg.segment_size and length > cfg.segment_size else length
    block = 1 << (piece * cfg.hidden_size * elem_bytes - 1).bit_length()
    return cfg.num_hidden_layers * (length // piece) * block


def worker(a) -> list:
    import torch
    from common import op_backends, row
    dev = torch.device(a.device)
    cfg = mega_config(a)
    lengths = a.lengths
    if a.longest:
        lengths, L = [], a.start_length
        while L <= a.max_length:
            lengths.append(L)
            L *= 2
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    if dev.type == "cpu" and a.kernel_backend == "triton":  # a dry run of the GPU paths (TRITON_INTERPRET=1):
        import torch.nn.attention.flex_attention as flex_mod  # lift the CPU refusal of FlexAttention's backward,
        flex_mod._validate_device = lambda *args: None        # as the op tests do (same math, eager)
    extra = {}
    if a.worker in ("megatrain", "megalodon"):
        from megatrain.model import MegaForCausalLM, MegalodonForCausalLM
        from megatrain.parallel.checkpointing import apply_checkpointing, policy_from_config
        torch.manual_seed(0)
        if a.worker == "megalodon":
            cfg = megalodon_config(cfg)
            model = MegalodonForCausalLM(cfg)
        else:
            model = MegaForCausalLM(cfg)
        # what the trainer applies for model.gradient_checkpointing (train.offload_activations: per row, below)
        apply_checkpointing(model, policy_from_config(cfg.gradient_checkpointing))
        extra["op_backends"] = op_backends(cfg.kernel_backend, dev, getattr(cfg, "attention_activation", "softmax"),
                                           cfg.attention_probs_dropout_prob)
    elif a.worker == "hf":
        from transformers.models.deprecated.mega.modeling_mega import MegaForCausalLM as HFMega
        model = HFMega.from_pretrained(a.model_dir)
        model.config.use_cache = False  # transformers' MEGA has no gradient checkpointing: it runs without
        extra["gradient_checkpointing"] = False
        extra["op_backends"] = {"ema": "transformers (FFT)", "attention": "transformers", "lm_loss": "logits"}
    else:
        torch.manual_seed(0)
        model, extra = llama_model(cfg, max(lengths), dev)
    model.to(device=dev, dtype=dtype).train()
    n_params = sum(p.numel() for p in model.parameters())
    fused = dev.type == "cuda"
    if a.precision == "bf16":
        opt = MasterWeights(model, 1e-4, fused)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items()
                 if dev.type == "cuda" and k in torch.cuda.get_device_name()), None)
    import contextlib
    sdpa = contextlib.nullcontext
    if a.worker == "llama":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731  (an error where flash cannot run)
    applied_offload = [False]

    def set_offload(offload: bool) -> None:  # what train.offload_activations applies (parallel/checkpointing.py)
        if a.worker in ("megatrain", "megalodon") and offload != applied_offload[0]:
            apply_checkpointing(model, policy_from_config(cfg.gradient_checkpointing, offload))
            applied_offload[0] = offload

    def step(ids, offload):
        with sdpa():
            if a.worker in ("megatrain", "megalodon"):
                set_offload(offload)
                out = model(ids, labels=ids, return_logits=False)
            else:
                out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        if a.precision != "bf16":
            opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    records = []
    for L in lengths:
        rec = {"impl": a.worker, "seq_len": L, "precision": a.precision, "params": n_params, **extra,
               "flops_per_token": flops_per_token(a.worker, cfg, n_params, L),
               "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
        offload = a.offload and a.worker in ("megatrain", "megalodon")
        if offload:
            need, have = offload_pinned_bytes(cfg, L, dtype.itemsize), host_available_bytes()
            offload = need <= 0.8 * have
            rec["offload"] = offload
            if not offload:
                rec["offload_skipped"] = f"would pin {need / 2**30:.0f} GiB > 80% of {have / 2**30:.0f} GiB available"
        try:
            g = torch.Generator().manual_seed(L)
            ids = torch.randint(5, cfg.vocab_size, (1, L), generator=g).to(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            rec["loss_first"] = step(ids, offload)
            _sync(dev)
            rec["warmup_s"] = time.perf_counter() - t0
            steps = 1 if a.longest else a.steps
            t0 = time.perf_counter()
            for _ in range(steps):
                step(ids, offload)
            _sync(dev)
            dt = (time.perf_counter() - t0) / steps
            rec.update(step_s=dt, tokens_per_s=L / dt)
            rec["tflops"] = rec["flops_per_token"] * L / dt / 1e12
            if peak:
                rec["mfu"] = rec["tflops"] / peak
            if dev.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except torch.OutOfMemoryError:
            rec["status"] = "oom"
        except Exception as e:  # a row, not a crash: the other lengths still run (cuBLAS OOM is a RuntimeError)
            rec["status"] = "oom" if "out of memory" in str(e).lower() else "error"
            if rec["status"] == "error":
                rec["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        ids = None
        if a.precision != "bf16":
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rec.setdefault("status", "ok")
        records.append(row("model-longest" if a.longest else "model", rec))
        if rec["status"] == "error" and not a.longest:
            continue
        if a.longest and (rec["status"] != "ok" or rec.get("step_s", 0) > a.time_cap):
            break
    return records


def _sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.out:
        os.environ["BENCH_ROWS"] = os.path.abspath(a.out)  # the workers inherit it
    if a.worker:
        worker(a)
        return 0
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("bench_train_gpu: no CUDA device here; nothing measured (use --device cpu --tiny for a smoke run)",
                  file=sys.stderr)
            return 0
    from common import row
    impls = [i for i in a.impls if not (a.longest and i == "hf")]
    with tempfile.TemporaryDirectory() as tmp:
        if "hf" in impls:  # megatrain's initial weights, as a transformers folder: both run the same model
            import torch
            from megatrain.hf import save_hf
            from megatrain.model import MegaForCausalLM
            torch.manual_seed(0)
            save_hf(MegaForCausalLM(mega_config(a)), tmp)
        for impl in impls:
            lengths = [L for L in a.lengths if impl != "hf" or L <= a.hf_max_length]
            if not lengths:
                continue
            argv_w = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--model-dir", tmp,
                      "--lengths", ",".join(map(str, lengths)), "--steps", str(a.steps), "--device", a.device,
                      "--start-length", str(a.start_length), "--max-length", str(a.max_length),
                      "--time-cap", str(a.time_cap), "--kernel-backend", a.kernel_backend,
                      "--precision", a.precision]
            argv_w += ["--longest"] * a.longest + ["--tiny"] * a.tiny + ["--offload"] * a.offload
            p = subprocess.run(argv_w)  # the worker streams its rows itself
            if p.returncode:
                row("model-longest" if a.longest else "model",
                    {"impl": impl, "status": f"failed (exit {p.returncode})"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
