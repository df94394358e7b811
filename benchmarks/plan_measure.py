"""Measure on the GPU the top layouts `llamafactory-mca plan --search` proposes for a benchmark shape.

    python benchmarks/plan_measure.py --shape s3 --gpus 2 --top 3 --out /tmp/plan_measure

For each of the `top` layouts ranked first by the planner (cost model and memory fit on this machine's card)
it runs benchmarks/run.py's pipeline (our side only) and prints the estimate, the measured tokens/s and the
predicted vs measured peak memory. The scenario shape comes from benchmarks/shapes.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def ranked_layouts(shape: str, gpus: int, seq: int, global_batch: int, gpu_gib: float, top: int) -> list:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="s3")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=139.8)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import run
    import shapes

    from llamafactory_mca.plan.memory import GIB
    from llamafactory_mca.plan.recipe import recipe_lines

    rows = []
    for i, (tps, plan) in enumerate(ranked_layouts(a.shape, a.gpus, a.seq, a.global_batch, a.gpu_gib, a.top), 1):
        name = f"{a.shape}x{a.gpus}_{i}"
        layout = dict(line.split(": ", 1) for line in recipe_lines(plan.mca_args))
        layout = {k: json.loads(v) if v not in ("null",) else None for k, v in layout.items()}
        shapes.SCENARIO_SHAPES[name] = shapes.SCENARIO_SHAPES[a.shape]
        run.SCENARIOS[name] = dict(title=f"plan --search #{i} for {a.shape} on {a.gpus} GPUs", gpus=a.gpus,
                                   global_batch=a.global_batch, seq=a.seq, ours=layout, hf={}, target={})
        res = run.main(["--scenario", name, "--sides", "ours", "--steps", "4", "--warmup", "2", "--timeout", "400",
                        "--results-dir", a.out, "--results-md", os.path.join(a.out, "RESULTS.md")])[0]
        ours = res.get("ours", {})
        rows.append((name, layout, tps, ours.get("tokens_per_s"), plan.peak / GIB, ours.get("peak_mem_gib")))
        print(json.dumps(rows[-1]), flush=True)
    print("| rank | layout | estimated tok/s | measured tok/s | predicted peak GiB | measured peak GiB |")
    for name, layout, est, meas, pred, mpeak in rows:
        print(f"| {name} | {layout} | {est:,.0f} | {meas or 0:,.0f} | {pred:.1f} | {mpeak or 0:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
