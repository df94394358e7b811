"""Every valid layout of N GPUs for a recipe (TP, PP, VPP, EP, ETP, CP, recompute, distributed optimizer), the
ones that fit ranked by the cost model; and the smallest change that makes a recipe's own layout fit."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

from llamafactory_mca.args import McaArgumentError, validate_megatron_args
from llamafactory_mca.plan.cost import tokens_per_second
from llamafactory_mca.plan.memory import Workload
from llamafactory_mca.plan.meta import LayerTemplate
from llamafactory_mca.plan.planner import Plan, make_plan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_dividing(n: int, limit: int) -> list[int]:
    out, d = [], 1
    while d <= limit and n % d == 0:
        out.append(d)
        d *= 2
    return out


def candidate_layouts(base: Any, t: LayerTemplate, world: int, gpus_per_node: int, seq_len: int) -> Iterator[Any]:
    """Layouts of `world` GPUs that megatron and our argument checks accept for this model, as copies of `base`
    (its other options kept). TP stays inside a node; SP is on whenever TP > 1."""
    d = t.dims
    for tp in _powers_of_two_dividing(world, gpus_per_node):
        if d.heads % tp or d.kv_heads % tp:
            continue
        for pp in _divisors(world // tp):
            if pp > d.num_layers or d.num_layers % pp:
                continue
            vpps = [None] + [v for v in (2, 3, 4) if pp > 1 and d.num_layers % (pp * v) == 0]
            for cp in _powers_of_two_dividing(world // (tp * pp), world):
                if seq_len % (2 * cp):
                    continue
                for ep in (_divisors(world // pp) if d.moe else [1]):
                    if d.moe and d.experts % ep:
                        continue
                    for etp in sorted({1, tp}) if d.moe else [None]:
                        if d.moe and (world // pp) % (ep * etp):
                            continue
                        for vpp in vpps:
                            for recompute in (None, "full"):
                                dp = world // (tp * pp * cp)
                                for dist_opt in ((False, True) if dp > 1 or (d.moe and world // (pp * ep * (etp or 1)) > 1)
                                                 else (False,)):
                                    m = dataclasses.replace(
                                        base, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                                        expert_model_parallel_size=ep,
                                        expert_tensor_parallel_size=etp if d.moe and etp != tp else None,
                                        sequence_parallel=tp > 1, recompute_granularity=recompute,
                                        recompute_method=None, recompute_num_layers=None,
                                        use_distributed_optimizer=dist_opt,
                                        overlap_param_gather=base.overlap_param_gather and dist_opt,
                                        num_layers_in_first_pipeline_stage=None,
                                        num_layers_in_last_pipeline_stage=None)
                                    try:
                                        validate_megatron_args(m, world)
                                    except McaArgumentError:
                                        continue
                                    yield m


def search(hf_config: Any, bridge: Any, base: Any, workload: Workload, gpu_memory: int, template: LayerTemplate,
           gpus_per_node: int) -> list[tuple[float, Plan]]:
    """Every layout that fits, best estimated throughput first, as (tokens/s, plan). Of two layouts that differ
    only in the distributed optimizer (the same estimated speed) the one with the lower peak is kept."""
    ranked = []
    for m in candidate_layouts(base, template, workload.world_size, gpus_per_node, workload.seq_len):
        plan = make_plan(hf_config, bridge, m, workload, gpu_memory, template, exact=False)
        if plan.fits:
            ranked.append((tokens_per_second(plan), plan))
    ranked.sort(key=lambda x: (-x[0], x[1].peak))
    kept, seen = [], set()
    for tps, plan in ranked:
        key = dataclasses.astuple(dataclasses.replace(plan.mca_args, use_distributed_optimizer=False,
                                                      overlap_param_gather=False))
        if key not in seen:
            seen.add(key)
            kept.append((tps, plan))
    return kept


def smallest_fix(plan: Plan, hf_config: Any, bridge: Any, template: LayerTemplate,
                 gpus_per_node: int) -> Optional[tuple[str, Plan]]:
    """The least disruptive change that makes `plan` fit: one option (distributed optimizer, full recompute,
    half the micro-batch with twice the accumulation), then the fastest fitting layout; None if nothing fits."""
    m, w = plan.mca_args, plan.workload
    tries: list[tuple[str, Any, Workload]] = []
    if not m.use_distributed_optimizer:
        tries.append(("use_distributed_optimizer: true", dataclasses.replace(m, use_distributed_optimizer=True), w))
    if m.recompute_granularity != "full":
        tries.append(("recompute_granularity: full", dataclasses.replace(
            m, recompute_granularity="full", recompute_method=None, recompute_num_layers=None,
            recompute_modules=None), w))
    if w.micro_batch > 1:
        half = dataclasses.replace(w, micro_batch=w.micro_batch // 2, grad_accum=w.grad_accum * 2)
        tries.append((f"per_device_train_batch_size: {half.micro_batch}, gradient_accumulation_steps: "
                      f"{half.grad_accum} (same global batch)", m, half))
    for what, m2, w2 in tries:
        try:
            validate_megatron_args(m2, w2.world_size)
        except McaArgumentError:
            continue
        fixed = make_plan(hf_config, bridge, m2, w2, plan.gpu_memory, template, exact=False)
        if fixed.fits:
            return what, fixed
    ranked = search(hf_config, bridge, m, w, plan.gpu_memory, template, gpus_per_node)
    if ranked:
        return "the layout below (fastest that fits)", ranked[0][1]
    return None


__all__ = ["candidate_layouts", "search", "smallest_fix"]
