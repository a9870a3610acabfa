#!/bin/bash
# The allocator A/B at 131K, then 1M; nothing else running, 2 threads, the 2-core VM.
# run 1 (at 0cb0e6b: --allocator process = mallopt + PyTorch THP, before the tcmalloc preload existed):
#   bash bench/results/allocator_ab_2026-12-03/run.sh process nothp glibc tcmalloc process1m  -> summary_run1.txt
# run 2 (at 7123154):
#   bash bench/results/allocator_ab_2026-12-03/run.sh auto system glibc2 auto1m             -> summary_run2.txt
cd "$(dirname "$0")/../../.."
D=bench/results/allocator_ab_2026-12-03
PY=${PY:-python}
run() { label=$1; len=$2; alloc=$3; shift 3
  env "$@" $PY bench/bench_long_context.py --lengths $len --impls megatrain --warmup 1 --steps 1 --threads 2 \
      --budget-gb 20 --allocator $alloc --out $D/ab_$label.json > $D/ab_$label.log 2>&1
  $PY -c "import json;r=json.load(open('$D/ab_$label.json'))['results'][0];print('$label', r['status'], round(r.get('peak_rss_mb',0)/1024,2),'GB', round(r.get('step_s',0),1),'s', r.get('host_alloc'))"
}
L=/usr/lib/x86_64-linux-gnu
for cfg in "$@"; do
  case $cfg in
    process) run process 131072 process ;;
    nothp) run nothp 131072 process THP_MEM_ALLOC_ENABLE=0 ;;
    glibc) run glibc 131072 glibc ;;
    tcmalloc) run tcmalloc 131072 glibc LD_PRELOAD=$L/libtcmalloc_minimal.so.4 ;;
    process1m) run process_1m 1048576 process ;;
    # run 2 (after 7123154: --allocator process = launch/pretrain.py's choice, tcmalloc where installed)
    auto) run auto 131072 process ;;
    system) run system 131072 process MEGATRAIN_MALLOC=system ;;
    glibc2) run glibc2 131072 glibc ;;
    auto1m) run auto_1m 1048576 process ;;
  esac
done
