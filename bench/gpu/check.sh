#!/usr/bin/env bash
# The GPU check: ONE prepared script for a session that is lent a GPU (the `device` tool), <= 8 minutes on one
# H100/H200, everything written to one results folder ($OUT on the device machine, else bench/results/gpu-local).
#
#   device run:  bash bench/gpu/check.sh          (carry: [".whl"]; see bench/gpu/README.md for making .whl/)
#   locally:     OUT=/tmp/gpu bash bench/gpu/check.sh
#
# 1. the ops tests on CUDA (compiled kernels, not the Triton interpreter), one stage per op -> check.log
# 2. op micro-benchmarks: EMA, attention, LM-head loss (torch path vs kernels)   -> ops.json
# 3. model train step, bf16, ~350M (configs/mega350m_128k.yaml) at 4K/32K/128K:
#    megatrain vs transformers 4.57.6 MEGA (same weights) vs same-size Llama SDPA -> model.json
# 4. launch/pretrain.py for 20 steps on 1 GPU: DeepSpeed ZeRO-2, bf16, NCCL       -> pretrain_metrics.jsonl
# 5. the longest context whose train step fits: megatrain (with activation offload) vs the Llama -> longest.json
# Each stage has its own time limit (together <= ~8 min), so one slow or failing stage cannot eat the others' time;
# the log says which stage failed or ran out of time. STAGES="ops bench model pretrain longest" picks a subset (e.g.
# to rerun only what failed, within the session's 15 minutes of device time). Raw results go to bench/results/ and the table to BENCHMARKS.md (bench/gpu/report.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
LOG="$OUT/check.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The device image has torch + triton but not deepspeed/webdataset, and transformers 5.x (no MEGA): carried wheels.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
    export PATH=/tmp/site/bin:$PATH
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

stage() {  # stage NAME SECONDS command...: run with a time limit, log its output and status
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)" >>"$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s" >>"$LOG"
    return 0
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import deepspeed, transformers; print('deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
  python3 -c "import liger_kernel.transformers.functional, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
      || echo "liger-kernel NOT importable: the Liger tests of tests/ops/test_lm_loss.py will fail (the others run)"
  git log --oneline -1 2>/dev/null; } >>"$LOG" 2>&1

# 1. ops tests on CUDA: the kernels compiled for the GPU, against their references. One pytest per op, each with its
# own limit: a timeout in one (compiling FlexAttention's variants is the slow part) keeps the others' reports;
# no -x, so one run shows every failure; --durations shows where the (compile) time went.
want() { [[ " ${STAGES:-ops bench model pretrain longest} " == *" $1 "* ]]; }  # STAGES="model longest": a subset

want ops && for t in ema_ops:60 lm_loss:30 attention_ops:90; do
    stage "ops-tests-${t%%:*}" "${t##*:}" env MEGATRAIN_TEST_DEVICE=cuda python3 -m pytest -q -rfEs --durations=8 \
        -p no:cacheprovider "tests/ops/test_${t%%:*}.py"
done

# 2. op micro-benchmarks (each prints JSON lines)
want bench && stage ops-bench 45 bash -c "for b in bench/gpu/bench_ema.py bench/gpu/bench_attention.py bench/gpu/bench_lm_loss.py; do
    [ -f \$b ] && python3 \$b; done > '$OUT/ops.json'"

# 3. model benchmark
want model && stage model 110 python3 bench/gpu/bench_train_gpu.py --out "$OUT/model.json"

# 4. the real trainer: 20 steps, DeepSpeed ZeRO-2, bf16, NCCL, synthetic shards
want pretrain && stage pretrain 80 bash bench/gpu/pretrain_smoke.sh "$OUT"

# 5. longest trainable context (doubling; stops at OOM or a 45 s step)
want longest && stage longest 70 python3 bench/gpu/bench_train_gpu.py --longest --impls megatrain,llama --offload \
    --time-cap 45 --out "$OUT/longest.json"

echo "=== done $(date -u +%T)" >>"$LOG"
tail -n 40 "$LOG"
