#!/bin/bash
# Session 27, 2 GPUs (nvidia-h100-x2), main's tree: PD against dp and one GPU on a Qwen3-8B shape, where a prompt
# chunk costs ~100-200 ms of GPU time (so dp's decodes wait behind prompt chunks, and PD's decode GPU does not).
# Usage: bash .gpu/s27-8b.sh A  (checkpoint + offline, ~400 s), then B (online dp, pd, static pd, ~400 s), then C
# (online PD with 4,096-token prompt steps, ~150 s), on the same machine (the checkpoint is made once).
nvidia-smi --query-gpu=index,name --format=csv,noheader; git log --oneline -1; start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
CKPT=~/.cache/nanovllm/random-qwen3-8b
[ -f $CKPT/config.json ] || PYTHONPATH=$PWD python -m nanovllm.utils.checkpoints random qwen3-8b $CKPT > $OUT/ckpt.txt 2>&1
echo "checkpoint ready at $(el) s"
strip() { sed -E 's/kv_capacity_tokens=\{[^}]*\}, //; s/peak_kv_blocks_used=\{[^}]*\}, //'; }
if [ "$1" = A ]; then
  echo "=== offline single,dp,pd at $(el) s"
  PYTHONPATH=$PWD timeout 330 python -u bench.py --random-model qwen3-8b --modes single,dp,pd --json $OUT/off-8b.json 2>$OUT/err-off.txt | grep -vE "^\s*$" | strip | tail -25
  echo "=== offline pd static at $(el) s"
  PYTHONPATH=$PWD timeout 120 python -u bench.py --random-model qwen3-8b --modes pd-static 2>$OUT/err-off-static.txt | grep -E "^pd" | strip
elif [ "$1" = C ]; then  # PD with smaller prompt steps (4,096 tokens, ~60-80 ms on this shape): TTFT against B's PD
  ARGS="--random-model qwen3-8b --num-requests 200 --input-len 1024 3072 --output-len 128 384 --online 6,12,18"
  echo "=== online pd, max_num_batched_tokens=chunked_prefill_tokens=4096 at $(el) s"
  PYTHONPATH=$PWD timeout 200 python -u bench.py $ARGS --modes pd --option max_num_batched_tokens=4096 --option chunked_prefill_tokens=4096 --json $OUT/on-8b-small.json 2>$OUT/err-on-small.txt | grep -E "^pd |gaps over"
else
  ARGS="--random-model qwen3-8b --num-requests 200 --input-len 1024 3072 --output-len 128 384 --online 6,12,18"
  echo "=== online dp,pd at $(el) s"
  PYTHONPATH=$PWD timeout 300 python -u bench.py $ARGS --modes dp,pd --json $OUT/on-8b.json 2>$OUT/err-on.txt | grep -E "^(dp|pd) |gaps over|goodput|^mode"
  echo "=== online pd static at $(el) s"
  PYTHONPATH=$PWD timeout 150 python -u bench.py $ARGS --modes pd-static --json $OUT/on-8b-static.json 2>$OUT/err-on-static.txt | grep -E "^pd-static |gaps over"
fi
echo "wall $(el) s"
