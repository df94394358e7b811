#!/usr/bin/env bash
# The measurements of one device call, within a time budget, on nvidia-h200-x2 with the wheels and this project
# installed (benchmarks/RESULTS.md "Reproduce"):
#   bash benchmarks/device_call.sh OUTDIR BUDGET_S CALL      # CALL: a, b, c, d, e or f (below)
# Each step is cut at what is left of the budget (run.py keeps <scenario>.partial.json with the sides done), so
# the tarball of OUTDIR/res is always written. One-GPU scenarios run two at a time, one per GPU ("lanes").
set -u
out=$1; budget=${2:-560}; call=${3:-a}; t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
res=$out/res; mkdir -p "$res"
step() {  # step NAME SECONDS_KEPT_FOR_LATER COMMAND...
  local name=$1 keep=$2; shift 2
  local t=$(( $(left) - keep ))
  if [ "$t" -lt 30 ]; then echo "[device_call] $name skipped: ${t}s left" | tee -a "$res/steps.log"; return; fi
  echo "[device_call] $name: ${t}s" | tee -a "$res/steps.log"
  timeout "$t" "$@" > "$res/$name.log" 2>&1; echo "[device_call] $name rc=$? at $(( $(date +%s) - t0 ))s" | tee -a "$res/steps.log"
  tail -n 4 "$res/$name.log"
}
bench() {  # bench NAME KEEP RUN_PY_ARGS...: benchmarks/run.py into its own results folder
  local name=$1 keep=$2; shift 2
  mkdir -p "$res/$name"
  step "$name" "$keep" python benchmarks/run.py "$@" --results-dir "$res/$name" --results-md "$res/$name/RESULTS.md"
}
plan() {  # plan SCENARIO KEEP SIDES: the planner's top three (plan_measure.py) beside the scenario's own sides
  local name=plan_$1 keep=$2
  mkdir -p "$res/$name"
  step "$name" "$keep" python benchmarks/plan_measure.py --scenario "$1" --top 3 --sides "$3" --timeout 150 \
    --results-dir "$res/$name"
}
case $call in
  a)  # s1 on GPU 0 while s3 runs on GPU 1; then the two 2-GPU synthetic rows that no code of this round changes
    (CUDA_VISIBLE_DEVICES=0 bench s1 330 --scenario s1 --sides ours,hf --steps 4 --warmup 2 --timeout 140) &
    (CUDA_VISIBLE_DEVICES=1 bench s3 330 --scenario s3 --sides ours,hf --steps 4 --warmup 2 --timeout 140) &
    wait
    bench s3x2 170 --scenario s3x2 --sides ours,hf --steps 4 --warmup 2 --timeout 140
    bench s2x2 5 --scenario s2x2 --sides ours,hf --steps 4 --warmup 2 --timeout 160 ;;
  b)  # the long-context row, then the longest sample each side trains on 2 GPUs (probe.py), then the MoE recipe
    bench s4x2 300 --scenario s4x2 --sides ours,hf --steps 3 --warmup 1 --timeout 200
    bench r_moe2 5 --scenario r_moe2 --sides hf,ours --steps 4 --warmup 2 --timeout 220 ;;
  d)  # one GPU (nvidia-h200): this round's kernel check (kernel_check.py), then s1, then s3, one after the other
    step kernel_check 440 python benchmarks/kernel_check.py
    bench s1 230 --scenario s1 --sides ours,hf --steps 4 --warmup 2 --timeout 140
    bench s3 5 --scenario s3 --sides ours,hf --steps 4 --warmup 2 --timeout 140 ;;
  e)  # one GPU: the FP8 kernel check (issue 18), then the hybrid Qwen3-Next row (issue 15); fla 0.6.0 refuses its
      # gated delta-rule backward with the GPU image's Triton (< 3.7.1) on Hopper, so it is not installed: both
      # sides run their torch delta rule (the JSON's `versions` says so)
    step fp8_check 250 python -m llamafactory_mca.kernels.fp8
    bench q3next 5 --scenario q3next --sides ours,hf --steps 2 --warmup 1 --timeout 150 ;;
  f)  # one GPU: the delta-rule kernels (kernel_check.py --only delta_rule), then the Qwen3-Next row with the HF
      # side first (both sides on their torch delta rule: fla refuses Hopper with the image's Triton, see e)
    step delta_rule 400 python benchmarks/kernel_check.py --only delta_rule
    bench q3next 5 --scenario q3next --sides hf,ours --steps 2 --warmup 1 --timeout 250 ;;
  c)  # the VL recipe (both sides, merged + loaded)
    bench r_vl2 5 --scenario r_vl2 --sides ours,hf --steps 4 --warmup 2 --timeout 220 ;;
esac
tar czf "$out/res.tgz" -C "$out" res
