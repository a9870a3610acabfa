"""What the checkpoint checksums cost: torch.save of a state dict vs the xxh3-64 pass over the written file.

    python bench/bench_checkpoint_hash.py [--mb 512] [--dir /tmp]

A save writes each file, then every rank hashes a share of the tag's files (megatrain/train/checkpoint.py
hash_share) while they are still in the page cache; resume reads every file once more to verify. Prints one JSON
line: MB, save seconds, hash seconds (from the page cache) and the ratio.
"""
import argparse
import json
import os
import tempfile
import time

import torch

from megatrain.train.checkpoint import file_hash


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--dir", default=tempfile.gettempdir())
    a = p.parse_args()
    n = a.mb * 2 ** 20 // 4
    state = {f"w{i}": torch.randn(n // 8) for i in range(8)}  # fp32, like master weights / Adam moments
    path = os.path.join(a.dir, "bench_checkpoint_hash.pt")
    try:
        t0 = time.perf_counter()
        torch.save(state, path)
        os.sync()
        save = time.perf_counter() - t0
        t0 = time.perf_counter()
        file_hash(path)
        hashed = time.perf_counter() - t0
        print(json.dumps({"mb": a.mb, "save_s": round(save, 3), "hash_s": round(hashed, 3),
                          "hash_gb_s": round(a.mb / 1024 / hashed, 2), "hash_over_save": round(hashed / save, 3)}))
    finally:
        if os.path.exists(path):
            os.remove(path)


if __name__ == "__main__":
    main()
