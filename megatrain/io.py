"""The one way megatrain writes an output that readers must see whole or not at all: temp + rename.

Usage::

    from megatrain.io import atomic_write, atomic_file, replace_folder
    atomic_write("runs/x/latest", "step00000040", fsync=True)    # text or bytes, one call
    with atomic_file("index.json") as f:                          # any writer: json.dump(..., f), tarfile, ...
        json.dump(obj, f)
    with atomic_file("shard-000000.tar", "wb") as f: ...          # binary
    replace_folder(tmp_dir, "out_hf/")                            # a finished folder takes the place of the old one

Why one module: a reader (a resuming run, ``ShardStream``, ``transformers``) must never find half a file or a folder
with old and new files mixed, and a crash must leave no stray temporary beside the target under the target's name.
The temporary lives in the target's folder (``os.replace`` is atomic only within one file system) and is named
``.<name>.tmp<pid>``: hidden, and per process, so two writers never share one. ``fsync=True`` makes the new content
durable before the rename (checkpoint pointers and manifests: a power loss must not leave ``latest`` empty).
Imports nothing heavy: the data tools use it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator, Union


def _tmp_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary beside ``path`` for writing; on a clean exit it replaces ``path``, on an error it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write(path: str, data: Union[str, bytes], fsync: bool = False) -> None:
    """Write ``data`` (str or bytes) to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)


def replace_folder(tmp: str, path: str) -> None:
    """Move the finished folder ``tmp`` to ``path`` (a sibling), replacing any folder there.

    The old folder stays whole until the new one is in place: it is renamed aside first, then removed, so a
    crash between the two renames leaves the old output under a hidden ``.<name>.old-*`` name, never a mix."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(path))}.old-",
                             dir=os.path.dirname(os.path.abspath(path)))
    os.replace(path, os.path.join(aside, "x"))
    os.replace(tmp, path)
    shutil.rmtree(aside, ignore_errors=True)
