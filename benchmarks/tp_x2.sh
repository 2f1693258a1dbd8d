#!/usr/bin/env bash
# Issue 15 on nvidia-h200-x2, one device command (about 9 minutes), from the repository root:
#
#     bash benchmarks/tp_x2.sh                 # OUT must name a writable folder (the device sets it)
#     STEPS="5 6 7" bash benchmarks/tp_x2.sh   # only some steps (e.g. those a first pass ran out of time for)
#     PARALLEL=0 ...                       # step 3's two single-GPU runs one after the other
#
# Steps, in priority order; each has its own `timeout`, and none starts once fewer than 30 s of
# DEADLINE (default 550 s from the start) are left, so one hang cannot eat the rest:
#   0  install (pip -e, no deps)
#   1  the NCCL pytest subset of tests/parallel (-k "nccl or qualify")
#   2  Llama-3-8B, 32 layers, bf16 + int4, tp 2, NCCL all-reduce: logits vs tp 1, prefill 2048, decode, split
#   3  tp 1 runs: Llama-3-8B bf16 + int4 on GPU 0, and the 70B shape int4 on GPU 1, at the same time, each
#      pinned to half of the CPU cores (decode is timed under CUDA graphs; no NVLink traffic at tp 1)
#   4  Llama-3-8B bf16 + int4, tp 2, symmetric-memory one-shot all-reduce (pymllm_fx.use_symmetric_memory)
#   5  70B shape bf16, tp 2 (about 141 GB of weights: more than one H200)
#   6  70B shape int4, tp 2
#   7  summary table (benchmarks/tp_summary.py) -> $OUT/tp_summary.json
#   8  (not in the default set) 8B tp 2 two-shot all-reduce;  9  8B tp 2 Inductor's own one-shot lowering
# Every JSON and log goes to $OUT; each step prints its time and the tail of its log.
set -u
OUT=${OUT:?set OUT to an output folder}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=${DEADLINE:-550}
STEPS=${STEPS:-"0 1 2 3 4 5 6 7"}
PARALLEL=${PARALLEL:-1}
# Decode: 32 new tokens after a 32-token prompt, one untimed run (it compiles), three timed; prefill
# of 2048 tokens, one untimed and three timed; 8 CUDA-graph steps profiled for the split.
COMMON="--new-tokens 32 --prompt-len 32 --prefill-len 2048 --warmup 1 --reps 3 --prefill-reps 3 --split-steps 8"
TP2="torchrun --nproc-per-node 2 benchmarks/e2e.py --tp 2"

left() { echo $((DEADLINE - ($(date +%s) - START))); }

gpu_leftovers() {  # a step killed by its timeout may leave workers holding a GPU: end them by pid
  local pids
  pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  if [ -n "$pids" ]; then echo "   ending leftover GPU processes: $pids"; kill -9 $pids 2>/dev/null; sleep 2; fi
}

step() {  # step NUMBER NAME LIMIT_SECONDS command...
  local n=$1 name=$2 limit=$3
  shift 3
  case " $STEPS " in *" $n "*) ;; *) return ;; esac
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 30 ]; then echo "== step $n $name: SKIPPED (${remaining}s left)"; return; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== step $n $name: limit ${limit}s, starting at +$(( $(date +%s) - START ))s"
  local t0 rc
  t0=$(date +%s)
  timeout -k 20 "$limit" "$@" > "$OUT/step$n-$name.log" 2>&1
  rc=$?
  echo "== step $n $name: rc=$rc ($([ $rc = 124 ] && echo 'TIMED OUT' || echo done)) in $(( $(date +%s) - t0 ))s"
  grep -v -i -e "warn" -e "USDT" -e "^\s*$" "$OUT/step$n-$name.log" | tail -n 22
  gpu_leftovers
}

tp1_pair() {  # 8B tp 1 on GPU 0 and 70B int4 tp 1 on GPU 1, each on its own half of the cores
  local half cores_a cores_b pin_a pin_b
  half=$(( $(nproc) / 2 ))
  cores_a="0-$((half - 1))"; cores_b="$half-$(( $(nproc) - 1 ))"
  pin_a=""; pin_b=""
  if command -v taskset > /dev/null; then pin_a="taskset -c $cores_a"; pin_b="taskset -c $cores_b"; fi
  CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_COMPILE_THREADS=$half timeout 250 $pin_a python3 benchmarks/e2e.py --methods bf16,int4 \
    --parts prefill,lean,logits,split $COMMON --json "$OUT/e2e_8b_tp1.json" > "$OUT/step3-8b-tp1.log" 2>&1 &
  local a=$!
  if [ "$PARALLEL" = 1 ]; then
    CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_COMPILE_THREADS=$half timeout 250 $pin_b python3 benchmarks/e2e.py --model llama3-70b \
      --methods int4 --parts prefill,lean,logits,split $COMMON --json "$OUT/e2e_70b_tp1.json" > "$OUT/step3-70b-tp1.log" 2>&1 &
    wait $a $!
  else
    wait $a
    CUDA_VISIBLE_DEVICES=1 timeout 250 python3 benchmarks/e2e.py --model llama3-70b --methods int4 --parts prefill,lean,logits,split \
      $COMMON --json "$OUT/e2e_70b_tp1.json" > "$OUT/step3-70b-tp1.log" 2>&1
  fi
  tail -n 8 "$OUT/step3-8b-tp1.log" "$OUT/step3-70b-tp1.log"
}

echo "GPUs: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tr '\n' ';')  cores: $(nproc)"
step 0 install 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
step 1 pytest-nccl 270 python3 -m pytest -q -x -p no:cacheprovider -k "nccl or qualify" tests/parallel
step 2 8b-tp2 240 $TP2 --methods bf16,int4 --parts logits,prefill,lean,split $COMMON --json "$OUT/e2e_8b_tp2.json"
export -f tp1_pair
export OUT COMMON PARALLEL
step 3 tp1 260 bash -c tp1_pair
step 4 8b-tp2-one-shot 180 $TP2 --all-reduce one_shot --methods bf16,int4 --parts logits,lean,split $COMMON \
  --json "$OUT/e2e_8b_tp2_one_shot.json"
step 5 70b-bf16-tp2 200 $TP2 --model llama3-70b --methods bf16 --parts logits,prefill,lean,split $COMMON \
  --json "$OUT/e2e_70b_tp2.json"
step 6 70b-int4-tp2 220 $TP2 --model llama3-70b --methods int4 --parts logits,prefill,lean,split $COMMON \
  --json "$OUT/e2e_70b_tp2.json"
step 7 summary 30 python3 benchmarks/tp_summary.py "$OUT"/e2e_*.json --json "$OUT/tp_summary.json"
step 8 8b-tp2-two-shot 180 $TP2 --all-reduce two_shot --methods bf16,int4 --parts logits,lean,split $COMMON \
  --json "$OUT/e2e_8b_tp2_two_shot.json"
step 9 8b-tp2-inductor 180 $TP2 --all-reduce inductor --methods bf16,int4 --parts logits,lean,split $COMMON \
  --json "$OUT/e2e_8b_tp2_inductor.json"
echo "== all done at +$(( $(date +%s) - START ))s"
[ -f "$OUT/step7-summary.log" ] && cat "$OUT/step7-summary.log"
exit 0
