#!/usr/bin/env bash
# 20 steps of the real trainer on one GPU: DeepSpeed ZeRO-2, bf16, NCCL, the ~350M config at 32K tokens, synthetic
# shards (random tokens: this measures the system, not learning). Called by bench/gpu/check.sh.
#   bash bench/gpu/pretrain_smoke.sh OUT_DIR            (copies metrics.jsonl to OUT_DIR/pretrain_metrics.jsonl)
#   CONFIG=configs/tiny.yaml SEQ=32 VOCAB=64 BACKEND=gloo PRECISION=fp32 bash bench/gpu/pretrain_smoke.sh /tmp/x
#                                                        (the same on CPU with the tiny model: a smoke test)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: pretrain_smoke.sh OUT_DIR}
CONFIG=${CONFIG:-configs/mega350m_128k.yaml} SEQ=${SEQ:-32768} VOCAB=${VOCAB:-32000}
BACKEND=${BACKEND:-nccl} PRECISION=${PRECISION:-bf16}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 - "$WORK/shards" "$VOCAB" "$SEQ" <<'PY'
import sys
import numpy as np
from megatrain.data.shards import doc_key, write_token_shards
out, vocab, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
docs = ((doc_key(i), rng.integers(5, vocab, size=int(rng.integers(seq, 6 * seq))).astype(np.int64), {"doc": i})
        for i in range(12))
write_token_shards(out, docs, 64 << 20, vocab, {"unk": 0, "bos": 1, "eos": 2, "eod": 2, "pad": 3, "mask": 4})
PY
ARGS=(launch/pretrain.py --config "$CONFIG" "data.shards=$WORK/shards/index.json"
      "run_dir=$WORK/run" "data.seq_len=$SEQ" data.num_workers=0 parallel.sequence_parallel_size=1
      parallel.zero_stage=2 "train.precision=$PRECISION" train.max_steps=20 train.grad_accum_steps=1
      train.warmup_steps=2 checkpoint.every_steps=1000000 logging.every_steps=5 "parallel.backend=$BACKEND")
mkdir -p "$OUT"
if command -v deepspeed >/dev/null; then
    deepspeed --num_gpus 1 "${ARGS[@]}"
else
    torchrun --standalone --nproc_per_node 1 "${ARGS[@]}"
fi
cp "$WORK/run/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"
