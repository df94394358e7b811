"""MoE experts without Transformer Engine: one grouped GEMM for all local experts (`torch._grouped_mm`).

`TorchGroupedMLP` keeps megatron's `GroupedMLP` parameter layout (weight1 [h, E_local * fc1_out / etp],
weight2 [E_local * ffn / etp, h], each viewed per expert as [E_local, h, *] / [E_local, *, h]) and its
sharded checkpoint format (compatible with SequentialMLP), but runs on `torch._grouped_mm` instead of the
`grouped_gemm` package, so no Python loop over experts on GPU. Where `_grouped_mm` cannot run (CPU, or
dtypes/alignments the kernel refuses) a per-expert loop computes the same thing.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.transformer.moe import experts as mcore_experts
from megatron.core.transformer.moe import grouped_gemm_util as gg
from megatron.core.transformer.moe.experts import GroupedMLP


@contextlib.contextmanager
def _no_grouped_gemm_check():
    orig = gg.assert_grouped_gemm_is_available
    gg.assert_grouped_gemm_is_available = lambda: None
    try:
        yield
    finally:
        gg.assert_grouped_gemm_is_available = orig


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda:
        return False
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    # the kernel wants 16-byte aligned rows
    return x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """x [T, k] sorted by expert, w [E, k, n], tokens_per_expert [E] -> [T, n]."""
    if _grouped_mm_ok(x, w):
        offs = torch.cumsum(tokens_per_expert.to(device=x.device), dim=0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    counts = tokens_per_expert.tolist()
    chunks = torch.split(x, counts, dim=0)
    return torch.cat([c @ w[e] for e, c in enumerate(chunks)], dim=0)


class TorchGroupedMLP(GroupedMLP):
    """megatron's GroupedMLP on torch._grouped_mm (any dtype; CPU fallback)."""

    def __init__(self, num_local_experts: int, config, pg_collection: Optional[object] = None):
        with _no_grouped_gemm_check():
            super().__init__(num_local_experts, config, pg_collection=pg_collection)
        act = self.activation_func

        def activation_func_with_probs(x, probs):
            return (act(x) * probs).to(x.dtype)

        self.activation_func_with_probs = activation_func_with_probs

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        if self.config.moe_apply_probs_on_input:
            x = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        w1 = self.weight1.view(self.num_local_experts, self.config.hidden_size, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, self.config.hidden_size)
        if x.nelement() == 0:
            # keep every parameter in the graph so that gradients exist
            h = torch.matmul(x, w1[0])
            h = self.activation_func_with_probs(h, permuted_probs.unsqueeze(-1))
            out = torch.matmul(h, w2[0]) + 0.0 * (self.weight1.sum() + self.weight2.sum())
            return out, None
        tokens_per_expert = tokens_per_expert.to("cpu") if not x.is_cuda else tokens_per_expert
        h = grouped_mm(x, w1, tokens_per_expert)
        h = self.activation_func_with_probs(h, permuted_probs.unsqueeze(-1))
        out = grouped_mm(h, w2, tokens_per_expert)
        return out, None


__all__ = ["TorchGroupedMLP", "grouped_mm", "mcore_experts"]
