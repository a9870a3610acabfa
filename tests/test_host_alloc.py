"""megatrain.host_alloc: a process that applies it gives freed large tensors back to the kernel; glibc's defaults keep
them in fragmented arenas (the long-context step's 16 MiB segment tensors: 8.83 GB peak at 262K tokens).

Run: python -m pytest -q tests/test_host_alloc.py
"""
import json
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
            keep.append(torch.ones(64))                   # a small long-lived tensor on top of it
        del big
    print(json.dumps({"retained_mb": rss_mb() - base}))
""")


def _retained(mode: str) -> float:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}  # no MALLOC_* variables: a user's default process
    p = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])["retained_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_tensors_return_to_the_kernel():
    default, configured = _retained("default"), _retained("configured")
    # 24 x 16 MiB = 384 MiB freed per round: glibc's defaults keep most of it, the configured process ~none
    assert default > 200, default
    assert configured < 40, configured
