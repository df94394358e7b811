"""Qwen3-Next's gated delta-net linear attention as a megatron self-attention module (local linears, no TE, no fla
needed), and its zero-centred RMSNorm.

`GatedDeltaNet` computes what transformers' `Qwen3NextGatedDeltaNet` computes, with the Hugging Face parameter
layout kept so that conversion is a plain split (models/param_mapping.py):

  in_proj_qkvz  ColumnParallelLinear, rows grouped per key head g: [q_g (dk), k_g (dk), v_g (r*dv), z_g (r*dv)]
                (r = value heads per key head): tensor parallelism splits by key-head groups, a contiguous block
  in_proj_ba    ColumnParallelLinear, per key head [b_g (r), a_g (r)]
  conv1d        depthwise causal convolution over the channels [q (all heads) | k | v]: each of the three
                sections is split over TP (`param_mapping.ConvSections`)
  A_log, dt_bias  per value head (split over TP), norm.weight [dv] (replicated; its gradient is summed over TP in
                autograd, each rank seeing only its heads), out_proj RowParallelLinear.

`SplitGatedDeltaNet` is Qwen3.5's variant (transformers' `Qwen3_5GatedDeltaNet`): the same computation with
separate projections `in_proj_qkv` ([q | k | v] over all heads, split over TP by section like the convolution),
`in_proj_z`, `in_proj_b`, `in_proj_a` (per value head).

Under sequence parallelism the input projections gather the sequence and out_proj scatters it back, as for
attention. The recurrence itself is `kernels.linear_attention.gated_delta_rule` (fla on a GPU, torch elsewhere).
Packed sequences (neat_packing's THD rows, `PackedSeqParams`): the convolution and the recurrence restart at every
sample's (padded) start, so each sample sees only itself, as the attention layers do; the segment boundaries are
read to the host once per micro-batch (`packing.segment_lengths`). Context parallelism: an all-to-all over the CP group
gives each rank whole sequences of `nk / (tp * cp)` key-head groups for the convolution and the recurrence, and
returns the outputs to its load-balanced chunks before out_proj (models/cp_head_exchange.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from llamafactory_mca.kernels.linear_attention import gated_delta_rule
from llamafactory_mca.models.cp_head_exchange import CpHeadExchange
from llamafactory_mca.models.packing import segment_lengths

def row_segments(packed_seq_params: Any, seq: int) -> list[int]:
    """Token counts of the packed samples of a THD row of `seq` tokens (`packing.segment_lengths`: one host read
    per micro-batch), [seq] without packing."""
    if packed_seq_params is None:
        return [seq]
    lengths = segment_lengths(packed_seq_params)
    if sum(lengths) != seq:
        raise ValueError(f"packed samples of {sum(lengths)} tokens in a row of {seq}: the linear-attention layers "
                         "need the whole THD row")
    return lengths


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm with the weight stored as an offset from one, `x / rms(x) * (1 + w)` in fp32 (Qwen3-Next's
    `Qwen3NextRMSNorm`, bit-identical arithmetic); same constructor as megatron's norms."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **kwargs: Any):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def split_sections_factory(sharded: Any, sections: list[int], names: list[str]) -> Any:
    """A ShardedTensorFactory saving a TP shard made of `sections` (rows of dim 0, one per name) as one sharded
    tensor per section, `<key>.<name>`, each split over TP on its own (megatron's gated delta-net does the same
    for its convolution)."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    template = sharded.without_data()

    @torch.no_grad()
    def build(key: str, t: torch.Tensor, replica_id: Any, flattened_range: Any) -> list:
        whole = replace(template, key=key, data=t, dtype=t.dtype, replica_id=replica_id,
                        flattened_range=flattened_range)
        parts, start = [], 0
        for size, name in zip(sections, names):
            for part in whole.narrow(0, start, size):
                part.key = f"{part.key}.{name}"
                parts.append(part)
            start += size
        return parts

    @torch.no_grad()
    def merge(parts: list) -> torch.Tensor:
        return torch.cat(parts)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)


def per_segment(fn: Any, tensors: list[torch.Tensor], lengths: list[int], dim: int) -> torch.Tensor:
    """`fn(*tensors)` run on each packed sample alone (the tensors split along `dim` by `lengths`), concatenated."""
    if len(lengths) == 1:
        return fn(*tensors)
    return torch.cat([fn(*part) for part in zip(*(t.split(lengths, dim=dim) for t in tensors))], dim=dim)


