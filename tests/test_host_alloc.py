"""megatrain.host_alloc: a process that applies it gives freed large tensors back to the kernel; glibc's defaults keep
them in fragmented arenas (the long-context step's 16 MiB segment tensors: 8.83 GB peak at 262K tokens).

Run: python -m pytest -q tests/test_host_alloc.py
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, sys
    if sys.argv[1] == "configured":
        from megatrain.host_alloc import configure_host_allocator
        assert configure_host_allocator(), "no glibc?"
    import torch

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    torch.empty(4 << 20).fill_(1)   # one 16 MiB tensor freed: glibc raises its dynamic mmap threshold past it
    base = rss_mb()
    keep = []
    for _ in range(3):              # a step's pattern: large activations freed, small tensors kept between them
        big = []
        for i in range(24):
            big.append(torch.empty(4 << 20).fill_(1.0))   # 16 MiB each
            keep.append(torch.ones(32 << 10))             # a small (128 KiB) long-lived tensor on top of it
        del big
    print(json.dumps({"retained_mb": rss_mb() - base}))
""")


def _probe(code: str, arg: str, **env) -> tuple:
    """Run a probe in a fresh interpreter with only `env` set (no MALLOC_* variables: a user's default process);
    return its stdout and its last line's JSON."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ".", **env}
    p = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout, json.loads(p.stdout.strip().splitlines()[-1])


def _retained(mode: str) -> float:
    return _probe(PROBE, mode)[1]["retained_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_tensors_return_to_the_kernel():
    # the small tensor is 128 KiB (not 256 B) so that it lands on the heap's top, not in an older hole: with a tiny one
    # glibc's default process retained 65-800 MB by chance (Python's own holes), a flaky test
    default, configured = _retained("default"), _retained("configured")
    # 24 x 16 MiB = 384 MiB freed per round: glibc's defaults keep most of it, the configured process ~none
    assert default > 200, default
    assert configured < 40, configured


HUGE_PROBE = textwrap.dedent("""
    import json, runpy, sys
    if sys.argv[1] == "configured":  # the job's entry point, as `deepspeed launch/pretrain.py` starts it
        runpy.run_path("launch/pretrain.py", run_name="probe")
    import torch

    def anon_huge_mb():
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    base = anon_huge_mb()
    t = torch.empty(16 << 20).fill_(1.0)   # 64 MiB: a long-context step's larger activations
    print(json.dumps({"huge_mb": anon_huge_mb() - base}))
""")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def _huge_mb(mode: str, **env) -> float:
    return _probe(HUGE_PROBE, mode, **env)[1]["huge_mb"]


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs the kernel's THP in `madvise` mode (the common default)")
def test_large_tensors_fault_in_huge_pages_unless_the_user_says_no():
    # fresh mmap-ed pages cost a fault and a zeroing each: 2 MiB pages make a long-context step ~1.2x faster
    assert _huge_mb("configured") > 32                          # most of the 64 MiB tensor in 2 MiB pages
    assert _huge_mb("default") == 0                              # PyTorch alone does not madvise
    assert _huge_mb("configured", THP_MEM_ALLOC_ENABLE="0") == 0  # the user's explicit setting wins


REEXEC_PROBE = textwrap.dedent("""
    import json, os, runpy, sys
    with open("/proc/self/maps") as f:   # before any import can load the library itself
        mapped = f.read()
    print("start", flush=True)   # printed once per exec: twice when the entry point re-execs itself
    runpy.run_path("launch/pretrain.py", run_name="probe")
    print(json.dumps({"argv": sys.argv[1:], "ld_preload": os.environ.get("LD_PRELOAD"),
                      "mapped": [lib for lib in sys.argv[1:] if lib in mapped]}))
""")


def _a_preloadable_library() -> str:
    """tcmalloc where installed (what the entry point picks by itself), else a harmless library the probe does not
    load on its own (zlib): the mechanism is the same, LD_PRELOAD and a re-exec."""
    import ctypes.util
    import glob
    for name in ("tcmalloc_minimal", "tcmalloc", "z"):
        soname = ctypes.util.find_library(name)
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                  "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib"):
            if soname and glob.glob(os.path.join(d, soname)):
                return os.path.realpath(os.path.join(d, soname))
    pytest.skip("no shared library found to preload")


def _reexec(lib: str, **env) -> tuple:
    out, got = _probe(REEXEC_PROBE, lib, **env)
    return out.count("start"), got


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_entry_point_reexecs_once_under_the_chosen_malloc():
    lib = _a_preloadable_library()
    starts, got = _reexec(lib, MEGATRAIN_MALLOC=lib)   # or unset, where tcmalloc is installed
    assert starts == 2, starts                      # one re-exec, not a loop
    assert got["ld_preload"] == lib and got["mapped"] == [lib], got
    assert got["argv"] == [lib]                      # the arguments survive the re-exec
    starts, got = _reexec(lib, MEGATRAIN_MALLOC="system")
    assert (starts, got["ld_preload"], got["mapped"]) == (1, None, []), got
    starts, got = _reexec(lib, MEGATRAIN_MALLOC=lib, LD_PRELOAD="")   # the user's own LD_PRELOAD is left alone
    assert (starts, got["ld_preload"], got["mapped"]) == (1, "", []), got
