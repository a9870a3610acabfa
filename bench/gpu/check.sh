#!/usr/bin/env bash
# The GPU check: ONE device call of <= 540 s (wheel install included) on one H100/H200; every measured row lands
# in $OUT the moment it exists. Budget table and the timing model behind the limits: bench/gpu/README.md.
#
#   device run:  run(command="bash bench/gpu/check.sh", carry=[".whl"], timeout_s=560)
#   a subset:    STAGES="model longest" bash bench/gpu/check.sh          (e.g. to rerun what ran out of time)
#   dry run:     bash bench/gpu/check.sh --dry-run     (CPU, --tiny models, gloo: every stage's script end to end,
#                                                       compiles counted; tests/bench/test_gpu_check.py runs it)
#
# Stages, most valuable first (name: limit in s on the GPU; what; -> file in $OUT):
#   pretrain        launch/pretrain.py, 1 GPU, DeepSpeed ZeRO-2, bf16, 10 steps of 350M at 32K  -> pretrain_metrics.jsonl
#   model           bf16 train step at 32K/4K/128K: megatrain vs the fair Llama vs transformers MEGA
#                   (to 32K)                                                                    -> model.json
#   bench-ema, bench-attention, bench-lm_loss   each op: PyTorch path vs kernel, 350M shapes     -> ops.json
#   bench-megalodon Megalodon's complex EMA + timestep norm: PyTorch vs our kernels, 1.3B shapes -> ops.json
#   ops-tests       the CUDA op tests that matter (~6 FlexAttention compiles), compiled kernels vs references
#   longest         doubling L until OOM or a timed step over the cap: megatrain (offload where host RAM
#                   holds it) vs the Llama                                                      -> longest.json
# Every *.json here is JSON lines (one row per line, each with the commit, op backends, flops_per_token);
# check.log has the environment, every stage's output, exit status and seconds.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if ((DRY)); then OUT=${OUT:-$(mktemp -d /tmp/gpucheck-dry.XXXXXX)}; else OUT=${OUT:-bench/results/gpu-local}; fi
mkdir -p "$OUT"
LOG="$OUT/check.log"
BUDGET=${BUDGET:-540}  # seconds for the whole call; a stage gets min(its limit, what is left)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CHECK_COMMIT
CHECK_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && CHECK_COMMIT+="-dirty"
PRETRAIN_RUN=${PRETRAIN_RUN:-$(mktemp -d /tmp/gpucheck-run.XXXXXX)}  # (a test watches it to kill the stage)

# The device image has torch + triton but not deepspeed/webdataset, and transformers 5.x (no MEGA): carried wheels.
if ((!DRY)) && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
    export PATH=/tmp/site/bin:$PATH
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ((DRY)); then
    # CPU smoke mode of the op benches; FlexAttention traced by dynamo but run eagerly (compiles counted, not paid);
    # every process reports its compiled graphs at exit (bench/gpu/count_compiles/sitecustomize.py)
    export MEGATRAIN_BENCH_CPU_SMOKE=1 MEGATRAIN_FLEX_COMPILE=eager MEGATRAIN_COMPILE_COUNTS="$OUT/compiles.jsonl"
    export PYTHONPATH=$PWD/bench/gpu/count_compiles:$PYTHONPATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

STAGE_PID=
copy_pretrain_metrics() {  # also after a killed stage: every step the trainer logged, annotated
    [ -f "$PRETRAIN_RUN/metrics.jsonl" ] || return 0
    python3 bench/gpu/annotate_metrics.py "$PRETRAIN_RUN/metrics.jsonl" "$OUT/pretrain_metrics.jsonl" \
        --config "$P_CONFIG" "data.seq_len=$P_SEQ" >>"$LOG" 2>&1 || cp "$PRETRAIN_RUN/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"
}
stop_stage() {  # TERM the running stage's process group, KILL what is left after 10 s (a trainer saving)
    [ -n "$STAGE_PID" ] || return 0
    kill -TERM -- "-$STAGE_PID" 2>/dev/null
    for _ in $(seq 20); do kill -0 -- "-$STAGE_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$STAGE_PID" 2>/dev/null
    echo "=== stage stopped by a signal to check.sh after ${SECONDS}s" >>"$LOG"
}
on_exit() {
    stop_stage
    copy_pretrain_metrics
    rm -rf "$PRETRAIN_RUN"
    echo "=== done after ${SECONDS}s $(date -u +%T)" >>"$LOG"
    if ((DRY)); then python3 bench/gpu/timing_model.py "$OUT" | tee -a "$LOG"; fi
    tail -n 30 "$LOG"
}
trap on_exit EXIT
trap 'exit 143' TERM INT  # (the EXIT trap still runs: the device tool's timeout keeps what was measured)

stage() {  # stage NAME LIMIT command...: within its limit and the call's budget; output and status to check.log
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS - 5))
    if ((DRY)); then
        limit=$((limit * 4))  # (a loaded 2-core CPU, not the GPU: there the limits only catch a hang)
    else
        ((left < limit)) && limit=$left
        if ((limit < 10)); then echo "=== $name: skipped, ${left}s of the budget left" >>"$LOG"; return 0; fi
    fi
    echo "=== $name (limit ${limit}s) $(date -u +%T)" >>"$LOG"
    local t0=$SECONDS
    # in the background + wait: a TERM to this script runs its traps at once, not after the stage
    CHECK_STAGE=$name setsid timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID"
    local rc=$?
    STAGE_PID=
    echo "=== $name: exit $rc after $((SECONDS - t0))s" >>"$LOG"
    echo "{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit, \"commit\": \"$CHECK_COMMIT\"}" \
        >>"$OUT/stages.json"
}
want() { [[ " ${STAGES:-pretrain model bench-ema bench-megalodon bench-attention bench-lm_loss ops-tests longest} " == *" $1 "* ]]; }

