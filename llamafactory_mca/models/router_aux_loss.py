"""The router load-balancing loss as LLaMA-Factory's Hugging Face path computes it (qwen2_moe, qwen3_moe, mixtral).

With `moe_aux_loss_coef` set, LLaMA-Factory turns on `output_router_logits` and sets `router_aux_loss_coef`; the
HF model then pools the router logits of ALL its MoE layers for the micro-batch (padding left out through the
attention mask) and adds, once per micro-batch,

    coef * num_experts * sum_e f_e * P_e,   f_e = (top-k picks of expert e) / N,   P_e = (sum of p_e) / N,

over the N = (real tokens) x (MoE layers) rows (transformers' `load_balancing_loss_func`). The HF Trainer divides
the cross entropy by the step's label tokens (`num_items_in_batch`) but not this term, so a step's loss is
CE + coef * (sum of every micro-batch's aux, over accumulation steps and data-parallel ranks).

Megatron's own aux losses are per layer (and per sequence or global-batch), so this module adds the HF one instead:
- each router's logits are captured (`TopKRouter.gating` wrapped); the f_e counts carry no gradient, so the loss is
  linear in each token's probabilities: a rank that sees only part of the tokens (sequence parallel, context
  parallel) adds num_experts * sum_e f_e * (its own P_e share), with the counts and N all-reduced over the ranks
  sharing the micro-batch. The gradients of the router weights (marked sequence-parallel) are summed by megatron.
- the term is attached to the model output with megatron's `MoEAuxLossAutoScaler`, scaled by the step's global loss
  denominator, which megatron's per-token-loss `finalize_model_grads` divides every gradient by.
Pipeline parallelism is not covered: a stage's gradient would need the counts of later stages (see
`unsupported_reason`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def router_statistics(logits: torch.Tensor, valid: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor]:
    """(top-k picks per expert [E], summed routing probabilities per expert [E] (differentiable), real tokens)
    of one layer's router `logits` [..., E] over the tokens where `valid` [...] is nonzero (HF's attention mask)."""
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.reshape(-1, num_experts).float(), dim=-1)
    weight = valid.reshape(-1, 1).to(probs.dtype)
    picks = torch.nn.functional.one_hot(torch.topk(probs.detach(), top_k, dim=-1).indices, num_experts).sum(1)
    return (picks.to(probs.dtype) * weight).sum(0), (probs * weight).sum(0), weight.sum()


def load_balancing_loss(logits_per_layer: list[torch.Tensor], attention_mask: Optional[torch.Tensor],
                        top_k: int) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` of one micro-batch: `logits_per_layer` [b * s, E] per MoE layer
    (row-major over [b, s]), `attention_mask` [b, s] (None: every token counts)."""
    counts, sums, tokens = 0, 0, 0
    for logits in logits_per_layer:
        valid = attention_mask.reshape(-1) if attention_mask is not None else torch.ones(logits.shape[0])
        c, p, n = router_statistics(logits, valid.to(logits.device), top_k)
        counts, sums, tokens = counts + c, sums + p, tokens + n
    return pooled_loss(counts, sums, tokens)


