"""A cached transformers 5.x environment for the export tests (transformers 5 has no MEGA: remote code only).

    python -m tests.hf.tf5          # create/refresh it (what .ci/run does); prints its python and the time
    from tests.hf.tf5 import tf5_python; py = tf5_python()   # path, or raises Unavailable(reason)
    py = tf5_python_for_test()           # in a test: created if missing; a failure FAILS the test, except that an
                                         # unreachable package registry skips it with that reason

A venv at $MEGATRAIN_TF5_VENV, else $XDG_CACHE_HOME/megatrain/tf5 (default ~/.cache/megatrain/tf5), into which pip
installs REQUIREMENTS (~1 min, a few small wheels; see .ci/run): transformers 5 and the clients of
tests/hf/test_hf_clients.py that depend on it (peft, accelerate) or on its huggingface_hub (datasets), resolved
together so that they agree with transformers 5 (a cached venv missing one of them is completed). It reuses the
*running* interpreter's packages (torch, triton, ...) through a `.pth` file that lists this interpreter's
site-packages after the venv's own: not `--system-site-packages`, which inherits the *base* interpreter's packages, so that from inside a user's venv (where
torch lives) the 5.x venv had no torch. The `.pth` is rewritten whenever the running interpreter differs, so one cached
venv follows whichever environment runs the tests.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import sysconfig
import time

# what pip picked in a fresh venv (2026-12, over the dev extras): transformers 5.24.0, peft 0.21.2 and accelerate
# 1.16.0 (the dev extras' own: they satisfy these), huggingface_hub 1.33.0 (datasets 4.x wants it below 2.0;
# transformers 5 alone took 2.4). transformers 5 needs peft >= 0.18 (0.18.1 guards an import 5.x removed);
# accelerate >= 1.13 is the release projects moved to for transformers 5
REQUIREMENTS = ("transformers>=5,<6", "peft>=0.18.1", "accelerate>=1.13", "datasets>=4")
REQUIREMENT = " ".join(REQUIREMENTS)
# run in the venv: the REQUIREMENTS its interpreter does not satisfy (not installed, or another version)
_MISSING = """import sys, importlib.metadata as md
from packaging.requirements import Requirement
for r in map(Requirement, sys.argv[1:]):
    try:
        ok = r.specifier.contains(md.version(r.name), prereleases=True)
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        print(r)
"""
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


def installed_version(py: str):
    """transformers' version in interpreter `py` (None: not importable)."""
    p = subprocess.run([py, "-c", "import transformers; print(transformers.__version__)"], capture_output=True,
                       text=True, timeout=120)
    return p.stdout.strip() if p.returncode == 0 else None


def _missing(py: str) -> list[str]:
    p = subprocess.run([py, "-c", _MISSING, *REQUIREMENTS], capture_output=True, text=True, timeout=120)
    return p.stdout.split("\n")[:-1] if p.returncode == 0 else list(REQUIREMENTS)


PTH = "_megatrain_parent_site.pth"


def parent_site_dirs() -> list[str]:
    """The running interpreter's own site-packages (a venv's, when it runs in one), in sys.path order."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if os.path.isdir(p)))


def link_parent_site(d: str) -> None:
    """Point the venv at d to this interpreter's site-packages (after its own: its transformers 5 comes first)."""
    sites = glob.glob(os.path.join(d, "lib", "python*", "site-packages"))
    if not sites:  # not a venv made by create_venv (e.g. a stand-in interpreter): nothing to link
        return
    # `import` lines of a .pth run at start-up: addsitedir also processes the parent's own .pth files (editable
    # installs), as --system-site-packages would have
    want = "".join(f"import site; site.addsitedir({p!r})\n" for p in parent_site_dirs())
    pth = os.path.join(sites[0], PTH)
    if not os.path.exists(pth) or open(pth).read() != want:
        with open(pth, "w") as f:
            f.write(want)


def create_venv(d: str, with_pip: bool = True) -> None:
    subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), d], check=True,
                   timeout=300)
    link_parent_site(d)


def tf5_python(create: bool = True) -> str:
    d = venv_dir()
    py = os.path.join(d, "bin", "python")
    if os.path.exists(py) and create:
        link_parent_site(d)
    v = installed_version(py) if os.path.exists(py) else None
    missing = _missing(py) if v and v.startswith("5.") else None
    if missing == []:
        return py
    if not create:
        what = f"the venv at {d} lacks {', '.join(missing)}" if missing else f"no transformers 5.x venv at {d}"
        raise Unavailable(f"{what} (create it: python -m tests.hf.tf5)")
    if not os.path.exists(py):
        create_venv(d)
    run_pip(py, ["install", "-q", "--retries", "2", *REQUIREMENTS], f"pip install '{REQUIREMENT}' into {d}")
    v = installed_version(py)
    if not (v and v.startswith("5.")):
        raise Unavailable(f"{d}: transformers {v} is not 5.x")
    if _missing(py):
        raise Unavailable(f"{d}: pip installed, but {', '.join(_missing(py))} is still not satisfied")
    return py


def run_pip(py: str, args: list, what: str) -> None:
    """`py -m pip ARGS`; on failure RegistryUnreachable (the index could not be reached) or Unavailable, each
    naming `what` and pip's last line (also used by tests/hf/tf_tests.py)."""
    p = subprocess.run([py, "-m", "pip", *args], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        if _UNREACHABLE.search(p.stderr):
            raise RegistryUnreachable(f"{what}: the package registry is unreachable ({last})")
        raise Unavailable(f"{what} failed: {last}")


def for_test(make, *args):
    """make(*args) inside a test: an unreachable registry skips it (with pip's reason), any other failure fails."""
    import pytest
    try:
        return make(*args)
    except RegistryUnreachable as e:
        pytest.skip(str(e))
    except Unavailable as e:
        pytest.fail(str(e), pytrace=False)


def tf5_python_for_test() -> str:
    return for_test(tf5_python)


if __name__ == "__main__":
    t = time.perf_counter()
    print(tf5_python())
    print(f"transformers 5.x venv ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
