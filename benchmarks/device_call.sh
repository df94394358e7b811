#!/usr/bin/env bash
# The measurements of one device call (issue 22 and the GPU check of issue 17), within a time budget, on
# nvidia-h200-x2 with the wheels and this project installed (benchmarks/RESULTS.md "Reproduce"):
#   bash benchmarks/device_call.sh OUTDIR [BUDGET_S]
# Each step is cut at what is left of the budget, so the tarball of OUTDIR/res is always written.
set -u
out=$1; budget=${2:-560}; t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
res=$out/res; mkdir -p "$res/plan"
step() {  # step NAME SECONDS_KEPT_FOR_LATER COMMAND...
  local name=$1 keep=$2; shift 2
  local t=$(( $(left) - keep ))
  if [ "$t" -lt 30 ]; then echo "[device_call] $name skipped: ${t}s left" | tee -a "$res/steps.log"; return; fi
  echo "[device_call] $name: ${t}s" | tee -a "$res/steps.log"
  timeout "$t" "$@" > "$res/$name.log" 2>&1; echo "[device_call] $name rc=$? at $(( $(date +%s) - t0 ))s" | tee -a "$res/steps.log"
  tail -n 4 "$res/$name.log"
}
step grad_accum_check 400 python benchmarks/grad_accum_check.py
step r_moe2 220 python benchmarks/run.py --scenario r_moe2 --sides ours,hf --steps 4 --warmup 2 --timeout 200 \
  --results-dir "$res" --results-md "$res/RESULTS.md"
step plan_s3x2 10 python benchmarks/plan_measure.py --scenario s3x2 --top 3 --sides "" --timeout 150 \
  --results-dir "$res/plan"
tar czf "$out/res.tgz" -C "$out" res
