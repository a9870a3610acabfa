#!/bin/bash
# one config per line: label | env | allocator
cd /work/main
run() { label=$1; shift; alloc=$1; shift
  env "$@" /tmp/v/bin/python bench/bench_long_context.py --lengths 131072 --impls megatrain --warmup 1 --steps 1 --threads 2 --budget-gb 20 --allocator $alloc --out /tmp/exp/ab_$label.json > /tmp/exp/ab_$label.log 2>&1
  /tmp/v/bin/python -c "import json;r=json.load(open('/tmp/exp/ab_$label.json'))['results'][0];print('$label', r['status'], round(r.get('peak_rss_mb',0)/1024,2),'GB', round(r.get('step_s',0),1),'s')"
}
L=/usr/lib/x86_64-linux-gnu
for cfg in "$@"; do
  case $cfg in
    process) run process process ;;
    glibc) run glibc glibc ;;
    thp) run thp process THP_MEM_ALLOC_ENABLE=1 ;;
    jemalloc) run jemalloc glibc LD_PRELOAD=$L/libjemalloc.so.2 ;;
    tcmalloc) run tcmalloc glibc LD_PRELOAD=$L/libtcmalloc_minimal.so.4 ;;
    mimalloc) run mimalloc glibc LD_PRELOAD=$L/libmimalloc.so.2 ;;
  esac
done
