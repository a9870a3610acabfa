"""A cached transformers 5.x environment for the export tests (transformers 5 has no MEGA: remote code only).

    python -m tests.convert.tf5          # create/refresh it (what .ci/run does); prints its python
    from tests.convert.tf5 import tf5_python; py = tf5_python()   # path, or raises Unavailable(reason)

A venv with --system-site-packages (reuses this torch) at $MEGATRAIN_TF5_VENV, else
$XDG_CACHE_HOME/megatrain/tf5 (default ~/.cache/megatrain/tf5), into which pip installs "transformers>=5,<6".
"""
from __future__ import annotations

import os
import subprocess
import sys


class Unavailable(RuntimeError):
    pass


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
        raise Unavailable(f"no transformers 5.x venv at {d}")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", d], check=True, timeout=300)
    p = subprocess.run([py, "-m", "pip", "install", "-q", "transformers>=5,<6"], capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        raise Unavailable(f"pip install 'transformers>=5,<6' into {d} failed (registry unreachable?): "
                          f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    v = _version(py)
    if not (v and v.startswith("5.")):
        raise Unavailable(f"{d}: transformers {v} is not 5.x")
    return py


if __name__ == "__main__":
    print(tf5_python())
