"""DeepSeek-V3: multi-latent attention (megatron's MLASelfAttention), dense-first layers, MoE with shared experts.

Attention as transformers 5.x computes it: queries through `q_proj` (q_lora_rank None) or `q_a_proj` ->
`q_a_layernorm` -> `q_b_proj`; keys/values through `kv_a_proj_with_mqa` (latent + the shared rope key) ->
`kv_a_layernorm` -> `kv_b_proj`; nope/rope/value head sizes apart; rope on the `qk_rope_head_dim` channels with
`rope_interleave` (megatron's MLA de-interleaves the same way); softmax scale `qk_head_dim ** -0.5` times YaRN's
`mscale_all_dim` factor squared. The rotary frequencies and the cos/sin attention factor are Hugging Face's own
(`HFRotaryEmbedding`), so YaRN and linear scaling match exactly.

Multi-token prediction (MTP) layers are not part of the model: transformers' DeepseekV3ForCausalLM has none and
ignores their weights (`model.layers.61.*` of DeepSeek-V3), we do not load or train them, and the export writes the
model transformers loads (without MTP weights; `num_nextn_predict_layers` in config.json is kept as it was).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from llamafactory_mca.models.bridge import ModelBridge, dense_table
from llamafactory_mca.models.glm4_moe import Glm4MoeBridge
from llamafactory_mca.models.param_mapping import mla_table

ROPE_TYPES = ("default", "linear", "yarn")


class HFRotaryEmbedding(RotaryEmbedding):
    """megatron's RotaryEmbedding on Hugging Face's inverse frequencies; returns (emb, attention factor) as
    MLASelfAttention's YaRN path expects (the factor multiplies cos and sin, as transformers does)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, cp_group: Any = None):
        super().__init__(kv_channels=2 * inv_freq.numel(), rotary_percent=1.0, use_cpu_initialization=True,
                         cp_group=cp_group)
        self.inv_freq = inv_freq.float()
        self.attention_scaling = float(attention_scaling)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None):
        """(rotary embedding [s, 1, 1, dim], attention factor)."""
        return super().forward(max_seq_len, offset, packed_seq, cp_group), self.attention_scaling


def hf_rotary(hf_config) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention factor) of transformers' DeepSeek-V3 rotary embedding for `hf_config`."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    rotary = DeepseekV3RotaryEmbedding(hf_config, device="cpu")
    return rotary.inv_freq.detach().clone(), float(rotary.attention_scaling)


class MlaBridge(ModelBridge):
    """The multi-latent attention hooks of DeepSeek-style families (attention only: the MLP is the family's)."""

    def check_config(self, hf_config) -> None:
        """Refuse what MLA does not map (replaces ModelBridge's rope check: MLA takes YaRN too)."""
        rope = self.rope_parameters(hf_config)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        name = hf_config.model_type
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{name} with rope_type {rope_type!r} is not supported by the Megatron bridge yet "
                             f"(supported: {', '.join(ROPE_TYPES)})")
        if not getattr(hf_config, "rope_interleave", True):
            raise ValueError(f"{name} with rope_interleave=False is not supported by the Megatron bridge yet "
                             "(megatron's MLA applies rope to interleaved channels)")
        if getattr(hf_config, "attention_bias", False):
            raise ValueError(f"{name} with attention_bias=True is not supported by the Megatron bridge yet")

    def head_dim(self, hf_config) -> int:
        return hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim

    def qk_layernorm(self, hf_config) -> bool:
        return True  # q_a_layernorm / kv_a_layernorm

    def add_qkv_bias(self, hf_config) -> bool:
        return False

    def config_overrides(self, hf_config) -> dict:
        return mla_config_fields(self, hf_config)

    def set_hf_rope(self, model, hf_config, rope: dict) -> None:
        set_mla_rope(model, hf_config)
        use_sequence_local_kv_down_projection(model)