{ echo "check.sh commit $CHECK_COMMIT dry_run=$DRY budget=${BUDGET}s"
  ((DRY)) || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "triton NOT importable"
  python3 -c "import deepspeed, transformers; print('deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
  python3 -c "import liger_kernel.transformers.functional, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
      || echo "liger-kernel NOT importable: lm_loss 'auto' is the blockwise path, the Llama computes logits"
  free -g | head -2; } >>"$LOG" 2>&1

# 1. the real trainer (proves a user can train): metrics copied however the stage ends
if ((DRY)); then P_CONFIG=configs/tiny.yaml P_SEQ=32; else P_CONFIG=configs/mega350m_128k.yaml P_SEQ=32768; fi
if want pretrain; then
    if ((DRY)); then
        stage pretrain 70 env RUN="$PRETRAIN_RUN" CONFIG=$P_CONFIG SEQ=$P_SEQ VOCAB=64 BACKEND=gloo STEPS=${P_STEPS:-3} \
            bash bench/gpu/pretrain_smoke.sh "$OUT"
    else
        stage pretrain 70 env RUN="$PRETRAIN_RUN" CONFIG=$P_CONFIG SEQ=$P_SEQ bash bench/gpu/pretrain_smoke.sh "$OUT"
    fi
    copy_pretrain_metrics
fi

# 2. the model: megatrain vs the fair Llama vs transformers' MEGA
M=(); ((DRY)) && M=(--device cpu --tiny --lengths 128 --steps 1)
want model && stage model 130 python3 bench/gpu/bench_train_gpu.py "${M[@]}" --out "$OUT/model.json"

# 3. each op bench on its own (JSON lines to ops.json as they are measured)
E=(); A=(--lengths 32768); L=(); EENV=()  # attention: the 32K goal's shapes only (3 compiles)
MO=(--seq-lens 32768 --repeats 5)  # Megalodon's complex EMA + timestep norm, 1.3B shapes
if ((DRY)); then
    E=(--seq-lens 64 --dim 8 --ndim 2 --repeats 1); EENV=(TRITON_INTERPRET=1)
    MO=(--seq-lens 32 --dim 8 --ndim 2 --groups 2 --repeats 1 --doc-len 8)
    A=(--config configs/tiny.yaml --lengths 32 --warmup 1 --repeat 1)
    L=(--config configs/tiny.yaml --tokens 128 --exact-tokens 32 --warmup 1 --repeat 1)
fi
want bench-ema && stage bench-ema 20 env BENCH_ROWS="$OUT/ops.json" "${EENV[@]}" python3 bench/gpu/bench_ema.py "${E[@]}"
want bench-megalodon && stage bench-megalodon 15 env BENCH_ROWS="$OUT/ops.json" \
    python3 bench/gpu/bench_megalodon_ops.py "${MO[@]}"
want bench-attention && stage bench-attention 75 env BENCH_ROWS="$OUT/ops.json" python3 bench/gpu/bench_attention.py "${A[@]}"
want bench-lm_loss && stage bench-lm_loss 15 env BENCH_ROWS="$OUT/ops.json" python3 bench/gpu/bench_lm_loss.py "${L[@]}"

# 4. the CUDA op tests that matter: FlexAttention fp32 causal (plain, documents, left padding) with every gradient,
# bf16 error (plain, left padding), the whole model on the kernels -- 6 compiled variants; the EMA kernel and the
# Liger loss against their references; Megalodon's complex EMA and timestep-norm kernels against theirs (fp64).
# (Dry run: the attention selection on CPU, the others collected only.)
ATTN_K="(fp32_forward and triton-rotary and (True-none or True-docs or True-left_padding)) or (bf16_error and (True-none or True-left_padding)) or model_flex_backend_equals_torch_backend[True]"
if want ops-tests; then
    if ((DRY)); then
        stage ops-tests 140 bash -c "python3 -m pytest -q -p no:cacheprovider tests/ops/test_attention_ops.py -k '$ATTN_K' &&
            python3 -m pytest -q -p no:cacheprovider --collect-only tests/ops/test_ema_ops.py tests/ops/test_lm_loss.py \
            tests/ops/test_cema_ops.py tests/ops/test_tsn_ops.py"
    else
        stage ops-tests 140 env MEGATRAIN_TEST_DEVICE=cuda python3 -m pytest -q -rfEs --durations=8 -p no:cacheprovider \
            -k "$ATTN_K or test_lm_loss or test_ema_ops or test_matches_reference_fp64" tests/ops/test_attention_ops.py \
            tests/ops/test_lm_loss.py tests/ops/test_ema_ops.py tests/ops/test_cema_ops.py tests/ops/test_tsn_ops.py
    fi
fi

# 5. the longest trainable context (doubling; stops at OOM or a timed step over the cap)
G=(--time-cap 30 --start-length 262144)  # (128K: measured by the model stage)
((DRY)) && G=(--device cpu --tiny --start-length 128 --max-length 256 --time-cap 600)
want longest && stage longest 45 python3 bench/gpu/bench_train_gpu.py --longest --impls megatrain,llama --offload \
    "${G[@]}" --out "$OUT/longest.json"
exit 0
