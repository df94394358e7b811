"""Predicted (llamafactory-mca plan) vs measured peak GPU memory of every benchmark scenario.

    python benchmarks/plan_check.py            # a markdown table, from benchmarks/results/*.json

Each scenario's model comes from benchmarks/shapes.py, its layout and workload from the recipe recorded in
its JSON; nothing measured enters the prediction.
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def predict(result: dict):
    from shapes import hf_config_for

    from llamafactory_mca.models import get_bridge
    from llamafactory_mca.plan.memory import GIB, Workload
    from llamafactory_mca.plan.meta import layer_template
    from llamafactory_mca.plan.planner import make_plan
    from llamafactory_mca.plan.recipe import freeze_rule, megatron_args, training_dtype, workload_of

    ours = result["ours"]
    recipe = ours["recipe"] if isinstance(ours["recipe"], dict) else json.loads(ours["recipe"])
    hf_config = hf_config_for(result["scenario"], seq=result["seq"])
    bridge = get_bridge(hf_config)
    m = megatron_args(recipe)
    w: Workload = workload_of({**recipe, "cutoff_len": result["seq"]}, int(result["gpus"]))
    freeze = freeze_rule(recipe)
    dtype = training_dtype(recipe)
    template = layer_template(bridge, hf_config, dtype, freeze=freeze)
    plan = make_plan(hf_config, bridge, m, w, 141 * GIB, template, exact=True, freeze=freeze, dtype=dtype)
    return plan


def main() -> int:
    from llamafactory_mca.plan.cost import tokens_per_second
    from llamafactory_mca.plan.memory import GIB

    rows = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*.json"))):
        if path.endswith(".partial.json"):  # a scenario a device call's time cut short (run.py)
            continue
        result = json.load(open(path))
        plan = predict(result)
        measured = result["ours"]["peak_mem_gib"]
        per_rank = [round(r.train_peak / GIB, 1) for r in plan.ranks]
        predicted = max(r.train_peak for r in plan.ranks) / GIB
        tps = (result["ours"]["tokens_per_s"], tokens_per_second(plan))
        rows.append((result["scenario"], measured, predicted, per_rank, tps))
    print("| scenario | measured peak GiB (max over ranks) | predicted GiB (max) | error | predicted per stage | "
          "measured tok/s | cost-model tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, meas, pred, per, (tps, est) in rows:
        print(f"| {name} | {meas:.1f} | {pred:.1f} | {100 * (pred - meas) / meas:+.1f}% | {per} | {tps:,.0f} | "
              f"{est:,.0f} ({100 * (est - tps) / tps:+.0f}%) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