class GatedDeltaNet(MegatronModule):
    """Gated delta-net token mixer of one linear-attention layer: [s, b, h] -> ([s, b, h], None)."""

    def __init__(self, config: Any, submodules: Any = None, layer_number: Optional[int] = None, **kwargs: Any):
        super().__init__(config)
        self.layer_number = layer_number
        tp = ps.get_tensor_model_parallel_world_size()
        nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.nk_local, self.per_key = nk // tp, nv // nk
        self.nv_local = nv // tp
        self.eps = config.layernorm_epsilon
        linear = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=False,
                      gather_output=False, is_expert=False)
        self.build_projections(config.hidden_size, nk, nv, linear)
        channels = self.nk_local * 2 * self.dk + self.nv_local * self.dv
        kernel = config.linear_conv_kernel_dim
        self.conv1d = torch.nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=False,
                                      dtype=config.params_dtype)
        self.dt_bias = torch.nn.Parameter(torch.ones(self.nv_local, dtype=config.params_dtype))
        self.A_log = torch.nn.Parameter(torch.empty(self.nv_local, dtype=config.params_dtype).uniform_(1, 16).log())
        for param in (self.conv1d.weight, self.dt_bias, self.A_log):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.ones(self.dv, dtype=config.params_dtype))
        self.out_proj = RowParallelLinear(nv * self.dv, config.hidden_size, config=config,
                                          init_method=config.output_layer_init_method, bias=False,
                                          input_is_parallel=True, skip_bias_add=True, is_expert=False)
        self.cp = CpHeadExchange.of_parallel_state()

    def build_projections(self, hidden: int, nk: int, nv: int, linear: dict) -> None:
        """The input projections (Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, rows grouped per key head)."""
        self.in_proj_qkvz = ColumnParallelLinear(hidden, 2 * nk * self.dk + 2 * nv * self.dv, **linear)
        self.in_proj_ba = ColumnParallelLinear(hidden, 2 * nv, **linear)

    def projection_names(self) -> tuple[str, ...]:
        """The input projections' module names."""
        return ("in_proj_qkvz", "in_proj_ba")

    def sectioned_weights(self) -> tuple[str, ...]:
        """Weights whose rows are the q | k | v channel sections, each split over TP (saved per section)."""
        return ("conv1d.weight",)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input projections of [s, b, h] `hidden_states`: (the convolution's input [b, s, q|k|v channels of
        this rank], z [b, s, value heads, dv], b and a [b, s, value heads]), from the fused per-key-head
        `in_proj_qkvz` / `in_proj_ba` (Qwen3-Next)."""
        qkvz, _ = self.in_proj_qkvz(hidden_states)
        ba, _ = self.in_proj_ba(hidden_states)
        seq, batch = qkvz.shape[:2]
        qkvz = qkvz.transpose(0, 1).reshape(batch, seq, self.nk_local, -1)
        ba = ba.transpose(0, 1).reshape(batch, seq, self.nk_local, -1)
        vz = self.per_key * self.dv
        query, key, value, z = torch.split(qkvz, [self.dk, self.dk, vz, vz], dim=3)
        b, a = torch.split(ba, [self.per_key, self.per_key], dim=3)
        mixed = torch.cat([t.reshape(batch, seq, -1) for t in (query, key, value)], dim=-1)
        return (mixed, z.reshape(batch, seq, self.nv_local, self.dv), b.reshape(batch, seq, self.nv_local),
                a.reshape(batch, seq, self.nv_local))

    def exchange_to_heads(self, mixed: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                          packed_seq_params: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`project`'s outputs for this rank's tokens and all of its TP heads -> the same for whole sequences and
        this CP rank's block of key-head groups (the value heads of a key head are contiguous, so a block of
        key heads is one of value heads too); unchanged without context parallelism."""
        if self.cp.size == 1:
            return mixed, z, b, a
        batch, seq = mixed.shape[:2]
        key_dim = self.nk_local * self.dk
        q, k, v = mixed.split([key_dim, key_dim, self.nv_local * self.dv], dim=-1)
        parts = [t.reshape(batch, seq, self.cp.size, -1) for t in (q, k, v, z, b, a)]
        sizes = [t.shape[-1] for t in parts]
        whole = self.cp.to_heads(torch.cat(parts, dim=-1).transpose(0, 1), packed_seq_params)
        q, k, v, z, b, a = whole.transpose(0, 1).squeeze(2).split(sizes, dim=-1)
        return torch.cat([q, k, v], dim=-1), z.unflatten(-1, (-1, self.dv)), b, a

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, packed_seq_params: Any = None,
                **kwargs: Any):
        """Megatron's self-attention call: returns (output [s, b, h], None). Under context parallelism the key-head
        groups go through the recurrence on whole sequences, `nk / (tp * cp)` per rank (cp_head_exchange.py)."""
        mixed, z, b, a = self.project(hidden_states)
        local_seq = mixed.shape[1]
        mixed, z, b, a = self.exchange_to_heads(mixed, z, b, a, packed_seq_params)
        batch, seq, nv = z.shape[:3]
        nk = nv // self.per_key
        lengths = row_segments(packed_seq_params, seq)
        weight = self.conv_weight_of_rank(nk)
        pad = weight.shape[-1] - 1
        mixed = per_segment(lambda x: F.silu(F.conv1d(x, weight, padding=pad, groups=weight.shape[0])[..., :x.shape[-1]]),
                            [mixed.transpose(1, 2)], lengths, dim=2).transpose(1, 2)
        query, key, value = torch.split(mixed, [nk * self.dk, nk * self.dk, nv * self.dv], dim=-1)
        query = query.reshape(batch, seq, nk, self.dk)
        key = key.reshape(batch, seq, nk, self.dk)
        value = value.reshape(batch, seq, nv, self.dv)
        heads = slice(self.cp.rank * nv, (self.cp.rank + 1) * nv)
        beta = b.sigmoid()
        g = -self.A_log[heads].float().exp() * F.softplus(a.float() + self.dt_bias[heads])
        if self.per_key > 1:
            query = query.repeat_interleave(self.per_key, dim=2)
            key = key.repeat_interleave(self.per_key, dim=2)
        out = per_segment(gated_delta_rule, [query, key, value, g, beta], lengths, dim=1)
        out = self.gated_norm(out.reshape(-1, self.dv), z.reshape(-1, self.dv))
        out = self.cp.to_sequence(out.reshape(batch, seq, nv, self.dv).transpose(0, 1), packed_seq_params)
        return self.out_proj(out.reshape(local_seq, batch, -1))

    def conv_weight_of_rank(self, nk: int) -> torch.Tensor:
        """The convolution's channels of this CP rank's `nk` key-head groups: its q, k and v sections' slices (all
        channels without context parallelism)."""
        weight = self.conv1d.weight
        if nk == self.nk_local:
            return weight
        r, key_dim, nv = self.cp.rank, self.nk_local * self.dk, nk * self.per_key
        q, k, v = weight.split([key_dim, key_dim, self.nv_local * self.dv])
        return torch.cat([q[r * nk * self.dk:(r + 1) * nk * self.dk], k[r * nk * self.dk:(r + 1) * nk * self.dk],
                          v[r * nv * self.dv:(r + 1) * nv * self.dv]])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Distributed-checkpoint tensors: the per-head parameters split over TP along dim 0, the convolution as its
        three sections (q, k, v channels: `conv1d.weight.query` ..., each split over TP, so a checkpoint loads at
        any TP size), the input / output projections as megatron's linears (their rows are grouped per key head:
        the same global layout at every TP size), the norm replicated."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
            sharded_state_dict_default,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=ps.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(own, prefix, {"dt_bias": 0, "A_log": 0}, sharded_offsets, **groups)
        out.update(make_sharded_tensors_for_checkpoint(self.conv1d.state_dict(prefix="", keep_vars=True),
                                                       f"{prefix}conv1d.", {"weight": 0}, sharded_offsets, **groups))
        out.update(make_sharded_tensors_for_checkpoint(self.norm.state_dict(prefix="", keep_vars=True),
                                                       f"{prefix}norm.", {}, sharded_offsets, **groups))
        for name in self.projection_names() + ("out_proj",):
            out.update(sharded_state_dict_default(getattr(self, name), f"{prefix}{name}.", sharded_offsets, metadata))
        key_dim = self.nk_local * self.dk
        for name in self.sectioned_weights():
            out[f"{prefix}{name}"] = split_sections_factory(out[f"{prefix}{name}"],
                                                            [key_dim, key_dim, self.nv_local * self.dv],
                                                            ["query", "key", "value"])
        return out

    def gated_norm(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each head's output, times silu(gate) (transformers' `Qwen3NextRMSNormGated`)."""
        weight = self.norm.weight
        if ps.get_tensor_model_parallel_world_size() > 1:
            weight = copy_to_tensor_model_parallel_region(weight)  # sums its gradient over the TP ranks' heads
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = weight * h.to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


class SplitGatedDeltaNet(GatedDeltaNet):
    """Qwen3.5's gated delta-net: the same computation with separate input projections, as transformers'
    `Qwen3_5GatedDeltaNet` holds them: `in_proj_qkv` ([q (all key heads) | k | v (all value heads)], each section
    split over TP like the convolution's channels, `param_mapping.ConvSections`, so a rank's output is its
    convolution input as it stands), `in_proj_z` [value heads * dv], `in_proj_b` and `in_proj_a` [value heads]
    (split over TP by value heads: a rank's value heads are those of its key heads)."""

    def build_projections(self, hidden: int, nk: int, nv: int, linear: dict) -> None:
        """`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a` (class docstring)."""
        self.in_proj_qkv = ColumnParallelLinear(hidden, 2 * nk * self.dk + nv * self.dv, **linear)
        self.in_proj_z = ColumnParallelLinear(hidden, nv * self.dv, **linear)
        self.in_proj_b = ColumnParallelLinear(hidden, nv, **linear)
        self.in_proj_a = ColumnParallelLinear(hidden, nv, **linear)

    def projection_names(self) -> tuple[str, ...]:
        return ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")

    def sectioned_weights(self) -> tuple[str, ...]:
        return ("conv1d.weight", "in_proj_qkv.weight")

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `GatedDeltaNet.project`, from the separate projections."""
        mixed, z, b, a = (getattr(self, name)(hidden_states)[0].transpose(0, 1) for name in self.projection_names())
        batch, seq = mixed.shape[:2]
        return mixed, z.reshape(batch, seq, self.nv_local, self.dv), b, a
