"""data_tools/demo_corpus.py --corpus python-stdlib: the interpreter's standard library as a code corpus.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_demo_corpus.py
"""
import os
import subprocess
import sys
import sysconfig

from tests.dist_util import ROOT

DEMO = os.path.join(ROOT, "data_tools", "demo_corpus.py")


def _files(folder):
    return {n: open(os.path.join(folder, n), encoding="utf-8").read() for n in sorted(os.listdir(folder))}


def test_stdlib_corpus_is_the_interpreters_sources_one_document_per_file(tmp_path):
    from data_tools import demo_corpus
    assert demo_corpus.main(["--corpus", "python-stdlib", "--out", str(tmp_path / "a"), "--limit", "12"]) == 0
    assert demo_corpus.main(["--corpus", "python-stdlib", "--out", str(tmp_path / "b"), "--limit", "12"]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len(a) == 12                        # deterministic
    root = sysconfig.get_paths()["stdlib"]
    rels = demo_corpus.stdlib_files(root)
    assert all("site-packages" not in r and r.endswith(".py") for r in rels) and len(rels) > 500
    for name, text in a.items():                          # each document is one source file, byte for byte
        candidates = [r for r in rels if r.replace(os.sep, "__")[:-3] == name[:-4]]
        assert len(candidates) == 1, name
        assert open(os.path.join(root, candidates[0]), encoding="utf-8", newline="").read() == text


def test_stdlib_jsonl_and_bad_corpus(tmp_path):
    from data_tools import demo_corpus
    assert demo_corpus.main(["--corpus", "python-stdlib", "--jsonl", "--out", str(tmp_path / "j"), "--limit", "3"]) == 0
    assert os.listdir(tmp_path / "j") == ["stdlib.jsonl"]
    p = subprocess.run([sys.executable, DEMO, "--corpus", "nope", "--out", str(tmp_path / "x")], capture_output=True,
                       text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--corpus" in p.stderr and "nope" in p.stderr
    assert not os.path.exists(tmp_path / "x")