class DeepseekV3Bridge(Glm4MoeBridge, MlaBridge):
    """DeepSeek-V3: MLA attention; dense layers before `first_k_dense_replace`, then MoE layers with shared experts
    and GLM-4-MoE's routing (sigmoid scores, `e_score_correction_bias`, group-limited top-k, scaled weights)."""

    model_types = ("deepseek_v3",)
    table = {
        **mla_table(dense_table(attn_bias=False)),
        **{k: v for k, v in Glm4MoeBridge.table.items() if ".self_attention." not in k},
    }
    qk_layernorm = MlaBridge.qk_layernorm  # not GLM-4's use_qk_norm

    def check_config(self, hf_config) -> None:
        if self.moe_layers(hf_config):
            super().check_config(hf_config)  # GLM-4-MoE's routing checks, then MlaBridge's
        else:
            MlaBridge.check_config(self, hf_config)  # every layer dense (first_k_dense_replace >= layers)

    def moe_layers(self, hf_config) -> list[int]:
        """Indices of the MoE layers (`first_k_dense_replace` and after)."""
        first = getattr(hf_config, "first_k_dense_replace", 0) or 0
        return list(range(first, hf_config.num_hidden_layers))

    def num_experts(self, hf_config) -> Optional[int]:
        return hf_config.n_routed_experts if self.moe_layers(hf_config) else None

    def new_model(self, hf_config, config, mca_args, **kwargs):
        return ModelBridge.new_model(self, hf_config, config, mca_args, **kwargs)  # MLA builds its own rope


def mla_config_fields(bridge: ModelBridge, hf_config) -> dict:
    """MLATransformerConfig fields of a DeepSeek-style attention config (the rope frequencies themselves are set by
    `set_mla_rope`; `rotary_scaling_factor` / `mscale_all_dim` give megatron the softmax scale)."""
    rope = bridge.rope_parameters(hf_config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return dict(
        multi_latent_attention=True,
        num_query_groups=hf_config.num_attention_heads,
        q_lora_rank=hf_config.q_lora_rank,
        kv_lora_rank=hf_config.kv_lora_rank,
        qk_head_dim=hf_config.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf_config.qk_rope_head_dim,
        v_head_dim=hf_config.v_head_dim,
        rope_type="yarn",  # the path that takes (emb, attention factor) from the rotary module
        rotary_base=bridge.rope_theta(hf_config),
        rotary_scaling_factor=float(rope.get("factor", 1.0)) if rope_type != "default" else 1.0,
        mscale=float(rope.get("mscale", 1.0) or 1.0),
        mscale_all_dim=float(rope.get("mscale_all_dim", 0.0) or 0.0),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings",
                                                      hf_config.max_position_embeddings)),
        rotary_interleaved=False,
    )


def set_mla_rope(model: torch.nn.Module, hf_config) -> None:
    """Give every MLA layer of `model` one `HFRotaryEmbedding` (Hugging Face's frequencies and attention factor)."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return
    inv_freq, scaling = hf_rotary(hf_config)
    shared = None
    for layer in decoder.layers:
        attention = layer.self_attention
        if shared is None:
            shared = HFRotaryEmbedding(inv_freq, scaling, cp_group=attention.rotary_pos_emb.cp_group)
        attention.rotary_pos_emb = shared


def sequence_local_down_projection(module: torch.nn.Module, input_: torch.Tensor):
    """`linear_kv_down_proj` (a ColumnParallelLinear) computed on this rank's sequence chunk with the full weight.

    megatron's MLA with a column-parallel down projection all-gathers its output over the TP ranks and takes the
    shared rope key (`k_pos_emb`) from it; that gather's backward keeps only this rank's columns of the gradient, yet
    every rank's heads use the rope key: the other ranks' contributions to it are lost (training drifts from the HF
    path at TP=2 + SP from the first update on). With the full output on the local sequence chunk MLA takes its
    other branch instead: the rope key is all-gathered over the sequence, whose backward reduce-scatters (sums) the
    heads' contributions. The weight stays column-split: it is gathered for the product, and its gradient
    (partial over the sequence on each rank) is reduce-scattered back onto the shards."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    weight = gather_from_sequence_parallel_region(module.weight, tensor_parallel_output_grad=True,
                                                  group=module.tp_group)
    return torch.nn.functional.linear(input_, weight), None


def use_sequence_local_kv_down_projection(model: torch.nn.Module) -> None:
    """Every MLA layer of `model` at TP > 1 with sequence parallelism computes `linear_kv_down_proj` as
    `sequence_local_down_projection` does (the recipe check requires sequence parallelism with TP for MLA)."""
    import functools

    from megatron.core.utils import get_pg_size

    decoder = getattr(model, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        down = getattr(layer.self_attention, "linear_kv_down_proj", None)
        if down is None or get_pg_size(down.tp_group) <= 1 or not down.config.sequence_parallel:
            continue
        down.forward = functools.partial(sequence_local_down_projection, down)
