"""Data-pipeline throughput: shard build rate (MB/s of raw text) and ShardStream windows/s, local and remote.

Run:
    python bench/bench_loader.py                              # demo corpus (38 plays) in a temp folder
    python bench/bench_loader.py --shards shards/ --seq-len 8192 --workers 0 2 --train-tokens-per-s 200000
    python bench/bench_loader.py --sources local http mixture mixture-http --workers 0 2 --objectives clm
Prints a table and one JSON line. "x train" = loader tokens/s / --train-tokens-per-s; it should be >= 10.
Sources: ``local`` the shard folder; ``http`` the same shards from a loopback HTTP server (range requests through
fsspec, as from a CDN or object store; tests/data/servers.py); ``mixture`` two weighted sources (2:1) over the
shards; ``mixture-http`` the same with the second source over HTTP.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_demo(tmp: str, vocab: int, threads: int) -> tuple[str, float]:
    from data_tools import build_shards, demo_corpus, train_tokenizer
    from megatrain.data.shards import Manifest

    corpus, tok, shards = (os.path.join(tmp, x) for x in ("corpus", "tok", "shards"))
    demo_corpus.main(["--out", corpus])
    train_tokenizer.main(["--input", os.path.join(corpus, "*.txt"), "--vocab-size", str(vocab), "--out", tok])
    t0 = time.perf_counter()
    build_shards.main(["--input", os.path.join(corpus, "*.txt"), "--tokenizer", tok, "--out", shards,
                       "--shard-size", "1MB", "--workers", str(threads)])
    dt = time.perf_counter() - t0
    return shards, Manifest.load(shards).stats["bytes_in"] / 1e6 / dt


def time_stream(shards: str, seq_len: int, workers: int, objective: str, max_windows: int, source: str = "local",
                url: str | None = None) -> dict:
    from megatrain.data import ShardStream
    from megatrain.data.mixture import Source

    remote = None if url is None else url + "index.json"
    where = {"local": {"urls_or_manifest": shards}, "http": {"urls_or_manifest": remote},
             "mixture": {"sources": [Source("a", shards, 2.0), Source("b", shards, 1.0)], "loop": True},
             "mixture-http": {"sources": [Source("a", shards, 2.0), Source("b", remote, 1.0)], "loop": True}}[source]
    stream = ShardStream(**where, seq_len=seq_len, seed=0, num_workers=workers, objective=objective)
    t0 = time.perf_counter()
    n = 0
    for sample in stream:
        n += 1
        if n >= max_windows:
            break
    dt = time.perf_counter() - t0  # includes worker start-up and the first shard read
    return {"source": source, "objective": objective, "workers": workers, "seq_len": seq_len, "windows": n,
            "windows_per_s": n / dt, "tokens_per_s": n * seq_len / dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None, help="existing shard folder (default: build the demo corpus)")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer for the demo corpus")
    p.add_argument("--threads", type=int, default=2, help="build_shards --workers")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-windows", type=int, default=400)
    p.add_argument("--sources", nargs="+", default=["local"], choices=["local", "http", "mixture", "mixture-http"])
    p.add_argument("--objectives", nargs="+", default=["clm", "mlm"], choices=["clm", "mlm"])
    p.add_argument("--train-tokens-per-s", type=float, default=100_000.0,
                   help="what training consumes (per rank), for the x-train column")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        build_rate = None
        shards = a.shards
        if shards is None:
            shards, build_rate = build_demo(tmp, a.vocab_size, a.threads)
        with contextlib.ExitStack() as stack:
            url = None
            if any("http" in src for src in a.sources):
                from tests.data.servers import http_server
                url, _ = stack.enter_context(http_server(shards if os.path.isdir(shards) else
                                                         os.path.dirname(shards)))
            rows = [time_stream(shards, a.seq_len, w, obj, a.max_windows, src, url)
                    for src in a.sources for obj in a.objectives for w in a.workers]
    print(f"\n{'source':<12} {'objective':<9} {'workers':>7} {'windows/s':>10} {'tokens/s':>12} {'x train':>8}")
    for r in rows:
        r["x_train"] = r["tokens_per_s"] / a.train_tokens_per_s
        print(f"{r['source']:<12} {r['objective']:<9} {r['workers']:>7} {r['windows_per_s']:>10.1f} "
              f"{r['tokens_per_s']:>12.0f} {r['x_train']:>8.1f}")
    if build_rate is not None:
        print(f"build_shards: {build_rate:.2f} MB/s of raw text ({a.threads} threads)")
    print(json.dumps({"build_mb_per_s": build_rate, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                      "loader": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
