"""Helpers of the GPU benchmarks: the CUDA check, timing, peak memory, errors as rows, rows streamed as they exist.

    from common import measure, model_config, require_cuda, row   # (scripts put bench/gpu on sys.path)
    row("attention", {"L": 4096, "path": "flex", "ms": 1.2})      # one JSON line: stdout, and appended to $BENCH_ROWS

Every measured row is written the moment it exists (bench/gpu/check.sh points BENCH_ROWS at a file in $OUT), so a
stage killed at its time limit keeps what it measured. Each row carries the commit and, for model rows, the op
backends as resolved on this device (op_backends) -- `auto` chooses silently, so the row says what ran.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import torch
import yaml

# MEGATRAIN_BENCH_CPU_SMOKE=1 runs the script's logic on CPU (tiny config, wall-clock timing): a check of the
# script itself before a GPU session, never a measurement
SMOKE = os.environ.get("MEGATRAIN_BENCH_CPU_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"


def device_name() -> str:
    return "cpu (smoke run)" if SMOKE else torch.cuda.get_device_name()


def _sync():
    if not SMOKE:
        torch.cuda.synchronize()


def empty_cache():
    if not SMOKE:
        torch.cuda.empty_cache()


def require_cuda(name: str) -> None:
    """Exit 0 with one line when there is no CUDA device (these benchmarks measure GPU kernels only)."""
    if not torch.cuda.is_available() and not SMOKE:
        print(f"{name}: no CUDA device here; this benchmark measures GPU kernels only (nothing run)")
        sys.exit(0)


def model_config(path: str):
    from megatrain.model import MegaConfig

    with open(path) as f:
        return MegaConfig(**yaml.safe_load(f)["model"])


def measure(step, warmup: int, repeat: int) -> dict:
    """Median ms of step() (CUDA events) and its peak allocated memory; an error (OOM, compile failure) as a row."""
    try:
        for _ in range(warmup):
            step()
        _sync()
        if not SMOKE:
            torch.cuda.reset_peak_memory_stats()
        base = 0 if SMOKE else torch.cuda.memory_allocated()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            _sync()  # (one step is long enough that host timing around a sync is what CUDA events would give)
            times.append((time.perf_counter() - t0) * 1e3)
        peak = 0 if SMOKE else torch.cuda.max_memory_allocated() - base
        return {"ms": round(sorted(times)[len(times) // 2], 3), "peak_mib": round(peak / 2**20, 1)}
    except Exception as e:  # one failing path must not hide the others' numbers
        _sync()
        empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The checkout's commit (+ "-dirty" when tracked files differ); CHECK_COMMIT where there is no .git."""
    if os.environ.get("CHECK_COMMIT"):
        return os.environ["CHECK_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + "-dirty" * bool(dirty)) if head else "unknown"


def op_backends(kernel_backend: str, device, attention_activation: str = "softmax",
                attention_dropout: float = 0.0) -> dict:
    """What each op of the model runs on `device` for this kernel_backend, after `auto` has chosen."""
    import torch

    from megatrain.ops.attention import kernel_covers
    from megatrain.ops.backend import resolve_backend
    from megatrain.ops.lm_loss import loss_backend

    x = torch.empty(1, device=device)
    kb = resolve_backend(kernel_backend, x)
    flex = os.environ.get("MEGATRAIN_FLEX_COMPILE") or ("inductor" if x.is_cuda else "none")
    return {"ema": "triton" if kb == "triton" else "torch_blocked",
            "attention": (f"flex(compile={flex})" if kb == "triton" and
                          kernel_covers(attention_activation, attention_dropout) else "torch"),
            "lm_loss": "liger" if loss_backend(kernel_backend, x) == "triton" else "blockwise"}


def row(bench: str, rec: dict) -> dict:
    """One measured row: printed as a JSON line and appended to $BENCH_ROWS at once (nothing is held back)."""
    out = {"bench": bench, **rec, "commit": commit(), "utc": time.strftime("%H:%M:%S", time.gmtime())}
    text = json.dumps(out, default=str)
    print(text, flush=True)
    path = os.environ.get("BENCH_ROWS")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")
    return out
