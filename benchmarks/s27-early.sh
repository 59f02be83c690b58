#!/bin/bash
# Session 27, 2 GPUs, carry [".gpu"]. Trees: pre (.gpu/pre = 73c3df8: aa05bba's engine, main's bench.py), main
# (completed prompts decode in the next step, d41976d), copy (.gpu/copy = branch pd-early-copy c2423d5: KV copies
# wait only for the step writing the moving sequences' KV, and start as soon as they are placed).
# Usage: bash .gpu/s27-early.sh 1  (~430 s: online 48,96 --repeat 2, dp+pd on pre and main; offline pd main, copy)
#        bash .gpu/s27-early.sh 2  (~420 s: copy's two-GPU tests first (its first GPU run), online pd and pd-static
#        on copy, main's two-GPU and scheduler tests). Run 2 first: if copy's tests fail, skip its runs in 1.
nvidia-smi --query-gpu=index,name --format=csv,noheader; git log --oneline -1; start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
PYTHONPATH=$PWD python -m nanovllm.utils.checkpoints random qwen3-0.6b ~/.cache/nanovllm/random-qwen3-0.6b > /dev/null 2>&1
ARGS="--random-model qwen3-0.6b --num-requests 300 --input-len 1024 3072 --output-len 128 384 --online 48,96 --repeat 2"
online() { local t=$1 modes=$2 d=$PWD; [ $t != main ] && d=$PWD/.gpu/$t; echo "=== online $t $modes at $(el) s"
  (cd $d && PYTHONPATH=$d timeout 200 python -u bench.py $ARGS --modes $modes --json $OUT/on-$t.json 2>$OUT/err-on-$t.txt | grep -E "^(dp|pd|pd-static) |gaps over"); }
off() { local t=$1 d=$PWD; [ $t != main ] && d=$PWD/.gpu/$t; echo "=== offline $t pd at $(el) s"
  (cd $d && PYTHONPATH=$d timeout 60 python -u bench.py --random-model qwen3-0.6b --modes pd 2>$OUT/err-off-$t.txt | grep -E "^pd "); }
if [ "$1" = 1 ]; then
  online pre dp,pd; online main dp,pd
  off main; off copy
else
  echo "=== copy's two-GPU tests at $(el) s"
  (cd .gpu/copy && PYTHONPATH=$PWD timeout 150 python -m pytest -q -p no:cacheprovider -x test_two_gpu.py tests/test_pd.py > $OUT/copy-tests.txt 2>&1; tail -2 $OUT/copy-tests.txt)
  online copy pd,pd-static  # static: every decode on GPU1 (pure PD), last measured online in session 19
  echo "=== main's two-GPU and scheduler tests at $(el) s"
  timeout 150 python -m pytest -q -p no:cacheprovider test_two_gpu.py tests/test_pd.py tests/test_scheduler.py > $OUT/main-tests.txt 2>&1; tail -2 $OUT/main-tests.txt
fi
echo "wall $(el) s"
