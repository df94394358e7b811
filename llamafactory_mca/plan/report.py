"""What `llamafactory-mca plan` prints, and its `--plot` (a stacked bar chart of memory per rank)."""

from __future__ import annotations

from typing import Optional

from llamafactory_mca.plan.cost import tokens_per_second
from llamafactory_mca.plan.memory import GIB, HEADROOM_BYTES
from llamafactory_mca.plan.planner import Plan
from llamafactory_mca.plan.recipe import recipe_lines


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def stage_ranks_text(plan: Plan, stage: int) -> str:
    per_stage = plan.workload.world_size // plan.mca_args.pipeline_model_parallel_size
    return f"{stage * per_stage}-{(stage + 1) * per_stage - 1}" if per_stage > 1 else str(stage * per_stage)


def bucket_text(plan: Plan) -> str:
    """DDP's gradient buckets (megatron's default size) and where communication memory goes."""
    m = plan.mca_args
    if m.overlap_grad_reduce:
        size = max(40_000_000, 1_000_000 * plan.data_parallel_size)
        buckets = f"buckets of {size / 1e6:.0f}M parameters, reduced during backward"
    else:
        buckets = "one bucket per buffer, reduced after the last micro-batch"
    op = "reduce-scatter + all-gather" if m.use_distributed_optimizer else "all-reduce"
    return (f"{op}, {buckets}; buckets are views of the main-grad buffer (no extra memory), NCCL's own buffers "
            "are outside torch's allocator (in the headroom)")


def plan_text(plan: Plan) -> str:
    """The per-rank table, the batch arithmetic and the verdict."""
    m, w = plan.mca_args, plan.workload
    lines = [
        f"layout: TP={m.tensor_model_parallel_size} PP={m.pipeline_model_parallel_size} "
        f"VPP={m.virtual_pipeline_model_parallel_size or 1} CP={m.context_parallel_size} "
        f"EP={m.expert_model_parallel_size} ETP={m.expert_tensor_parallel_size or m.tensor_model_parallel_size} "
        f"DP={plan.data_parallel_size}  SP={'on' if m.sequence_parallel else 'off'}  "
        f"recompute={m.recompute_granularity or 'none'}  distributed optimizer="
        f"{'on' if m.use_distributed_optimizer else 'off'}",
        f"model: {plan.dims.num_layers} layers, hidden {plan.dims.hidden}, vocab padded to {plan.dims.padded_vocab}"
        + (f", {plan.dims.experts} experts top-{plan.dims.topk}" if plan.dims.moe else "")
        + f"; parameter counts {'from a meta build of each stage' if plan.exact else 'derived per layout'}",
        "",
        "GiB per rank (ranks of one pipeline stage are alike)",
        "stage  ranks      layers  params (dense/expert/frozen)   weights  grads  optim  activ(mb)   working  "
        "train  save  export",
    ]
    for c, r in zip(plan.census, plan.ranks):
        params = f"{_params(c.sum('dense'))}/{_params(c.sum('expert'))}/{_params(c.sum('frozen'))}"
        working = max(r.working, key=r.working.get) if r.working else "-"
        lines.append(
            f"{c.pp_rank:<6} {stage_ranks_text(plan, c.pp_rank):<10} {c.layers:<7} {params:<30} "
            f"{_gib(r.parts['weights']):>7} {_gib(r.parts['main grads']):>6} {_gib(r.parts['master + optimizer']):>6} "
            f"{_gib(r.parts['activations']):>6}({r.inflight:g}) {_gib(max(r.working.values(), default=0)):>5} "
            f"{working:<9}{_gib(r.train_peak):>6} {_gib(r.save_peak):>5} "
            f"{_gib(r.export_peak) if r.export_extra else '-':>6}"
        )
    per_mb = w.tokens_per_micro_batch()
    lines += [
        "",
        f"micro-batch: {w.micro_batch} x {w.seq_len} tokens"
        + (" x 2 (chosen + rejected)" if w.sequences_per_sample > 1 else "")
        + (" (packed blocks)" if w.packing else " (padded to the longest sequence; cutoff_len assumed)")
        + (f", {per_mb // m.context_parallel_size} tokens per CP rank" if m.context_parallel_size > 1 else ""),
        f"global batch: {plan.global_batch} sequences = DP {plan.data_parallel_size} x micro-batch {w.micro_batch} "
        f"x {w.grad_accum} micro-batches per step; {plan.tokens_per_step} tokens per step",
        "communication: " + bucket_text(plan),
        f"pipeline bubble: {100 * plan.bubble:.1f}% of the step; estimated throughput "
        f"{tokens_per_second(plan):,.0f} tokens/s (H100/H200, cost model of llamafactory_mca/plan/cost.py)",
        f"peak {_gib(plan.peak)} GiB + {_gib(HEADROOM_BYTES)} GiB headroom against {_gib(plan.gpu_memory)} GiB per GPU: "
        + ("fits" if plan.fits else "DOES NOT FIT"),
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def search_text(ranked: list, recipe: Optional[dict], top: int = 10) -> str:
    """The best `top` fitting layouts with their recipe lines."""
    if not ranked:
        return "no layout of these GPUs fits; more GPUs, a shorter cutoff_len or LoRA are needed"
    out = [f"{len(ranked)} layouts fit; best {min(top, len(ranked))} by estimated throughput:"]
    for i, (tps, plan) in enumerate(ranked[:top], 1):
        m = plan.mca_args
        out.append(f"\n#{i}  {tps:,.0f} tokens/s  peak {_gib(plan.peak)} GiB  bubble {100 * plan.bubble:.0f}%  "
                   f"(TP={m.tensor_model_parallel_size} PP={m.pipeline_model_parallel_size} "
                   f"VPP={m.virtual_pipeline_model_parallel_size or 1} CP={m.context_parallel_size} "
                   f"EP={m.expert_model_parallel_size} recompute={m.recompute_granularity or 'none'} "
                   f"dist-opt={'on' if m.use_distributed_optimizer else 'off'})")
        out += ["    " + line for line in recipe_lines(m, recipe)]
    return "\n".join(out)


PLOT_PARTS = ("weights", "main grads", "master + optimizer", "activations", "working set")


def plot_memory(plan: Plan, path: str) -> str:
    """A stacked bar per pipeline stage (training peak by component) with the GPU's memory as a line; returns
    `path`. Raises RuntimeError with the install hint when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed. Fix: pip install matplotlib "
                           "(or leave --plot out).") from None
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(plan.ranks) + 2), 4.5))
    labels = [f"stage {r.pp_rank}\nranks {stage_ranks_text(plan, r.pp_rank)}" for r in plan.ranks]
    bottoms = [0.0] * len(plan.ranks)
    for part in PLOT_PARTS:
        values = [(max(r.working.values(), default=0) if part == "working set" else r.parts.get(part, 0)) / GIB
                  for r in plan.ranks]
        ax.bar(labels, values, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.axhline(plan.gpu_memory / GIB, color="black", linestyle="--", label="GPU memory")
    ax.set_ylabel("GiB per rank (training peak)")
    ax.set_title("llamafactory-mca plan")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["plan_text", "plot_memory", "search_text"]
