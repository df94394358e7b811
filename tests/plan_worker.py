"""Real builds for the planner's checks, under `torchrun --nproc_per_node 2` (gloo), one case per layout x kind:

    torchrun --nproc_per_node 2 tests/plan_worker.py --models DIR --out OUT --cases tp2:llama,ep2:qwen3_moe

Each rank builds its model chunks on the CPU in bf16, wraps them in megatron DDP, builds megatron's optimizer
and runs one optimizer step, then records what it holds: local parameter counts (the planner's census of the
real chunks and a plain sum), the bytes of the DDP gradient buffers and of the optimizer's fp32 master params
and Adam moments.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tests.workers import run_cases

LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "vpp2": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    "dp2opt": dict(use_distributed_optimizer=True),
    "ep2opt": dict(expert_model_parallel_size=2, use_distributed_optimizer=True),
}


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer) -> int:
    """fp32 master params + Adam moments held by megatron's (chained) optimizer on this rank."""
    seen, total = set(), 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if id(p) not in seen and p.dtype == torch.float32:
                    seen.add(id(p))
                    total += _tensor_bytes(p)
        for state in inner.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.numel() > 1 and id(v) not in seen:
                    seen.add(id(v))
                    total += _tensor_bytes(v)
    return total


def check(kind: str, model_dir: str, layout: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from transformers import AutoConfig

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.training.ddp import wrap_ddp
    from llamafactory_mca.models.registry import bridge_for
    from llamafactory_mca.plan.meta import census_of_chunks

    hf_config = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(hf_config.model_type)
    m = MegatronArguments(**LAYOUTS[layout])
    models = bridge.build_model(hf_config, m, torch.bfloat16, init_weights=True)
    census = census_of_chunks(models, ps.get_pipeline_model_parallel_rank())
    res = {"kind": kind, "layout": layout, "pp_rank": census.pp_rank,
           "dense": census.sum("dense"), "expert": census.sum("expert"), "frozen": census.sum("frozen"),
           "layers": census.layers, "chunks": len(census.chunks),
           "numel": sum(p.numel() for model in models for p in model.parameters())}
    ddp = wrap_ddp(m, models)
    res["grad_buffer_bytes"] = sum(_tensor_bytes(b.grad_data) for d in ddp for b in d.buffers + d.expert_parallel_buffers)
    cfg = OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16,
                          use_distributed_optimizer=m.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(cfg, ddp)
    for d in ddp:
        d.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    res["optimizer_bytes"] = optimizer_state_bytes(optimizer)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", required=True, help="layout:kind,...")
    a = p.parse_args(argv)
    cases = [tuple(c.split(":")) for c in a.cases.split(",")]
    return run_cases(a.out, cases, lambda kind, layout, _work: check(kind, os.path.join(a.models, kind), layout),
                     LAYOUTS, lambda kind, layout: {"kind": kind, "layout": layout})


if __name__ == "__main__":
    sys.exit(main())
