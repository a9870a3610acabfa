#!/usr/bin/env bash
# The real trainer on one GPU, as a user starts it: launch/pretrain.py, DeepSpeed ZeRO-2, bf16, NCCL, the ~350M
# config at 32K tokens, 10 steps on synthetic shards (random tokens: this measures the system, not learning).
# Called by bench/gpu/check.sh (its first stage).
#   bash bench/gpu/pretrain_smoke.sh OUT_DIR       -> OUT_DIR/pretrain_metrics.jsonl (copied on any exit, also a
#                                                     killed or failed run: every step the trainer logged)
#   CONFIG=configs/tiny.yaml SEQ=32 VOCAB=64 BACKEND=gloo bash bench/gpu/pretrain_smoke.sh /tmp/x   (CPU, tiny)
# RUN=dir keeps the run directory there (check.sh's EXIT trap copies its metrics too); default a temporary one.
# The trainer writes its final checkpoint at the last step (~5 GB at 350M); the metrics are in before it starts.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: pretrain_smoke.sh OUT_DIR}
CONFIG=${CONFIG:-configs/mega350m_128k.yaml} SEQ=${SEQ:-32768} VOCAB=${VOCAB:-32000} STEPS=${STEPS:-10}
BACKEND=${BACKEND:-nccl} PRECISION=${PRECISION:-bf16}
WORK=$(mktemp -d)
RUN=${RUN:-$WORK/run}
mkdir -p "$OUT"
copy_metrics() {  # the trainer's lines + commit, op backends, flops_per_token; a plain copy if that fails
    [ -f "$RUN/metrics.jsonl" ] || return 0
    python3 bench/gpu/annotate_metrics.py "$RUN/metrics.jsonl" "$OUT/pretrain_metrics.jsonl" --config "$CONFIG" \
        "data.seq_len=$SEQ" || cp "$RUN/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"
}
trap 'copy_metrics; rm -rf "$WORK"' EXIT
python3 - "$WORK/shards" "$VOCAB" "$SEQ" <<'PY'
import sys
import numpy as np
from megatrain.data.build import write_shards
from megatrain.data.shards import doc_key
out, vocab, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
# documents of 1..6 windows: the window's document mask (doc_ids) has a boundary in most windows
docs = ((doc_key(i), rng.integers(5, vocab, size=int(rng.integers(seq, 6 * seq))).astype(np.int64), {"doc": i})
        for i in range(12))
write_shards(out, docs, 64 << 20, vocab, {"unk": 0, "bos": 1, "eos": 2, "eod": 2, "pad": 3, "mask": 4})
PY
ARGS=(launch/pretrain.py --config "$CONFIG" "data.shards=$WORK/shards/index.json"
      "run_dir=$RUN" "data.seq_len=$SEQ" data.num_workers=0 parallel.sequence_parallel_size=1
      parallel.zero_stage=2 "train.precision=$PRECISION" "train.max_steps=$STEPS" train.grad_accum_steps=1
      train.warmup_steps=2 checkpoint.every_steps=1000000 checkpoint.resume=none logging.every_steps=1
      "parallel.backend=$BACKEND")
if command -v deepspeed >/dev/null; then
    deepspeed --num_gpus 1 "${ARGS[@]}"
else
    torchrun --standalone --nproc_per_node 1 "${ARGS[@]}"
fi
