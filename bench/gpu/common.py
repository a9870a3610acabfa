"""Helpers of the GPU micro-benchmarks: the CUDA check, timing with CUDA events, peak memory, errors as rows.

    from common import emit, measure, model_config, require_cuda   # (scripts put bench/gpu on sys.path)
"""
from __future__ import annotations

import json
import os
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


def emit(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
