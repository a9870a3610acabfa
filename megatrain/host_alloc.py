"""Host malloc for a training process, applied by the process itself, so its memory is what the benchmarks measured.

    from megatrain.host_alloc import configure_host_allocator, preload_fast_malloc
    preload_fast_malloc()               # first line of an entry point: re-execs under tcmalloc where it is installed
    configure_host_allocator()          # then, before torch allocates (launch/pretrain.py, the benchmarks)

Why: with glibc's defaults a long-context CPU step's freed 1-32 MiB tensors come back from heap arenas that fragment
and keep their peak (OOM at 1M tokens in 24 GB). So:
- tcmalloc where the system has it (`apt install libtcmalloc-minimal4`; no wheel ships it): the entry point re-execs
  itself with it in LD_PRELOAD (same PID and arguments: launchers do not notice). MEGATRAIN_MALLOC=system keeps
  glibc's malloc, MEGATRAIN_MALLOC=/path/lib.so preloads that library, a user's own LD_PRELOAD is left alone.
- otherwise glibc with a fixed M_MMAP_THRESHOLD (every large tensor its own mapping, returned when freed; fixing it
  also turns glibc's dynamic raise off) and M_TRIM_THRESHOLD, plus PyTorch's transparent-huge-page allocation
  (THP_MEM_ALLOC_ENABLE=1) so the fresh mappings fault in 2 MiB pages. PyTorch reads that variable once, at its
  first allocation of any size, so this runs before torch allocates anything (launch/pretrain.py calls it before
  importing the trainer).
A user's own MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/THP_MEM_ALLOC_ENABLE win. A no-op where the C library is
not glibc (macOS, musl). The measurements behind each choice (peak memory and step time of every option, both
ways): BENCHMARKS.md, "The memory a user's process gets".
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
MALLOC_ENV = "MEGATRAIN_MALLOC"           # auto (unset) | system | the path of a malloc library to preload
FAST_MALLOCS = ("tcmalloc_minimal", "tcmalloc")   # ctypes.util.find_library names, first found wins


def malloc_setting() -> str:
    """MEGATRAIN_MALLOC as given (auto, system or a library's path); ValueError naming it when it is none of those.
    Cheap (no library search), so trainer.main checks it on every rank before any work."""
    choice = os.environ.get(MALLOC_ENV, "auto")
    if choice not in ("auto", "system") and not os.path.isfile(choice):
        raise ValueError(f"{MALLOC_ENV}={choice!r}: no such file (expected auto, system or the path of a malloc "
                         f"library such as /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)")
    return choice


def malloc_choice() -> str | None:
    """The library to preload (a soname or a path), or None for glibc's malloc; ValueError on a bad MEGATRAIN_MALLOC."""
    choice = malloc_setting()
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "auto":
        return next(filter(None, map(ctypes.util.find_library, FAST_MALLOCS)), None)
    return choice


def preload_fast_malloc() -> None:
    """Re-exec this process with the chosen malloc in LD_PRELOAD; returns when none is due (already preloaded, the
    user's own LD_PRELOAD, none installed, MEGATRAIN_MALLOC=system) or the value is bad (the caller's validation
    reports it: trainer.main says it once, exit 2). Call it before anything else starts: threads, files, torch."""
    if "LD_PRELOAD" in os.environ:   # ours after the re-exec (so this runs once), or the user's: theirs wins
        return
    try:
        lib = malloc_choice()
    except ValueError:
        return
    if lib is None:
        return
    os.environ["LD_PRELOAD"] = lib
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)   # orig_argv keeps the interpreter's own flags (deepspeed's -u)


def configure_host_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
                             trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> dict:
    """Apply the settings (unless the user set the variables); return what was applied, for the logs."""
    applied = {}
    if HUGE_PAGES_ENV not in os.environ and sys.platform.startswith("linux"):
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
