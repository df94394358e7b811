"""Throughput estimate of a layout, for ranking `--search` results (relative order, not a promise).

    tokens/s = GPUs * PEAK * MFU(layout) / FLOPs per token
    MFU(layout) = base MFU (dense or MoE) * TP factor^log2(TP) * CP factor^log2(CP) * EP factor (EP > 1)
                  / recompute FLOPs factor / (1 + pipeline bubble)

Every constant is a measurement of ours on H200 (benchmarks/RESULTS.md, benchmarks/results/*.json; tests check
that they still match those files):

* DENSE_MFU 0.499: s2.json (Llama-3-8B, 4 GPUs, TP=1, distributed optimizer, both overlaps, 4096 tokens).
* MOE_MFU 0.293: s3.json (Qwen3-30B-A3B widths, 1 GPU, grouped-GEMM experts, sync-free permutation; commit
  d305fdd's run).
* EP_FACTOR 0.547: s3x4.json / s3.json MFU (EP=4 alltoall against EP=1: the dispatcher's host syncs; s3x4 was
  measured before the sync-free permutation of kernels/permute.py, so this is pessimistic for EP).
* TP_FACTOR 0.8155 per doubling: RESULTS.md "s2, Llama-3-8B" table, TP=2 + SP (38.9%) against TP=1 (47.7%):
  without Transformer Engine TP collectives are not overlapped.
* CP_FACTOR: not measured; taken equal to TP_FACTOR (K/V all-gather per layer, not overlapped either).
* Full recompute re-runs the forward: 4/3 of the FLOPs; selective: 1.05 (assumed).
* The bubble: (PP - 1) / (VPP * micro-batches) (1F1B / interleaved schedules).
Checked against the six scenarios in benchmarks/RESULTS.md ("Memory plan vs measured", throughput column).
"""

from __future__ import annotations

import math
from typing import Any

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16 (benchmarks/shapes.py)
DENSE_MFU = 0.499
MOE_MFU = 0.293
EP_FACTOR = 0.547
TP_FACTOR = 0.8155
CP_FACTOR = TP_FACTOR
RECOMPUTE_FLOPS = {"full": 4.0 / 3.0, "selective": 1.05, None: 1.0}


def layout_mfu(moe: bool, m: Any, bubble: float) -> float:
    """Expected model-FLOPs utilisation of layout `m` (see the module docstring)."""
    mfu = MOE_MFU if moe else DENSE_MFU
    mfu *= TP_FACTOR ** math.log2(m.tensor_model_parallel_size)
    mfu *= CP_FACTOR ** math.log2(m.context_parallel_size)
    if moe and m.expert_model_parallel_size > 1:
        mfu *= EP_FACTOR
    return mfu / RECOMPUTE_FLOPS.get(m.recompute_granularity, 1.0) / (1.0 + bubble)


def tokens_per_second(plan: Any) -> float:
    """Estimated training tokens per second of a `Plan` on H100/H200-class GPUs."""
    flops = plan.dims.flops_per_token(plan.workload.seq_len)
    mfu = layout_mfu(plan.dims.moe, plan.mca_args, plan.bubble)
    return plan.workload.world_size * PEAK_BF16_FLOPS * mfu / flops


__all__ = ["CP_FACTOR", "DENSE_MFU", "EP_FACTOR", "MOE_MFU", "PEAK_BF16_FLOPS", "TP_FACTOR", "layout_mfu",
           "tokens_per_second"]
