"""Forward-only evaluation speed vs training speed at the same length (one CPU process).

    python bench/bench_eval.py [--config configs/demo.yaml] [--seq-lens 1024,4096] [--repeats 3] [--threads 1]
           [--json eval.json]

Per length: tokens/s of one training step (forward + backward with the training forward: loss_reduction="sum",
return_logits=False, then an AdamW step) and of one evaluation micro-batch through megatrain.eval.loss.evaluate_windows
(no_grad, eval mode; the same windows), both on the wall clock and per CPU-second (process CPU time: steadier on a
shared machine); best of --repeats after a warm-up. Prints a table and one JSON object. The model is the config's
`model` section (random weights: speed does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatrain.config import load_config  # noqa: E402
from megatrain.eval.heldout import HeldOut, positions_in_document  # noqa: E402
from megatrain.eval.loss import evaluate_windows  # noqa: E402
from megatrain.model import build_model  # noqa: E402


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _best(fn, repeats: int) -> tuple:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), _cpu()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(_cpu() - c0)
    return min(wall), min(cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
    p.add_argument("--seq-lens", default="1024,4096")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = []
    for L in [int(x) for x in a.seq_lens.split(",")]:
        ids = torch.randint(5, cfg.model.vocab_size, (a.batch, L + 1))
        x, y, doc = ids[:, :-1], ids[:, 1:], torch.zeros(a.batch, L, dtype=torch.long)

        def train_step():
            model.train()
            out = model(input_ids=x, labels=y, doc_ids=doc, labels_shifted=True, loss_reduction="sum",
                        return_logits=False)
            (out.loss / out.num_loss_tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        held = HeldOut(input_ids=x, labels=y, doc_ids=doc, positions=positions_in_document(doc),
                       target_bytes=torch.ones_like(y), manifest="random")

        def eval_step():
            evaluate_windows(model, held, a.batch)

        tw, tc = _best(train_step, a.repeats)
        ew, ec = _best(eval_step, a.repeats)
        n = a.batch * L
        rows.append({"seq_len": L, "train_tok_s": n / tw, "eval_tok_s": n / ew, "speedup_wall": tw / ew,
                     "train_tok_cpu_s": n / tc, "eval_tok_cpu_s": n / ec, "speedup_cpu": tc / ec})
    print("| seq_len | train tok/s | eval tok/s | eval / train (wall) | train tok/CPU-s | eval tok/CPU-s | "
          "eval / train (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['train_tok_s']:.0f} | {r['eval_tok_s']:.0f} | {r['speedup_wall']:.2f}x | "
              f"{r['train_tok_cpu_s']:.0f} | {r['eval_tok_cpu_s']:.0f} | {r['speedup_cpu']:.2f}x |")
    res = {"config": a.config, "threads": a.threads, "batch": a.batch, "rows": rows}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
