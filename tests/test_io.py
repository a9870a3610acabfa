"""megatrain.io, the one atomic writer: a reader sees the old or the new output, never half of one or a mix.

Run: PYTHONPATH=. python -m pytest -q tests/test_io.py
"""
import os

import pytest

from megatrain.io import atomic_file, atomic_write, replace_folder


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "latest"
    atomic_write(str(p), "step1", fsync=True)
    atomic_write(str(p), b"step2")
    assert p.read_text() == "step2" and os.listdir(tmp_path) == ["latest"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    p = tmp_path / "index.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(p)) as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["index.json"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_file(str(p), "a"):
            pass


def test_replace_folder_swaps_whole(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    replace_folder(str(new), str(out))
    assert os.listdir(out) == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["out"]
    fresh = tmp_path / ".b.tmp"
    fresh.mkdir()
    replace_folder(str(fresh), str(tmp_path / "b"))  # no old folder: a plain rename
    assert sorted(os.listdir(tmp_path)) == ["b", "out"]
