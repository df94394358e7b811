"""A plan: the recipe's layout on N GPUs, per pipeline stage (the distinct ranks): parameters, memory, batch
arithmetic, and whether it fits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from llamafactory_mca.plan.memory import HEADROOM_BYTES, RankMemory, Workload, rank_memory
from llamafactory_mca.plan.meta import LayerTemplate, ModelDims, ParamCensus, build_census, derive_census


@dataclass
class Plan:
    """Everything `llamafactory-mca plan` reports for one layout."""

    mca_args: Any
    workload: Workload
    dims: ModelDims
    census: list  # ParamCensus per pipeline stage
    ranks: list  # RankMemory per pipeline stage
    gpu_memory: int
    exact: bool = True  # census from per-stage meta builds (else derived from the layer template)
    notes: list = field(default_factory=list)

    @property
    def data_parallel_size(self) -> int:
        m = self.mca_args
        return self.workload.world_size // (m.tensor_model_parallel_size * m.pipeline_model_parallel_size
                                            * m.context_parallel_size)

    @property
    def global_batch(self) -> int:
        return self.data_parallel_size * self.workload.micro_batch * self.workload.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.workload.sequences_per_sample * self.workload.seq_len

    @property
    def bubble(self) -> float:
        """Pipeline bubble as a fraction of the ideal step: (pp - 1) / (vpp * micro-batches)."""
        m = self.mca_args
        vpp = m.virtual_pipeline_model_parallel_size or 1
        return (m.pipeline_model_parallel_size - 1) / (vpp * self.workload.grad_accum)

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)

    @property
    def fits(self) -> bool:
        return self.peak + HEADROOM_BYTES <= self.gpu_memory


def make_plan(hf_config: Any, bridge: Any, mca_args: Any, workload: Workload, gpu_memory: int,
              template: LayerTemplate, exact: bool = True, freeze: Optional[Any] = None,
              dtype: torch.dtype = torch.bfloat16) -> Plan:
    """Plan `mca_args` on `workload.world_size` GPUs. `exact`: build every pipeline stage's rank on `meta`
    (else derive the counts from `template`, as `--search` does)."""
    if exact:
        census = build_census(bridge, hf_config, mca_args, workload.world_size, dtype, freeze=freeze)
    else:
        census = derive_census(template, bridge, hf_config, template.dims.num_layers, mca_args)
    dims = dataclasses.replace(template.dims, padded_vocab=bridge.padded_vocab_size(hf_config,
                                                                                     mca_args.tensor_model_parallel_size))
    ranks = [rank_memory(c, dims, workload, mca_args) for c in census]
    plan = Plan(mca_args, workload, dims, census, ranks, gpu_memory, exact=exact)
    if workload.grad_accum % mca_args.pipeline_model_parallel_size and mca_args.pipeline_model_parallel_size > 1:
        plan.notes.append("gradient_accumulation_steps is not a multiple of pipeline_model_parallel_size: "
                          "the pipeline is not full")
    return plan


def total_params(census: list) -> int:
    return sum(c.sum("total") for c in census)


__all__ = ["Plan", "RankMemory", "ParamCensus", "make_plan", "total_params"]
