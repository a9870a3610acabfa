"""glibc malloc settings a training process applies to itself, so its host memory is what the benchmarks measured.

    from megatrain.host_alloc import configure_host_allocator
    configure_host_allocator()          # at process start (launch/pretrain.py and the benchmarks call it)

Why: glibc serves an allocation from its heap arenas unless it is above the *mmap threshold*, and that threshold is
dynamic: every freed mmap-ed chunk raises it to that chunk's size, up to 32 MiB on 64-bit. A long-context step frees
many 1-32 MiB tensors (a [16K, 256] fp32 segment tensor is 16 MiB), so after the first step they all come from the
arenas, which fragment and keep their peak: a default process measured 8.83 GB at 262K tokens where the live memory
was ~2 GB, and was OOM-killed at 1M tokens in 24 GB. Fixing the threshold (mallopt(M_MMAP_THRESHOLD) also turns the
dynamic adjustment off) gives every tensor above it its own mapping, returned to the kernel when freed, while the
many small tensors stay in the (fast) arenas. 64 KiB (the benchmarks' old MALLOC_MMAP_THRESHOLD_ setting) cost +47%
step time in page faults; the default here is measured in BENCHMARKS.md ("Long context"). The trim threshold is set
with it so that freed arena tops return too.
No environment variable is needed, and an explicit MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ from the user wins.
A no-op where the C library is not glibc (macOS, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DEFAULT_MMAP_THRESHOLD = 1 << 20   # bytes; see the module docstring and BENCHMARKS.md for the choice
DEFAULT_TRIM_THRESHOLD = 32 << 20


def configure_host_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                             trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> dict:
    """Apply the settings (unless the user set the glibc variables); return what was applied, for the logs."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: mallopt's parameter numbers above are glibc's
    except (OSError, AttributeError, TypeError):
        return {}
    applied = {}
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, mmap_threshold),
                              ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, trim_threshold)):
        if env in os.environ or value is None:
            continue
        if mallopt(ctypes.c_int(param), ctypes.c_int(int(value))) == 1:
            applied[env.strip("_").lower()] = int(value)
    return applied
