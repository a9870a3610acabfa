"""transformers' own model-test mixins, from its source distribution on the package registry (never committed).

    python -m tests.hf.tf_tests [VERSION]     # fetch/refresh (what .ci/run does); default: this python's transformers
    python -m tests.hf.tf_tests --tf5         # ... for the version in the 5.x venv (tests/hf/tf5.py; made if missing)
    from tests.hf.tf_tests import tests_dir; d = tests_dir("4.57.6")   # the folder to put on sys.path, or raises
    d = tests_dir_for_test(version)             # in a test: fetched if missing; a failure FAILS the test, except that
                                                # an unreachable package registry skips it with pip's reason

pip downloads the sdist (`pip download --no-deps --no-binary :all: transformers==VERSION`, ~15 s) and its `tests/`
is unpacked into $MEGATRAIN_TF_TESTS_CACHE/VERSION, else $XDG_CACHE_HOME/megatrain/tf-tests/VERSION (default
~/.cache/megatrain/tf-tests/VERSION), as the package `transformers_tests`: this repository's own `tests` package
would shadow a package named `tests`. Import it as `transformers_tests.test_modeling_common`.

What the sdists hold (checked for 4.57.6 and 5.24.0): only the top-level `tests/test_*.py` files
(test_modeling_common.py, test_configuration_common.py, test_pipeline_mixin.py, ...). The sub-packages they import
-- tests/generation/test_utils.py (GenerationTesterMixin), tests/utils/, tests/pipelines/, tests/exporters/ (5.x)
-- are NOT in them, and no other registry file carries them. So each module a fetched file imports but the sdist
lacks is written as a *placeholder* (a module whose every name is an empty class, marked `_megatrain_placeholder`):
test_modeling_common.py imports, and ModelTesterMixin runs whole; GenerationTesterMixin, the pipeline tests and
ConfigTester's common kwargs do not exist there. `placeholders(d)` lists what was stubbed (PLACEHOLDERS.txt).
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time

from tests.hf.tf5 import Unavailable, for_test, run_pip

PACKAGE = "transformers_tests"
_VERSION = r"[0-9][0-9A-Za-z.+-]*"
DONE = ".complete"
PLACEHOLDER_LIST = "PLACEHOLDERS.txt"
# the fetched files whose relative imports must resolve (everything else of tests/ is unpacked but not needed)
NEEDED = ("test_modeling_common.py", "test_configuration_common.py")
PLACEHOLDER = '''"""Placeholder written by megatrain's tests/hf/tf_tests.py: transformers' sdist does not ship
{module} (imported by {importer}); every name imported from here is an empty class."""
_megatrain_placeholder = True


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {{"_megatrain_placeholder": True, "__module__": __name__}})
'''


def cache_root() -> str:
    if os.environ.get("MEGATRAIN_TF_TESTS_CACHE"):
        return os.environ["MEGATRAIN_TF_TESTS_CACHE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "megatrain", "tf-tests")


def _installed_version() -> str:
    import transformers
    return transformers.__version__


def placeholders(d: str) -> list[str]:
    """The modules of `transformers_tests` that are placeholders in folder d (e.g. generation.test_utils)."""
    p = os.path.join(d, PACKAGE, PLACEHOLDER_LIST)
    return open(p).read().split() if os.path.exists(p) else []


def _relative_imports(path: str, pkg_dir: str) -> list[tuple[str, str]]:
    """(module file relative to pkg_dir without .py, dotted name) for each `from .x.y import ...` of path."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    here = os.path.relpath(os.path.dirname(path), pkg_dir)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and node.module:
            base = [] if here == "." else here.split(os.sep)
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            parts = base + node.module.split(".")
            out.append((os.path.join(*parts), ".".join(parts)))
    return out


def _complete(pkg_dir: str) -> list[str]:
    """Make pkg_dir an importable package: __init__.py in every folder, a placeholder for each missing module
    that NEEDED files import. Returns the placeholders' dotted names."""
    stubbed = []
    for name in NEEDED:
        path = os.path.join(pkg_dir, name)
        if not os.path.exists(path):
            continue
        for rel, dotted in _relative_imports(path, pkg_dir):
            target = os.path.join(pkg_dir, rel)
            if os.path.exists(target + ".py") or os.path.isdir(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target + ".py", "w") as f:
                f.write(PLACEHOLDER.format(module=f"tests/{rel}.py", importer=f"tests/{name}"))
            stubbed.append(dotted)
    for root, _, files in os.walk(pkg_dir):
        if "__init__.py" not in files:
            open(os.path.join(root, "__init__.py"), "w").close()
    with open(os.path.join(pkg_dir, PLACEHOLDER_LIST), "w") as f:
        f.write("".join(s + "\n" for s in sorted(stubbed)))
    return stubbed


def tests_dir(version: str | None = None, create: bool = True) -> str:
    """The folder holding `transformers_tests` for transformers `version` (default: this python's)."""
    version = version or _installed_version()
    if not re.fullmatch(_VERSION, version):
        raise Unavailable(f"not a transformers version: {version!r}")
    d = os.path.join(cache_root(), version)
    if os.path.exists(os.path.join(d, PACKAGE, DONE)):
        return d
    if not create:
        raise Unavailable(f"no transformers {version} tests at {d} (fetch them: python -m tests.hf.tf_tests {version})")
    with tempfile.TemporaryDirectory() as tmp:
        req = f"transformers=={version}"
        run_pip(sys.executable, ["download", "-q", "--retries", "2", "--no-deps", "--no-binary", ":all:", req,
                                 "-d", tmp], f"pip download {req} (sdist)")
        tars = glob.glob(os.path.join(tmp, "*.tar.gz"))
        if len(tars) != 1:
            raise Unavailable(f"pip download {req}: expected one sdist, got {os.listdir(tmp)}")
        staging = os.path.join(tmp, "unpacked")
        with tarfile.open(tars[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and len(m.name.split("/")) > 2 and m.name.split("/")[1] == "tests"]
            if not any(m.name.endswith("/tests/test_modeling_common.py") for m in members):
                raise Unavailable(f"the sdist of {req} has no tests/test_modeling_common.py")
            for m in members:
                rel = os.path.join(*m.name.split("/")[2:])
                if ".." in rel.split(os.sep):
                    continue
                dst = os.path.join(staging, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with tar.extractfile(m) as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out)
        _complete(staging)
        open(os.path.join(staging, DONE), "w").write(version + "\n")
        os.makedirs(d, exist_ok=True)
        final = os.path.join(d, PACKAGE)
        shutil.rmtree(final, ignore_errors=True)
        shutil.move(staging, final)
    return d


def tests_dir_for_test(version: str | None = None) -> str:
    return for_test(tests_dir, version)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) > 1 or (args and args[0].startswith("-") and args[0] != "--tf5"):
        print("usage: python -m tests.hf.tf_tests [VERSION | --tf5]", file=sys.stderr)
        sys.exit(2)
    t = time.perf_counter()
    try:
        version = args[0] if args else None
        if version == "--tf5":
            from tests.hf.tf5 import installed_version, tf5_python
            version = installed_version(tf5_python())
            if version is None:
                raise Unavailable("the transformers 5.x venv cannot import transformers")
        if version and not re.fullmatch(_VERSION, version):
            print(f"error: not a transformers version: {version!r}", file=sys.stderr)
            sys.exit(2)
        out = tests_dir(version)
    except Unavailable as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(out)
    stubs = placeholders(out)
    print(f"transformers tests ready in {time.perf_counter() - t:.1f} s"
          + (f"; placeholders for what the sdist lacks: {', '.join(stubs)}" if stubs else ""), file=sys.stderr)
