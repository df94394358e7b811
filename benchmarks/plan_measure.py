"""Measure on the GPU the top layouts `llamafactory-mca plan --search` proposes for a benchmark scenario.

    python benchmarks/plan_measure.py --scenario s3x2 --top 3                      # + ours,hf of the scenario
    python benchmarks/plan_measure.py --scenario s2x2 --top 3 --sides ours_plan1,ours_plan2,ours_plan3

The planner ranks every layout of the scenario's model, GPU count, sequence length and global batch that fits
this card (llamafactory_mca/plan/search.py; cost-model constants in plan/cost.py). Each of the `top` first is
run as a side `ours_plan<i>` of the scenario in ONE benchmarks/run.py invocation (one model build; the
scenario's own `ours` / `hf` sides alongside by default): the scenario's recipe with the layout keys replaced
by the plan's, and gradient_accumulation_steps set so that the global batch stays the same. The scenario's
results JSON gets a `plan_search` list (rank, layout, estimated and measured tokens/s, predicted and measured
peak memory) and `plan_first_within_10pct`: whether the layout ranked first is within 10% of the fastest of
those measured (issue 17).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# the keys a plan decides; every plan side sets all of them (None ones only where the scenario sets the key)
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
               "expert_model_parallel_size", "expert_tensor_parallel_size", "context_parallel_size",
               "sequence_parallel", "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather",
               "recompute_granularity", "recompute_method", "recompute_num_layers")


def ranked_layouts(shape: str, gpus: int, seq: int, global_batch: int, gpu_gib: float, top: int) -> list:
    """The planner's `top` first (estimated tokens/s, plan) for a benchmarks/shapes.py shape."""
    import torch
    from shapes import hf_config_for

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models import get_bridge
    from llamafactory_mca.plan.memory import GIB, Workload
    from llamafactory_mca.plan.meta import layer_template
    from llamafactory_mca.plan.search import search

    cfg = hf_config_for(shape, seq=seq)
    bridge = get_bridge(cfg)
    template = layer_template(bridge, cfg, torch.bfloat16)
    base = MegatronArguments(moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall", overlap_grad_reduce=True)
    w = Workload(world_size=gpus, micro_batch=1, seq_len=seq, grad_accum=max(global_batch // gpus, 1), save_hf_model=False)
    return search(cfg, bridge, base, w, int(gpu_gib * GIB), template, gpus)[:top]


def plan_side_keys(mca_args, scenario_ours: dict, gpus: int, global_batch: int) -> dict:
    """The recipe keys of one plan side: every layout key of the plan (over the scenario's own), and the
    gradient accumulation that keeps the scenario's global batch."""
    keys = {k: getattr(mca_args, k) for k in LAYOUT_KEYS
            if getattr(mca_args, k) is not None or k in scenario_ours}
    model_parallel = (keys.get("tensor_model_parallel_size") or 1) * (keys.get("pipeline_model_parallel_size") or 1) * (
        keys.get("context_parallel_size") or 1)
    dp = gpus // model_parallel
    if global_batch % dp:
        raise ValueError(f"global batch {global_batch} not divisible by the plan's data-parallel size {dp}")
    keys["gradient_accumulation_steps"] = global_batch // dp
    return keys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="s3x2")
    ap.add_argument("--gpu-gib", type=float, default=139.8)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--sides", default="ours,hf", help="the scenario's own sides to run besides the plan sides")
    ap.add_argument("--steps", default="4")
    ap.add_argument("--warmup", default="2")
    ap.add_argument("--timeout", default="300")
    ap.add_argument("--results-dir", default=None)
    a = ap.parse_args(argv)
    import run

    from llamafactory_mca.plan.memory import GIB

    sc = run.SCENARIOS[a.scenario]
    plans = ranked_layouts(a.scenario, sc["gpus"], sc["seq"], sc["global_batch"], a.gpu_gib, a.top)
    rows = []
    for i, (tps, plan) in enumerate(plans, 1):
        keys = plan_side_keys(plan.mca_args, sc["ours"], sc["gpus"], sc["global_batch"])
        run.OURS_VARIANTS[f"plan{i}"] = keys
        rows.append(dict(rank=i, side=f"ours_plan{i}", layout=keys, estimated_tokens_per_s=round(tps),
                         predicted_peak_gib=round(plan.peak / GIB, 2)))
        print(json.dumps(rows[-1]), flush=True)
    sides = [s for s in a.sides.split(",") if s] + [r["side"] for r in rows]
    argv_run = ["--scenario", a.scenario, "--sides", ",".join(sides), "--steps", a.steps, "--warmup", a.warmup,
                "--timeout", a.timeout]
    if a.results_dir:
        argv_run += ["--results-dir", a.results_dir, "--results-md", os.path.join(a.results_dir, "RESULTS.md")]
    res = run.main(argv_run)[0]
    for r in rows:
        side = res.get(r["side"], {})
        r["measured_tokens_per_s"] = side.get("tokens_per_s")
        r["measured_peak_gib"] = side.get("peak_mem_gib")
        r["error"] = side.get("error")
    measured = [r["measured_tokens_per_s"] for r in rows if r["measured_tokens_per_s"]]
    res["plan_search"] = rows
    res["command"] = " ".join(["python", "benchmarks/plan_measure.py"] + sys.argv[1:])
    res["plan_first_within_10pct"] = (bool(rows[0]["measured_tokens_per_s"] >= 0.9 * max(measured))
                                      if measured and rows[0]["measured_tokens_per_s"] else None)
    fn = os.path.join(a.results_dir or run.RESULTS_DIR, f"{a.scenario}.json")
    with open(fn, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("| rank | layout | estimated tok/s | measured tok/s | predicted peak GiB | measured peak GiB |")
    for r in rows:
        print(f"| {r['rank']} | {r['layout']} | {r['estimated_tokens_per_s']:,} | {r['measured_tokens_per_s'] or 0:,.0f} "
              f"| {r['predicted_peak_gib']:.1f} | {r['measured_peak_gib'] or 0:.1f} |")
    print(f"first-ranked within 10% of the fastest measured: {res['plan_first_within_10pct']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
