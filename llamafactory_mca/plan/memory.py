"""GPU memory of one rank, component by component, from its parameter census and the recipe's workload.

What is counted (bytes; `a` = bytes of the training dtype, 2 under bf16):

* weights: every local parameter in the training dtype (frozen ones too).
* main grads: megatron DDP's gradient buffer, one element per trainable local parameter, fp32 when
  `accumulate_allreduce_grads_in_fp32` (default) else the training dtype. Communication buckets are views of this
  buffer (no extra allocation); NCCL's own buffers are outside the torch allocator.
* master params + optimizer state: fp32 copy (not under fp32 training) + Adam's two fp32 moments = 12 (8) bytes
  per trainable parameter; with the distributed optimizer divided by the data-parallel size (x CP) for dense
  parameters and by the expert-data-parallel size for expert parameters.
* activations saved for backward, per micro-batch and decoder layer (SDPA attention: no score matrix), for the
  tokens of one rank `T = micro_batch * seq / CP`; with sequence parallelism the hidden-size tensors outside
  attention / MLP are divided by TP; `full` recompute keeps one layer input per recompute group; each pipeline
  stage holds the micro-batches of the 1F1B (or interleaved) warm-up in flight.
* working set: the largest transient on top: one recompute group re-run in backward, the vocab-parallel
  logits (our cross entropy writes the gradient into the logits buffer: one copy), or the embedding's dense
  weight gradient before it is added to the main grad.

Peaks: training (static + in-flight activations + working set), checkpoint save (static + one contiguous fp32
copy of the largest local tensor), final Hugging Face export on global rank 0 (static + the shard being
assembled, up to `max_shard_size`, + the largest full tensor gathered over TP). The figures of the six measured
benchmark scenarios are in benchmarks/RESULTS.md ("Memory plan vs measured").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llamafactory_mca.plan.meta import ModelDims, ParamCensus

GIB = 1024**3
# CUDA context, NCCL communicators and allocator slack that torch's max_memory_allocated does not see
HEADROOM_BYTES = 2 * GIB


@dataclass
class Workload:
    """What one optimizer step pushes through each rank."""

    world_size: int
    micro_batch: int = 1  # per_device_train_batch_size (sequences)
    seq_len: int = 1024  # cutoff_len: the longest sequence (packing: every block)
    grad_accum: int = 1  # gradient_accumulation_steps = pipeline micro-batches
    sequences_per_sample: int = 1  # 2 for DPO (chosen + rejected in one micro-batch)
    dtype_bytes: int = 2
    packing: bool = False
    max_shard_size: int = 5 * 10**9
    save_hf_model: bool = True

    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.sequences_per_sample * self.seq_len


@dataclass
class RankMemory:
    """Bytes of one rank (all ranks of a pipeline stage alike) by component, and the three peaks."""

    pp_rank: int
    parts: dict = field(default_factory=dict)  # steady components (bytes)
    working: dict = field(default_factory=dict)  # transients, the largest counts
    inflight: int = 0
    save_extra: int = 0
    export_extra: int = 0

    @property
    def static(self) -> int:
        return sum(v for k, v in self.parts.items() if k != "activations")

    @property
    def train_peak(self) -> int:
        return self.static + self.parts.get("activations", 0) + max(self.working.values(), default=0)

    @property
    def save_peak(self) -> int:
        return self.static + self.save_extra

    @property
    def export_peak(self) -> int:
        return self.static + self.export_extra

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.save_peak, self.export_peak)


def _recompute_modules(m: Any) -> set:
    mods = {s.strip() for s in (m.recompute_modules or "").split(",") if s.strip()}
    if m.moe_layer_recompute:
        mods.add("moe")
    return mods


def layer_activation_bytes(d: ModelDims, w: Workload, m: Any) -> float:
    """Bytes one decoder layer keeps for backward for one micro-batch on one rank (no full recompute)."""
    a = w.dtype_bytes
    tp, cp = m.tensor_model_parallel_size, m.context_parallel_size
    etp = m.expert_tensor_parallel_size or tp
    sp = tp if m.sequence_parallel else 1
    T = w.tokens_per_micro_batch() / cp
    hq, hkv = d.heads * d.head_dim / tp, d.kv_heads * d.head_dim / tp
    selective = _recompute_modules(m) if m.recompute_granularity == "selective" else set()
    norm_in = a * T * d.hidden / sp
    # attention: norm input, qkv input, q/k-norm inputs, q + K/V gathered over CP, output, log-sum-exp
    attn = 2 * norm_in + a * T * hq + a * T * 2 * hkv * cp + a * T * hq + 4 * T * d.heads / tp
    if d.qk_layernorm:
        attn += a * T * (hq + hkv)
    if "layernorm" in selective:
        attn -= norm_in
    if d.moe:
        routed = T * d.topk / sp
        mlp = 2 * norm_in + 3 * 4 * T * d.experts / sp  # norm in, dispatcher input, router logits / probs (fp32)
        experts = routed * (a * d.hidden + a * 3 * d.moe_ffn / etp + a * d.hidden)
        if "moe_act" in selective:
            experts -= routed * a * d.moe_ffn / etp
        mlp = 2 * norm_in if "moe" in selective else mlp + experts
    else:
        mlp = 2 * norm_in + a * T * 3 * d.ffn / tp
        if "mlp" in selective:
            mlp = 2 * norm_in
    if "layernorm" in selective:
        mlp -= norm_in
    if d.linear_fraction:
        attn = (1 - d.linear_fraction) * attn + d.linear_fraction * delta_net_activation_bytes(d, w, m)
    return attn + mlp


# fp32 tensors of one delta-net layer's recurrence kept for backward, in units of [tokens x value heads x dv]
# elements, counted in kernels/linear_attention.torch_gated_delta_rule: q, k, v, k*beta, v*beta, k*beta*exp(g),
# k decayed to the chunk end, w (8); the per-chunk states as the loop keeps them and stacked (2 x 2: dk / chunk =
# 2 at 128 / 64); the loop's new values and their stack (2); q*exp(g) (1); the chunk matrices (decay twice, the
# masked product, the triangular system and its inverse, q k^T, the intra-chunk scores: 7 x chunk / dv = 3.5);
# the gated norm's fp32 input and gate (2): 22.5 (measured q3next at d722ff5: 49.5 GiB peak, this model 48.0)
DELTA_NET_FP32_UNITS = 22.5


def delta_net_activation_bytes(d: ModelDims, w: Workload, m: Any) -> float:
    """Bytes one gated delta-net layer keeps for backward for one micro-batch on one rank: the input norm, the
    bf16 projections and convolution, the fp32 recurrence (DELTA_NET_FP32_UNITS); under CP the rank holds the whole
    sequence of 1 / cp of the heads, the same count."""
    a = w.dtype_bytes
    tp, cp = m.tensor_model_parallel_size, m.context_parallel_size
    sp = tp if m.sequence_parallel else 1
    T = w.tokens_per_micro_batch() / cp
    keys, values = d.linear_key_heads * d.linear_key_dim / tp, d.linear_value_heads * d.linear_value_dim / tp
    projections = a * T * (2 * keys + 2 * values + 2 * d.linear_value_heads / tp)
    conv = 2 * a * T * (2 * keys + values)
    return 2 * a * T * d.hidden / sp + projections + conv + 4 * T * values * DELTA_NET_FP32_UNITS


def inflight_micro_batches(pp_rank: int, m: Any, num_micro: int) -> float:
    """Micro-batch x model-chunk activations a pipeline rank holds at its peak, in units of its whole stage
    (1F1B: pp - rank; interleaved: megatron's warm-up count of chunk passes, over vpp chunks)."""
    pp = m.pipeline_model_parallel_size
    vpp = m.virtual_pipeline_model_parallel_size or 1
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(num_micro, pp - pp_rank))
    warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1
    return min(num_micro * vpp, warmup) / vpp


