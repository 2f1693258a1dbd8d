#!/usr/bin/env bash
# Issue 15, first on nvidia-h200-x2 (about 2 minutes): the new code paths at tiny scale on 2 GPUs,
# before benchmarks/tp_x2.sh. From the repository root: bash benchmarks/tp_x2_smoke.sh (OUT set by the device).
#   1  tiny Llama int4, tp 2 NCCL: logits vs tp 1 (reference built before sharding), lean decode, split
#      (does the profiler see kernels inside CUDA graphs? split_source says), per-rank peaks
#   2  the same with the symmetric-memory one-shot all-reduce (logits must match tp 1; two-shot is in
#      tests/parallel/test_symmetric_all_reduce.py, run by tp_x2.sh step 1)
#   3  the 70B builder (shard by shard, block-seeded), tiny, int4 at tp 2 and tp 1: fingerprints agree
#   4  the 70B builder at real widths but 2 layers, bf16 + int4, tp 2: Triton kernels at the 70B shard
#      shapes, the block init at full size, and its per-rank memory
#   5  summary
set -u
OUT=${OUT:?set OUT to an output folder}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
START=$(date +%s)
TINY="--new-tokens 16 --prompt-len 8 --prefill-len 128 --warmup 1 --reps 1 --prefill-reps 1 --split-steps 4"
TP2="torchrun --nproc-per-node 2 benchmarks/e2e.py --tp 2"

run() {  # run NAME LIMIT_SECONDS command...
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout -k 30 "$limit" "$@" > "$OUT/smoke-$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s (at +$(( $(date +%s) - START ))s)"
  grep -v -i -e "warn" -e "USDT" -e "^\s*$" "$OUT/smoke-$name.log" | tail -n 8
  pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  if [ -n "$pids" ]; then echo "   ending leftover GPU processes: $pids"; kill -9 $pids 2>/dev/null; sleep 2; fi
}

python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
run tiny-tp2 80 $TP2 --tiny --methods int4 --parts logits,prefill,lean,split $TINY --json "$OUT/smoke_tiny_tp2.json"
run tiny-tp2-one-shot 60 $TP2 --tiny --all-reduce one_shot --methods int4 --parts logits,lean,split $TINY \
  --json "$OUT/smoke_tiny_tp2_one_shot.json"
run tiny70-tp2 50 $TP2 --tiny --model llama3-70b --methods int4 --parts logits $TINY --json "$OUT/smoke_tiny70_tp2.json"
run tiny70-tp1 40 python3 benchmarks/e2e.py --tiny --model llama3-70b --methods int4 --parts logits $TINY \
  --json "$OUT/smoke_tiny70_tp1.json"
run 70b-2layers-tp2 120 $TP2 --model llama3-70b --layers 2 --methods bf16,int4 --parts logits,prefill,lean,split $TINY \
  --json "$OUT/smoke_70b_2layers_tp2.json"
python3 benchmarks/tp_summary.py "$OUT"/smoke_*.json --json "$OUT/smoke_summary.json"
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("smoke_*tp2*.json")):
    for method, r in json.load(open(path)).get("results", {}).items():
        print(f"{path.name} {method}: split_source={r.get('split_source')} split={r.get('split_ms_per_token')} "
              f"top={[n for n, _ in (r.get('split_top') or [])[:6]]} errors={list(r.get('errors', {}))} "
              f"split_error={(r.get('split_error') or {}).get('error')}")
EOF
echo "== smoke done at +$(( $(date +%s) - START ))s"
