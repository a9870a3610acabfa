"""Copy a run's metrics.jsonl, each line given what the check's rows carry: commit, op_backends, flops_per_token.

    python bench/gpu/annotate_metrics.py RUN/metrics.jsonl OUT.jsonl --config configs/X.yaml [dotted.key=value ...]

(bench/gpu/pretrain_smoke.sh runs it on exit; the trainer's own lines are kept as they are, keys added.) A line
that is not JSON (a run killed mid-write) is dropped, so OUT.jsonl stays valid JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics")
    ap.add_argument("out")
    ap.add_argument("--config", required=True)
    ap.add_argument("--device", default="cuda")
    a, overrides = ap.parse_known_args(argv)  # dotted.key=value after the options
    import torch

    from common import commit, op_backends
    from megatrain.config import load_config
    from megatrain.model import MegaForCausalLM
    from megatrain.train.metrics import model_flops_per_token

    cfg = load_config(a.config, overrides + ["data.shards=unused"])
    m = cfg.model
    with torch.device("meta"):
        n = sum(p.numel() for p in MegaForCausalLM(m).parameters())
    span = min(m.chunk_size, cfg.data.seq_len) if m.use_chunking else cfg.data.seq_len
    extra = {"bench": "pretrain", "commit": commit(), "params": n,
             "flops_per_token": model_flops_per_token(n, m.num_hidden_layers, span, m.shared_representation_size,
                                                      m.intermediate_size, causal=m.is_decoder),
             "op_backends": op_backends(m.kernel_backend, a.device if torch.cuda.is_available() else "cpu",
                                        m.attention_activation, m.attention_probs_dropout_prob)}
    rows = []
    with open(a.metrics) as f:
        for line in f:
            try:
                rows.append({**json.loads(line), **extra})
            except json.JSONDecodeError:
                pass
    with open(a.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
