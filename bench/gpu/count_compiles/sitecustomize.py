"""Counts torch.compile graphs of every Python process of a bench/gpu/check.sh --dry-run (on PYTHONPATH there only).

At exit each process that used dynamo appends {"kind": "compiles", "stage": $CHECK_STAGE, "graphs": N, ...} to
$MEGATRAIN_COMPILE_COUNTS: the compile counts of the timing model in bench/gpu/README.md. (FlexAttention is traced
by dynamo there but runs eagerly: MEGATRAIN_FLEX_COMPILE=eager, so counting costs no compile time.)
"""
import atexit
import json
import os
import sys


def _report():
    path = os.environ.get("MEGATRAIN_COMPILE_COUNTS")
    if not path or "torch._dynamo" not in sys.modules:
        return
    from torch._dynamo.utils import counters
    graphs = int(counters["stats"]["unique_graphs"])
    if graphs:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": "compiles", "stage": os.environ.get("CHECK_STAGE", "?"), "graphs": graphs,
                                "pid": os.getpid(), "argv": " ".join(sys.argv)[:200]}) + "\n")


atexit.register(_report)
