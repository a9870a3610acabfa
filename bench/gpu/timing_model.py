"""The check's timing model: per stage, graphs compiled (counted by dynamo in a --dry-run) x a per-compile cost
+ the stage's other work, against its limit in check.sh. Printed at the end of every dry run.

    python bench/gpu/timing_model.py OUT_DIR        (OUT_DIR of `bash bench/gpu/check.sh --dry-run`)

The constants are the ones bench/gpu/README.md explains (its budget table is this model's output); a stage whose
modelled time exceeds its limit is flagged, and the exit status is 1, so the table and the limits cannot drift apart.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# seconds per compiled graph on the GPU: a FlexAttention fwd+bwd variant, 10-25 s on an H100 (issue #15's reading
# of the ops tests); on this CPU the forward alone measured 94 s on a loaded machine (tests/ops/test_flex_compiled.py)
COMPILE_S = 20
# seconds of each stage's work besides compiling, on one H200 (estimates; bench/gpu/README.md says what each holds)
OTHER_S = {"pretrain": 50, "model": 70, "bench-ema": 20, "bench-megalodon": 15, "bench-attention": 15,
           "bench-lm_loss": 15, "ops-tests": 20, "longest": 5}
# compiles a CPU dry run cannot count: there the model's attention is the PyTorch path (kernel_backend auto), and
# FlexAttention under gradient checkpointing fails on CPU (xfail in tests/ops/test_flex_compiled.py). On CUDA: one
# variant per (sequence length, mask kind) and process -- the no-recompile test shows one graph per fixed length.
EXPECTED_COMPILES = {"pretrain": 1, "model": 3, "longest": 2}


def limits() -> dict:
    text = open(os.path.join(HERE, "check.sh")).read()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"stage ([\w-]+) (\d+) ", text)}


def main(out: str) -> int:
    graphs = collections.Counter()
    path = os.path.join(out, "compiles.jsonl")
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            graphs[r["stage"]] += r["graphs"]
    seconds = {}
    if os.path.exists(os.path.join(out, "stages.json")):
        seconds = {json.loads(l)["stage"]: json.loads(l)["seconds"] for l in open(os.path.join(out, "stages.json"))}
    lim = limits()
    print(f"{'stage':<16}{'compiles':>9}{'x s':>5}{'other s':>9}{'model s':>9}{'limit s':>9}{'dry-run s':>11}")
    bad = 0
    for st, limit in lim.items():
        n = max(graphs[st], EXPECTED_COMPILES.get(st, 0))
        model = n * COMPILE_S + OTHER_S.get(st, 0)
        flag = "  OVER" if model > limit else ""
        bad |= model > limit
        print(f"{st:<16}{n:>9}{COMPILE_S:>5}{OTHER_S.get(st, 0):>9}{model:>9}{limit:>9}{seconds.get(st, '-'):>11}{flag}")
    total = sum(lim.values())
    print(f"{'total':<16}{'':>32}{total:>9}   (+ ~30 s wheel install and environment; budget 540)")
    return int(bad or total + 30 > 540)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
