"""Which EMA implementation runs: the one table, per GPU architecture, and the rule that reads it.

    from megatrain.ops.ema.paths import choose_path
    path = choose_path(requested_backend, u, path="auto")      # "scan" | "chunked" | "blocked"
Tests: PYTHONPATH=. python -m pytest -q tests/ops/test_ema_chunked.py -k path

The three paths (same contract, ops/ema/__init__.py):
  scan     triton_kernel.py   per-timestep recurrence in registers, chunks in parallel: latency-bound, but runs
                              a short input in few steps (decode: L = 1 is one step)
  chunked  triton_chunked.py  the Toeplitz/Vandermonde matmuls on tensor cores, tiles of C * 16 positions: built
                              for long inputs (a tile shorter than that is mostly padding)
  blocked  torch_blocked.py   PyTorch (cuBLAS / MKL batched matmuls); the only path on CPU
`path="auto"` resolves the backend first (ops/backend.py): "torch" -> blocked; "triton" -> this table's row for
the device (CUDA capability; the Triton interpreter on CPU has its own row) picks by the sequence length L of the
call. An explicitly requested backend is honoured: with backend "triton" a row's "blocked" never runs (the row's
best kernel does), and an explicit `path` must agree with the backend (one-line ValueError otherwise).

The table holds REASONED defaults, not measurements (no GPU has run these kernels yet; `measured` says so per
row). The reasoning: the chunked kernel's program walks its (channel, row) in tiles of 1024 positions (C = 64,
16 chunks per matmul) with O(1) tensor-core matmuls per tile, the scan kernel spends ~C dependent steps per chunk;
below ~2 tiles the chunked tile is mostly padding and its fixed per-tile cost (the factor loads, two scans) is not
amortized, so short inputs stay on the scan. Unknown architectures keep what `auto` ran before this table (scan).
bench/gpu/bench_ema.py measures every path per length; its rows replace these entries (set measured=True).
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatrain.ops.backend import resolve_backend

EMA_PATHS = ("scan", "chunked", "blocked")

# row: (min_len, path) bands, ascending: the last band whose min_len <= L wins; `chunk` is the chunked kernel's
# C (a power of two in [16, 64]: its [C, C] Toeplitz tile lives in registers)
EMA_PATH_TABLE = {
    "sm_80": dict(measured=False, bands=((1, "scan"), (2048, "chunked")), chunk=64),     # A100
    "sm_90": dict(measured=False, bands=((1, "scan"), (2048, "chunked")), chunk=64),     # H100 / H200
    "cuda": dict(measured=False, bands=((1, "scan"),), chunk=64),                         # any other GPU
    "interpreter": dict(measured=False, bands=((1, "scan"),), chunk=64),                  # CPU, TRITON_INTERPRET=1
}


def device_row(u: Tensor) -> str:
    """The table row for the device of u."""
    if not u.is_cuda:
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(u.device)
    return f"sm_{major}{minor}" if f"sm_{major}{minor}" in EMA_PATH_TABLE else "cuda"


def chunk_length(block: int, row: str) -> int:
    """The chunked kernel's C for a requested block length: a power of two, at least 16 (tl.dot), at most the
    row's chunk."""
    c = 16
    while c < block and c < EMA_PATH_TABLE[row]["chunk"]:
        c *= 2
    return c


def choose_path(requested: str, u: Tensor, path: str = "auto") -> str:
    """The EMA path for a call on u [B, L, D] with backend `requested` (auto | torch | triton)."""
    if path not in ("auto",) + EMA_PATHS:
        raise ValueError(f"ema_scan: path={path!r}: must be one of auto, {', '.join(EMA_PATHS)}")
    if requested == "torch" and path not in ("auto", "blocked") or requested == "triton" and path == "blocked":
        raise ValueError(f"ema_scan: path={path!r} contradicts backend={requested!r} (blocked is the torch "
                         "backend; scan and chunked are triton)")
    backend = resolve_backend(requested if path in ("auto", "blocked") else "triton", u)
    if path != "auto":
        return path
    if backend == "torch":
        return "blocked"
    bands = [p for start, p in EMA_PATH_TABLE[device_row(u)]["bands"] if start <= u.shape[1]]
    if requested == "triton":  # asked for a kernel: the band's kernel below a "blocked" band, else the scan
        bands = [p for p in bands if p != "blocked"] or ["scan"]
    return bands[-1]
