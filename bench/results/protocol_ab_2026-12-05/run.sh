#!/bin/bash
# before (0fc7ae6) / after (HEAD of main) alternating, bench_model.py at 16K, megatrain speed only, 1 thread
. /work/main/.venv/bin/activate
for i in 1 2; do
  for tree in /tmp/base /work/main; do
    name=$( [ $tree = /tmp/base ] && echo before || echo after )
    (cd $tree && PYTHONPATH=$tree python bench/bench_model.py --seq-lens 16384 --impls megatrain --modes speed --steps 2 --json /tmp/speed23/${name}_$i.json > /tmp/speed23/${name}_$i.log 2>&1)
  done
done
echo done > /tmp/speed23/DONE
