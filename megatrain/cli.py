"""Command-line plumbing shared by the tools: one-line errors (exit 2) and outputs that appear whole or not at all.

Use (in a script such as data_tools/build_shards.py):
    from megatrain.cli import ArgumentParser, output_folder, run
    p = ArgumentParser(description=...)          # an argparse error is one line "prog: error: ...", exit 2
    with output_folder(a.out, "--out", replaceable=lambda names: "index.json" in names) as tmp:
        ...write into tmp...                     # renamed to a.out at the end; removed if anything fails
    if __name__ == "__main__": sys.exit(run(main, "build_shards"))
Bad input is a ValueError (DataError, ConfigError included) or an OSError (missing/unreadable/unwritable file):
``run`` prints it as one line naming what is wrong and returns 2; anything else is a bug and keeps its traceback.
Imports nothing heavy (the data tools start fast).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator

from megatrain.io import replace_folder


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): ``prog: error: argument --x: ...``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run(main: Callable[[list | None], int], prog: str, argv: list | None = None) -> int:
    """Call ``main(argv)``; bad input (ValueError, OSError) becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def output_folder(path: str, flag: str, replaceable: Callable[[list[str]], bool] = lambda names: False
                  ) -> Iterator[str]:
    """Yield a temporary sibling folder to write into; on success it becomes ``path``, on any error it is removed.

    ``path`` may be missing, an empty folder, or a folder whose file names ``replaceable(names)`` accepts (an
    earlier output of the same tool, replaced whole); anything else is refused before any work."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{flag} {path}: exists and is not a folder")
        names = sorted(os.listdir(path))
        if names and not replaceable(names):
            raise ValueError(f"{flag} {path}: folder is not empty (holds {names[0]!r}{' ...' if len(names) > 1 else ''}) "
                             f"and is not an earlier output of this tool; choose a new or empty folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write into {parent} (permission denied)")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        replace_folder(tmp, path)  # the old output stays whole until the new one is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