def pooled_loss(counts: torch.Tensor, prob_sums: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """num_experts * sum_e (counts_e / N) * (prob_sums_e / N); 0 without tokens (a filler micro-batch)."""
    if float(tokens) == 0.0:
        return prob_sums.sum() * 0.0
    return counts.numel() * torch.sum(counts.detach() / tokens * prob_sums / tokens)


def hf_path_trains_on_it(model_args: Any) -> bool:
    """Whether LLaMA-Factory's HF path back-propagates the aux loss. Its default gradient checkpointing
    (reentrant, or unsloth's) runs each layer's first forward without autograd, so the router logits it records
    carry no gradient: the aux loss is in the logged loss but trains nothing (measured: HF's per-step losses equal
    ours without the aux gradient to 1e-7, and with it once `disable_gradient_checkpointing: true`)."""
    if getattr(model_args, "disable_gradient_checkpointing", False):
        return True
    return not getattr(model_args, "use_reentrant_gc", True) and not getattr(model_args, "use_unsloth_gc", False)


def unsupported_reason(mca_args: Any, stage: str, thd: bool) -> Optional[str]:
    """Why the HF-style loss cannot be added to this run (None: it can)."""
    from llamafactory_mca.args import recompute_module_list

    if (mca_args.pipeline_model_parallel_size or 1) > 1:
        return "pipeline parallelism (pipeline_model_parallel_size > 1)"
    if stage not in ("pt", "sft"):
        return f"stage {stage}"
    if thd:
        return "neat_packing"
    if mca_args.recompute_granularity == "full" or mca_args.moe_layer_recompute \
            or "moe" in recompute_module_list(mca_args):
        return "recomputation of the MoE layers"
    return None


class HFRouterAuxLoss:
    """Adds LLaMA-Factory's HF-path load-balancing loss to a megatron MoE model (one model chunk, no PP).

    Per optimizer step: `begin_step(mbs)` before megatron's schedule runs the micro-batches (in order), then
    `end_step()` returns the step's summed aux loss (over micro-batches and data-parallel ranks), which the
    logged loss adds times `coef`. `trains` False: the loss is only logged, no gradient (see `hf_path_trains_on_it`).
    """

    def __init__(self, models: list, coef: float, top_k: int, trains: bool = True) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.router import TopKRouter

        if len(models) != 1:
            raise ValueError("the HF-style router aux loss needs a single model chunk (no pipeline parallelism)")
        self.coef, self.top_k, self.trains = float(coef), top_k, trains
        self.sequence_parallel = bool(models[0].config.sequence_parallel)
        self.tp_rank = ps.get_tensor_model_parallel_rank() if self.sequence_parallel else 0
        cp = ps.get_context_parallel_world_size()
        if self.sequence_parallel and cp > 1:
            self.token_group = ps.get_tensor_and_context_parallel_group()
        elif self.sequence_parallel:
            self.token_group = ps.get_tensor_model_parallel_group()
        else:
            self.token_group = ps.get_context_parallel_group() if cp > 1 else None
        self.denominator_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.dp_group = ps.get_data_parallel_group()
        self.masks: list[torch.Tensor] = []
        self._mask: Optional[torch.Tensor] = None
        self.layers: Optional[list] = None  # statistics of the micro-batch being run forward
        self.denominator = 0.0
        self.step_total = 0.0
        self.routers = [mod for mod in models[0].modules() if isinstance(mod, TopKRouter)]
        for router in self.routers:
            router.gating = self._capturing(router.gating)
        models[0].register_forward_pre_hook(self._before_forward)
        models[0].register_forward_hook(self._after_forward)

    def begin_step(self, mbs: list, device: torch.device) -> None:
        """Queue the micro-batches' token masks and sum the step's loss denominators (collective)."""
        self.masks = [mb.token_mask for mb in mbs]
        total = torch.tensor([float(sum(float(mb.loss_denominator) for mb in mbs))], dtype=torch.float64,
                             device=device)
        dist.all_reduce(total, group=self.denominator_group)
        self.denominator = float(total[0])
        self.step_total = 0.0

    def end_step(self, device: torch.device) -> float:
        """The step's aux loss summed over micro-batches and data-parallel ranks (collective)."""
        total = torch.tensor([self.step_total], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self.dp_group)
        self.masks = []
        return float(total[0])

    # ---- hooks

    def _capturing(self, gating: Any) -> Any:
        def gating_with_capture(hidden: torch.Tensor) -> torch.Tensor:
            logits = gating(hidden)
            if self.layers is not None:  # (no gradient where nothing before the router trains, as on HF's side)
                self.layers.append(router_statistics(logits, self._local_mask(logits), self.top_k))
            return logits

        return gating_with_capture

    def _local_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's token mask in the router's row order: [s, b], the sequence-parallel shard of s."""
        mask = self._mask.t()
        s_local = logits.shape[0]
        return mask[self.tp_rank * s_local: (self.tp_rank + 1) * s_local].reshape(-1)

    def _before_forward(self, module: Any, args: Any) -> None:
        self.layers = None
        if module.training and torch.is_grad_enabled() and self.masks:
            self._mask = self.masks.pop(0).to(next(module.parameters()).device)
            self.layers = []

    def _after_forward(self, module: Any, args: Any, output: Any) -> Any:
        layers, self.layers = self.layers, None
        if not layers:
            return output
        counts = torch.stack([c for c, _, _ in layers]).sum(0)
        sums = torch.stack([p for _, p, _ in layers]).sum(0)
        tokens = torch.stack([n for _, _, n in layers]).sum()
        shared = torch.cat([counts, sums.detach(), tokens.reshape(1)])
        if self.token_group is not None:
            dist.all_reduce(shared, group=self.token_group)
        e = counts.numel()
        counts, full_sums, tokens = shared[:e], shared[e: 2 * e], shared[2 * e]
        self.step_total += float(pooled_loss(counts, full_sums, tokens))
        if not self.trains:
            return output
        local = pooled_loss(counts, sums, tokens)  # this rank's linear share: the shares add up to the loss
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        return MoEAuxLossAutoScaler.apply(output, local * (self.coef * self.denominator))
