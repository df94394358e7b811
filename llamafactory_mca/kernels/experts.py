"""MoE experts on one grouped GEMM per projection, without Transformer Engine or `grouped_gemm`.

`TorchGroupedMLP` is a drop-in for megatron-core's experts module in the MoE layer spec:

    spec.submodules.mlp.submodules.experts = ModuleSpec(module=TorchGroupedMLP)   # submodules=None

It subclasses megatron-core's legacy `GroupedMLP` and keeps everything of it but the GEMMs: the constructor
signature `(num_local_experts, config, pg_collection)`, the parameters `weight1` / `weight2` with their
`allreduce` attributes (expert-parallel aware), initialisation, `sharded_state_dict` (so torch_dist
checkpoints hold the same per-expert `experts.linear_fc1.weight` / `experts.linear_fc2.weight` tensors that
SequentialMLP and TEGroupedMLP write), and `backward_dw`. The GEMMs run through
`llamafactory_mca.kernels.grouped_gemm.grouped_mm` (`torch._grouped_mm` on Hopper in bf16, a loop elsewhere),
the SwiGLU with the router probabilities through megatron's fused `weighted_bias_swiglu_impl` on GPU.

Weight layout (per rank: E = num_local_experts, H = hidden_size, F = moe_ffn_hidden_size / expert TP size):

    weight1: Parameter [H, E * 2F]   memory = weight1.view(E, H, 2F); w1[e] = [gate_e | up_e]^T
             i.e. weight1.view(E, H, 2F)[e] == cat([gate_proj_e, up_proj_e], dim=0).t()   (gate first)
    weight2: Parameter [E * F, H]    memory = weight2.view(E, F, H); w2[e] = down_proj_e^T

where gate_proj_e, up_proj_e are HF's per-expert [F, H] weights and down_proj_e is [H, F]. In transformers 5
the Qwen3-MoE / Mixtral experts are stored fused: `gate_up_proj` [E, 2F, H] (gate rows first) and
`down_proj` [E, H, F], so

    weight1.view(E, H, 2F) == gate_up_proj.transpose(1, 2)
    weight2.view(E, F, H)  == down_proj.transpose(1, 2)

`hf_to_grouped_weights` / `grouped_to_hf_weights` below do exactly this (with the expert-TP split of the
GLU halves), so a bridge needs no knowledge of the memory trick. Expert parallelism slices the expert axis:
rank r holds global experts [r * E, (r + 1) * E).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.moe import experts as _mcore_experts
from megatron.core.transformer.moe.experts import GroupedMLP

from .grouped_gemm import grouped_mm, offsets_from_counts

try:
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
except Exception:  # pragma: no cover - older megatron-core
    weighted_bias_swiglu_impl = None


@contextlib.contextmanager
def _without_grouped_gemm_check():
    """GroupedMLP.__init__ asserts that the `grouped_gemm` package is importable; we do not use it."""
    gg = _mcore_experts.gg
    saved = gg.assert_grouped_gemm_is_available
    gg.assert_grouped_gemm_is_available = lambda: None
    try:
        yield
    finally:
        gg.assert_grouped_gemm_is_available = saved


def _weighted_swiglu_eager(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    a, b = torch.chunk(x, 2, dim=-1)
    return (F.silu(a) * b * probs).to(x.dtype)


class TorchGroupedMLP(GroupedMLP):
    """Experts of a MoE layer as two grouped GEMMs (see the module docstring for the weight layout)."""

    def __init__(self, num_local_experts: int, config, pg_collection=None):
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        with _without_grouped_gemm_check():
            super().__init__(num_local_experts, config, pg_collection=pg_collection)
        self._fused_swiglu = (
            config.gated_linear_unit and config.activation_func is F.silu and weighted_bias_swiglu_impl is not None
        )
        # Adapter hook: an nn.Module with active(), fc1_delta(x, offs, empty), fc2_delta(h, offs, empty), anchor()
        # and its own sharded_state_dict (models/lora_experts.ExpertLora); None without adapters.
        self.adapter = None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):  # noqa: D102
        # GroupedMLP's own method treats every state-dict entry but weight1 as weight2: hide the adapter from it
        adapter = self._modules.pop("adapter", None)
        try:
            out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            if adapter is not None:
                self._modules["adapter"] = adapter
        if adapter is not None:
            out.update(adapter.sharded_state_dict(prefix, sharded_offsets, metadata))
        return out

    def _act_with_probs(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self._fused_swiglu:
            if h.is_cuda:
                return weighted_bias_swiglu_impl(h, None, probs)
            return _weighted_swiglu_eager(h, probs)
        return self.activation_func_with_probs(h, probs)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = permuted_local_hidden_states
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with topk 1"
            x = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        probs = permuted_probs.unsqueeze(-1)

        E, H = self.num_local_experts, self.config.hidden_size
        w1 = self.weight1.view(E, H, -1)
        w2 = self.weight2.view(E, -1, H)
        if x.dtype != w1.dtype:  # e.g. fp32 activations reaching bf16 weights: follow the weights
            x = x.to(w1.dtype)

        adapter = self.adapter if (self.adapter is not None and self.adapter.active()) else None
        if x.shape[0] == 0:
            # No token for the local experts: keep the weights in the graph so they get (zero) gradients.
            h = x @ self.weight1.view(H, -1)
            if self._fused_swiglu:
                h = _weighted_swiglu_eager(h, probs)
            else:
                h = self.activation_func_with_probs(h, probs)
            out = h @ self.weight2.view(-1, H)
            return (out + adapter.anchor().to(out.dtype) if adapter is not None else out), None

        offs = offsets_from_counts(tokens_per_expert, x.device)
        empty = None
        if not tokens_per_expert.is_cuda:  # host-side counts: free to know whether a group is empty
            empty = bool((tokens_per_expert == 0).any())

        fc1 = self._gemm(x, w1, offs, empty, self.weight1)
        if adapter is not None:
            # per-expert adapters (models/lora_experts.py) on the same grouped GEMM; no activation recompute with
            # them (the recomputed activation would also feed the adapter's fc2 path)
            delta = adapter.fc1_delta(x, offs, empty)
            fc1 = fc1 if delta is None else fc1 + delta
            inter = self._act_with_probs(fc1, probs)
            out = self._gemm(inter, w2, offs, empty, self.weight2)
            delta = adapter.fc2_delta(inter, offs, empty)
            return (out if delta is None else out + delta), None
        if self.activation_recompute:
            self.activation_checkpoint = tensor_parallel.CheckpointWithoutOutput()
            inter = self.activation_checkpoint.checkpoint(self._act_with_probs, fc1, probs)
            out = self._gemm(inter, w2, offs, empty, self.weight2)
            self.activation_checkpoint.discard_output_and_register_recompute(out)
        else:
            inter = self._act_with_probs(fc1, probs)
            out = self._gemm(inter, w2, offs, empty, self.weight2)
        return out, None

    def _gemm(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, empty: Optional[bool],
              param: torch.nn.Parameter) -> torch.Tensor:
        """One grouped GEMM: FP8 when `convert_model_to_fp8` marked this module (kernels/fp8.py; its weight gradient
        reaches main_grad through the DDP hook), else bf16 with the weight gradient added into `param.main_grad`."""
        if getattr(self, "fp8_recipe", None) is not None:
            from llamafactory_mca.kernels.fp8 import fp8_grouped_mm

            return fp8_grouped_mm(x, w, offs)
        return grouped_mm(x, w, offs, empty_groups=empty, main_grad_param=param)


# ---------------------------------------------------------------------------------------------------------
# HF <-> TorchGroupedMLP weights (full tensors of the experts this rank holds)
# ---------------------------------------------------------------------------------------------------------


def hf_to_grouped_weights(
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """HF fused experts -> (weight1 [H, E*2F/tp], weight2 [E*F/tp, H]) for one expert-TP rank.

    gate_up_proj: [E, 2F, H] (rows 0..F-1 gate, F..2F-1 up), down_proj: [E, H, F], E = the experts of this
    EP rank (slice the expert axis first). For per-expert HF checkpoints use
    `gate_up_proj = torch.stack([torch.cat([gate_e, up_e], 0) for e ...])`, `down_proj = torch.stack(downs)`.
    With expert TP each rank takes its slice of gate and of up (megatron's GLU sharding) and of down's F axis.
    """
    E, two_f, H = gate_up_proj.shape
    f = two_f // 2
    assert f % tp_size == 0, (f, tp_size)
    fs = f // tp_size
    gate, up = gate_up_proj[:, :f], gate_up_proj[:, f:]
    sl = slice(tp_rank * fs, (tp_rank + 1) * fs)
    w1 = torch.cat([gate[:, sl], up[:, sl]], dim=1)  # [E, 2fs, H]
    w1 = w1.transpose(1, 2).contiguous().view(H, E * 2 * fs)
    w2 = down_proj[:, :, sl].transpose(1, 2).contiguous().view(E * fs, H)
    return w1, w2


def grouped_to_hf_weights(
    weights1: list[torch.Tensor] | torch.Tensor,
    weights2: list[torch.Tensor] | torch.Tensor,
    num_local_experts: int,
    hidden_size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `hf_to_grouped_weights`: weight1/weight2 of every expert-TP rank (in rank order, or one
    tensor for TP=1) -> (gate_up_proj [E, 2F, H], down_proj [E, H, F])."""
    w1s = [weights1] if isinstance(weights1, torch.Tensor) else list(weights1)
    w2s = [weights2] if isinstance(weights2, torch.Tensor) else list(weights2)
    E, H = num_local_experts, hidden_size
    gates, ups, downs = [], [], []
    for w1, w2 in zip(w1s, w2s):
        g_u = w1.view(E, H, -1).transpose(1, 2)  # [E, 2fs, H]
        g, u = g_u.chunk(2, dim=1)
        gates.append(g)
        ups.append(u)
        downs.append(w2.view(E, -1, H).transpose(1, 2))  # [E, H, fs]
    gate_up = torch.cat([torch.cat(gates, 1), torch.cat(ups, 1)], 1).contiguous()
    down = torch.cat(downs, 2).contiguous()
    return gate_up, down
