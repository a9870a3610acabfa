"""glibc malloc settings a training process applies to itself, so its host memory is what the benchmarks measured.

    from megatrain.host_alloc import configure_host_allocator
    configure_host_allocator()          # at process start, before torch allocates (launch/pretrain.py, the benchmarks)

Why: glibc serves an allocation from its heap arenas unless it is above the *mmap threshold*, and that threshold is
dynamic: every freed mmap-ed chunk raises it to that chunk's size, up to 32 MiB on 64-bit. A long-context step frees
many 1-32 MiB tensors (a [16K, 256] fp32 segment tensor is 16 MiB), so after the first step they all come from the
arenas, which fragment and keep their peak: a default process measured 8.83 GB at 262K tokens where the live memory
was ~2 GB, and was OOM-killed at 1M tokens in 24 GB. Fixing the threshold (mallopt(M_MMAP_THRESHOLD) also turns the
dynamic adjustment off) gives every tensor above it its own mapping, returned to the kernel when freed, while the
many small tensors stay in the (fast) arenas. 64 KiB (the benchmarks' old MALLOC_MMAP_THRESHOLD_ setting) cost +47%
step time in page faults; the default here is measured in BENCHMARKS.md ("Long context"). The trim threshold is set
with it so that freed arena tops return too.
The price of handing memory back is the kernel's fault-and-zero of every fresh page on next touch (~0.4 s per GB in
4 KiB pages; a long-context step at 131K tokens allocates ~100 GB of 1-64 MiB tensors): +32% step time measured.
So the process also turns on PyTorch's own transparent-huge-page allocation (THP_MEM_ALLOC_ENABLE=1: tensors of
2 MiB and more are madvise(MADV_HUGEPAGE)-d), which faults them in 2 MiB pages: ~0.12 s per GB, and the step is
within 9% of glibc's defaults at the same bounded memory (BENCHMARKS.md, "The memory a user's process gets").
PyTorch reads that variable once, at its first allocation of any size (a torch.ones(1) is enough to miss it), so
this runs before torch allocates anything: launch/pretrain.py calls it before importing the trainer.
No environment variable is needed, and an explicit MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/THP_MEM_ALLOC_ENABLE
from the user wins (THP_MEM_ALLOC_ENABLE=0 turns the huge pages off). The kernel must allow madvise-d huge pages
(/sys/kernel/mm/transparent_hugepage/enabled: `madvise` or `always`); where it does not, the setting does nothing.
A no-op where the C library is not glibc (macOS, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DEFAULT_MMAP_THRESHOLD = 1 << 20   # bytes; see the module docstring and BENCHMARKS.md for the choice
DEFAULT_TRIM_THRESHOLD = 32 << 20
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"   # read by PyTorch's CPU allocator (c10 alloc_cpu), not by glibc


def configure_host_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                             trim_threshold: int = DEFAULT_TRIM_THRESHOLD, huge_pages: bool = True) -> dict:
    """Apply the settings (unless the user set the variables); return what was applied, for the logs."""
    applied = {}
    if huge_pages and HUGE_PAGES_ENV not in os.environ and sys.platform.startswith("linux"):
        os.environ[HUGE_PAGES_ENV] = "1"   # before PyTorch's first allocation: it reads it once
        applied[HUGE_PAGES_ENV.lower()] = 1
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: mallopt's parameter numbers above are glibc's
    except (OSError, AttributeError, TypeError):
        return applied
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, mmap_threshold),
                              ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, trim_threshold)):
        if env in os.environ or value is None:
            continue
        if mallopt(ctypes.c_int(param), ctypes.c_int(int(value))) == 1:
            applied[env.strip("_").lower()] = int(value)
    return applied