def rank_memory(census: ParamCensus, d: ModelDims, w: Workload, m: Any) -> RankMemory:
    """The memory of the ranks of pipeline stage `census.pp_rank` under layout / options `m`."""
    a = w.dtype_bytes
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    ep = m.expert_model_parallel_size
    etp = m.expert_tensor_parallel_size or tp
    dp = w.world_size // (tp * pp * cp)
    edp = w.world_size // (ep * etp * pp)
    dense, expert, frozen = census.sum("dense"), census.sum("expert"), census.sum("frozen")
    trainable = dense + expert
    grad_bytes = 4 if m.accumulate_allreduce_grads_in_fp32 or a == 4 else a
    master = 4 if a < 4 else 0
    opt_per_param = master + 8
    if m.use_distributed_optimizer:
        opt = opt_per_param * (dense / (dp * cp) + expert / edp)
    else:
        opt = opt_per_param * trainable
    r = RankMemory(pp_rank=census.pp_rank)
    r.parts["weights"] = int(a * (trainable + frozen))
    r.parts["main grads"] = int(grad_bytes * trainable)
    r.parts["master + optimizer"] = int(opt)

    T = w.tokens_per_micro_batch() / cp
    sp = tp if m.sequence_parallel else 1
    layer = layer_activation_bytes(d, w, m)
    layers = census.layers
    inflight = inflight_micro_batches(census.pp_rank, m, w.grad_accum)
    r.inflight = inflight
    if m.recompute_granularity == "full":
        group = m.recompute_num_layers or 1
        layer_input = a * T * d.hidden / sp
        if m.recompute_method == "block":  # the first `group` layers recomputed, the rest keep everything
            kept = layer_input * min(layers, group) + layer * max(layers - group, 0)
        else:  # uniform: one input per group of `group` layers
            kept = layer_input * -(-layers // group)
        stage = kept
        r.working["recompute"] = int(layer * min(group, layers))
    else:
        stage = layer * layers
    if census.pre_process:
        stage += a * T * d.hidden / sp  # embedding output
    r.parts["activations"] = int(stage * inflight)
    vocab_local = d.padded_vocab // tp
    if census.post_process:
        r.working["logits"] = int(a * T * vocab_local + 2 * a * T * d.hidden / sp + 8 * T)
    if census.pre_process:
        r.working["embedding grad"] = int(a * vocab_local * d.hidden)
    largest = max(c.largest for c in census.chunks) if census.chunks else 0
    r.save_extra = 4 * largest
    shard = min(w.max_shard_size, a * _full_model_params(d)) if w.save_hf_model else 0
    r.export_extra = int(shard + 2 * a * largest * max(tp, etp)) if census.pp_rank == 0 and w.save_hf_model else 0
    return r


def _full_model_params(d: ModelDims) -> int:
    attn = d.hidden * d.head_dim * (2 * d.heads + 2 * d.kv_heads)
    mlp = 3 * d.hidden * (d.moe_ffn * d.experts if d.moe else d.ffn)
    return d.num_layers * (attn + mlp) + 2 * d.hidden * d.padded_vocab


def fits(ranks: list, gpu_memory: int) -> bool:
    """Whether every rank's peak plus the headroom fits `gpu_memory` bytes."""
    return all(r.peak + HEADROOM_BYTES <= gpu_memory for r in ranks)


__all__ = ["GIB", "HEADROOM_BYTES", "RankMemory", "Workload", "fits", "inflight_micro_batches",
           "layer_activation_bytes", "delta_net_activation_bytes", "rank_memory"]
