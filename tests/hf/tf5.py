"""A cached transformers 5.x environment for the export tests (transformers 5 has no MEGA: remote code only).

    python -m tests.hf.tf5          # create/refresh it (what .ci/run does); prints its python and the time
    from tests.hf.tf5 import tf5_python; py = tf5_python()   # path, or raises Unavailable(reason)
    py = tf5_python_for_test()           # in a test: created if missing; a failure FAILS the test, except that an
                                         # unreachable package registry skips it with that reason

A venv with --system-site-packages (reuses this torch) at $MEGATRAIN_TF5_VENV, else
$XDG_CACHE_HOME/megatrain/tf5 (default ~/.cache/megatrain/tf5), into which pip installs "transformers>=5,<6"
(~1 min, a few small wheels; see .ci/run).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

REQUIREMENT = "transformers>=5,<6"
# what pip prints when it cannot reach the index (as opposed to a broken venv or an unsatisfiable requirement)
_UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                          r"resolution|Name or service not known|Network is unreachable|Connection refused|"
                          r"ConnectTimeout|Read timed out|ProxyError|SSLError|No route to host")


class Unavailable(RuntimeError):
    pass


class RegistryUnreachable(Unavailable):
    """pip could not reach the package index: the one reason a test may skip instead of failing."""


def venv_dir() -> str:
    if os.environ.get("MEGATRAIN_TF5_VENV"):
        return os.environ["MEGATRAIN_TF5_VENV"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "megatrain", "tf5")


def _version(py: str):
    p = subprocess.run([py, "-c", "import transformers; print(transformers.__version__)"], capture_output=True,
                       text=True, timeout=120)
    return p.stdout.strip() if p.returncode == 0 else None


def tf5_python(create: bool = True) -> str:
    d = venv_dir()
    py = os.path.join(d, "bin", "python")
    v = _version(py) if os.path.exists(py) else None
    if v and v.startswith("5."):
        return py
    if not create:
        raise Unavailable(f"no transformers 5.x venv at {d} (create it: python -m tests.hf.tf5)")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", d], check=True, timeout=300)
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--retries", "2", REQUIREMENT], capture_output=True,
                       text=True, timeout=900)
    if p.returncode != 0:
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        if _UNREACHABLE.search(p.stderr):
            raise RegistryUnreachable(f"pip install '{REQUIREMENT}' into {d}: the package registry is unreachable "
                                      f"({last})")
        raise Unavailable(f"pip install '{REQUIREMENT}' into {d} failed: {last}")
    v = _version(py)
    if not (v and v.startswith("5.")):
        raise Unavailable(f"{d}: transformers {v} is not 5.x")
    return py


def tf5_python_for_test() -> str:
    import pytest
    try:
        return tf5_python()
    except RegistryUnreachable as e:
        pytest.skip(str(e))
    except Unavailable as e:
        pytest.fail(str(e), pytrace=False)


if __name__ == "__main__":
    t = time.perf_counter()
    print(tf5_python())
    print(f"transformers 5.x venv ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
