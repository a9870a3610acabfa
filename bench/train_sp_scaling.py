"""SP weak scaling of the real training job on CPU: SP=1 on 1 rank with L tokens vs SP=2 on 2 ranks with 2L.

    python bench/train_sp_scaling.py                       # prints a table and a JSON line
    python bench/train_sp_scaling.py --lengths 1024 2048 --layers 2 4 --steps 6

Each configuration runs launch/pretrain.py (configs/tiny.yaml, widened by --hidden) on synthetic shards for
--steps optimizer steps; per-rank tokens/s is the median over the steps after the first two (warm-up), taken from
metrics.jsonl (tokens_per_s / world). ``sp_comm_bytes`` is what one rank sent per step for the EMA boundary
states (megatrain.parallel.sequence.COMM_STATS): it should grow with layers and stay flat in L.
Goal: SP=2 per-rank tokens/s >= 90% of SP=1's. Every rank is pinned to one thread (OMP_NUM_THREADS=1), so the
2-rank runs need 2 free cores to be meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatrain.data.build import write_shards  # noqa: E402
from megatrain.data.shards import doc_key  # noqa: E402
from megatrain.parallel.env import free_port  # noqa: E402
from megatrain.train.metrics import read_metrics  # noqa: E402

VOCAB = 256
SPECIALS = {"unk": 0, "bos": 1, "eos": 2, "eod": 2, "pad": 3, "mask": 4}


def make_shards(out: str, tokens: int) -> str:
    rng = np.random.default_rng(0)
    docs, n = [], 0
    while n < tokens:
        d = rng.integers(8, VOCAB, size=int(rng.integers(2000, 20000)))
        docs.append(d)
        n += len(d)
    write_shards(out, ((doc_key(i), d, {}) for i, d in enumerate(docs)), 1 << 22, VOCAB, SPECIALS)
    return os.path.join(out, "index.json")


def run(shards: str, world: int, seq_len: int, layers: int, hidden: int, steps: int, work: str) -> dict:
    d = os.path.join(work, f"w{world}_L{seq_len}_n{layers}")
    os.makedirs(d, exist_ok=True)
    args = [os.path.join(ROOT, "configs", "tiny.yaml"), f"data.shards={shards}", f"run_dir={d}",
            f"data.seq_len={seq_len}", "data.micro_batch_size=1", f"train.max_steps={steps}",
            "train.warmup_steps=1", f"model.num_hidden_layers={layers}", f"model.hidden_size={hidden}",
            f"model.intermediate_size={2 * hidden}", f"model.nffn_hidden_size={2 * hidden}",
            f"model.vocab_size={VOCAB}", "model.chunk_size=128", "model.max_positions=128",
            f"parallel.sequence_parallel_size={world}", "checkpoint.every_steps=100000",
            "logging.tensorboard=false", "logging.every_steps=100000"]
    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config",
                                       *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errs = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"run failed (world={world}, L={seq_len}):\n{errs[0].decode()[-2000:]}")
    m = read_metrics(os.path.join(d, "metrics.jsonl"))[2:]
    return {"world": world, "sp": world, "seq_len": seq_len, "layers": layers,
            "tokens_per_s_per_rank": statistics.median(r["tokens_per_s"] for r in m) / world,
            "sp_comm_bytes": m[-1].get("sp_comm_bytes", 0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="L for the SP=1 runs")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        shards = make_shards(os.path.join(work, "shards"), 2 * max(a.lengths) * (a.steps + 2) * 2)
        for layers in a.layers:
            for L in a.lengths:
                one = run(shards, 1, L, layers, a.hidden, a.steps, work)
                two = run(shards, 2, 2 * L, layers, a.hidden, a.steps, work)
                rows.append({"layers": layers, "L": L, "sp1_tok_s_rank": one["tokens_per_s_per_rank"],
                             "sp2_2L_tok_s_rank": two["tokens_per_s_per_rank"],
                             "ratio": two["tokens_per_s_per_rank"] / one["tokens_per_s_per_rank"],
                             "sp2_comm_bytes_per_rank_step": two["sp_comm_bytes"]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| layers | L (SP=1) | SP=1 tok/s/rank | SP=2, 2L tok/s/rank | ratio | SP=2 bytes sent/rank/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['L']} | {r['sp1_tok_s_rank']:.0f} | {r['sp2_2L_tok_s_rank']:.0f} | "
              f"{100 * r['ratio']:.0f}% | {r['sp2_comm_bytes_per_rank_step']} |")
    print(json.dumps({"bench": "train_sp_scaling", "hidden": a.hidden, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
