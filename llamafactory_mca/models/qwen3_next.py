"""Qwen3-Next (Qwen3-Next-80B-A3B): a hybrid decoder. Each layer's token mixer is either a gated delta-net
(`layer_types` "linear_attention": `models/gated_delta_net.GatedDeltaNet`, HF `linear_attn`) or gated full
attention ("full_attention": HF `q_proj` holds [q_h; gate_h] per head, the attention output is scaled by
sigmoid(gate) before `o_proj`; q/k RMSNorm per head; rotary embedding on `partial_rotary_factor` of each head's
channels). The MLP is Qwen2-MoE's (router, experts, a shared expert scaled by a sigmoid gate; dense layers where
`mlp_only_layers` / `decoder_sparse_step` say so, or everywhere when `num_experts` is 0). Every RMSNorm
(input, post-attention, final, q/k) is zero-centred: x / rms(x) * (1 + w).

The megatron model is a GPTModel whose block spec lists one layer spec per layer of each pipeline chunk
(`hybrid_block_spec`): GatedDeltaNet as `self_attention` where the layer is linear attention, megatron's
SelfAttention with `attention_output_gate` elsewhere, `ZeroCenteredRMSNorm` for every norm. Refused before the
model is built: Transformer Engine's spec, TP or TP x CP sizes that do not divide `linear_num_key_heads`
(recipe_checks.check_linear_attention), attention biases.

Qwen3.5 (models/qwen3_5.py) runs the same hybrid decoder: the table, spec, config checks and overrides it shares
are the functions here (`hybrid_attention_table`, `hybrid_model_spec`, `check_hybrid_config`,
`linear_attention_overrides`, `checked_linear_attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from llamafactory_mca.models.bridge import COLUMN, REPL, ROW, Table, dense_table, moe_table
from llamafactory_mca.models.param_mapping import CONV3, GQKV, shared_expert_entries
from llamafactory_mca.models.qwen2_moe import Qwen2MoeBridge

LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"


def qwen3_next_table() -> Table:
    """Qwen2-MoE's table without attention biases, with q/k norms, the gated q_proj (GQKV) and the gated delta-net
    parameters of the linear-attention layers (`GatedDeltaNet` keeps the Hugging Face names)."""
    table = {
        **moe_table(dense_table(attn_bias=False, qk_norm=True), router="mlp.gate.weight",
                    gate="mlp.experts.{E}.gate_proj.weight", up="mlp.experts.{E}.up_proj.weight",
                    down="mlp.experts.{E}.down_proj.weight", keep_dense_mlp=True),
        **shared_expert_entries("mlp.shared_expert", gate="mlp.shared_expert_gate.weight"),
    }
    return hybrid_attention_table(table, (("in_proj_qkvz.weight", COLUMN), ("in_proj_ba.weight", COLUMN)))


def hybrid_attention_table(table: Table, projections: tuple) -> Table:
    """`table` (a Llama-style table with q/k norms) with the gated q_proj (GQKV) and the gated delta-net entries of
    the linear-attention layers: `projections` ((name, kind) of the input projections, which differ per family),
    then the convolution, the per-head gate parameters, the output norm and projection (HF names kept)."""
    table = dict(table)
    qkv = "decoder.layers.{L}.self_attention.linear_qkv.weight"
    table[qkv] = (table[qkv][0], GQKV)
    a, p = "decoder.layers.{L}.self_attention.", "model.layers.{L}.linear_attn."
    for name, kind in projections + (("conv1d.weight", CONV3), ("dt_bias", COLUMN), ("A_log", COLUMN),
                                     ("norm.weight", REPL), ("out_proj.weight", ROW)):
        table[a + name] = (p + name, kind)
    return table


def layer_types(hf_config: Any) -> list[str]:
    """"linear_attention" or "full_attention" per decoder layer (HF `layer_types`, or every
    `full_attention_interval`-th layer full attention where an older config has no list)."""
    types = getattr(hf_config, "layer_types", None)
    if types:
        return list(types)
    interval = int(getattr(hf_config, "full_attention_interval", 4) or 4)
    return [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(hf_config.num_hidden_layers)]


def zero_centered_norms(spec: Any) -> Any:
    """A copy of a layer spec (ModuleSpec of a TransformerLayer) with every norm module (input, pre-MLP, q/k) the
    zero-centred RMSNorm."""
    from llamafactory_mca.models.gated_delta_net import ZeroCenteredRMSNorm
    from llamafactory_mca.models.spec import FusedRMSNorm

    def swap(node: Any) -> Any:
        if node is FusedRMSNorm:
            return ZeroCenteredRMSNorm
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return dataclasses.replace(node, **{f.name: swap(getattr(node, f.name)) for f in dataclasses.fields(node)
                                                if f.init})
        return node

    return swap(spec)


def with_gated_delta_net(spec: Any, mixer: Any = None) -> Any:
    """A copy of a layer spec with `mixer` (default `GatedDeltaNet`) as the token mixer (`self_attention`)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from llamafactory_mca.models.gated_delta_net import GatedDeltaNet

    module = mixer or GatedDeltaNet
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                    self_attention=ModuleSpec(module=module)))


def hybrid_block_spec(block: Any, types: list[str], offset: int, mixer: Any = None) -> Any:
    """The block spec of one pipeline chunk whose first layer is global layer `offset`, with the layer specs of its
    layers (`types`: the model's layer types): zero-centred norms everywhere, `mixer` (default `GatedDeltaNet`)
    for the linear-attention layers."""
    from llamafactory_mca.models.gated_delta_net import ZeroCenteredRMSNorm

    specs = []
    for i, spec in enumerate(block.layer_specs):
        spec = zero_centered_norms(spec)
        specs.append(with_gated_delta_net(spec, mixer) if types[offset + i] == LINEAR_ATTENTION else spec)
    return dataclasses.replace(block, layer_specs=specs, layer_norm=ZeroCenteredRMSNorm)


def hybrid_model_spec(spec: Any, config: Any, text_config: Any, vp_stage: Optional[int] = None,
                      mixer: Any = None) -> Any:
    """`hybrid_block_spec` for the model chunk of `vp_stage` on this pipeline rank (its first global layer from
    megatron's layer offset)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return hybrid_block_spec(spec, layer_types(text_config), offset, mixer)


def check_hybrid_config(text_config: Any, model_type: str) -> None:
    """ValueError (naming the fix) for a hybrid text config the bridge cannot map: unknown or missing
    `layer_types`, attention biases, value heads not grouped under the key heads."""
    types = layer_types(text_config)
    unknown = sorted(set(types) - {LINEAR_ATTENTION, FULL_ATTENTION})
    if unknown or len(types) != text_config.num_hidden_layers:
        raise ValueError(f"{model_type}: layer_types {types} (want one of {LINEAR_ATTENTION!r} / {FULL_ATTENTION!r} "
                         "per layer). Fix: correct layer_types in config.json")
    if getattr(text_config, "attention_bias", False):
        raise ValueError(f"{model_type} with attention_bias=True is not supported by the Megatron bridge yet. Fix: "
                         "set attention_bias: false in config.json (the released models do)")
    if text_config.linear_num_value_heads % text_config.linear_num_key_heads:
        raise ValueError(f"{model_type}: linear_num_value_heads must be a multiple of linear_num_key_heads. Fix: "
                         "correct config.json")


def linear_attention_overrides(text_config: Any) -> dict:
    """TransformerConfig fields of the hybrid layers: the gated attention output and the delta-net shapes."""
    return dict(attention_output_gate=True, linear_conv_kernel_dim=text_config.linear_conv_kernel_dim,
                linear_key_head_dim=text_config.linear_key_head_dim,
                linear_value_head_dim=text_config.linear_value_head_dim,
                linear_num_key_heads=text_config.linear_num_key_heads,
                linear_num_value_heads=text_config.linear_num_value_heads)


def checked_linear_attention(text_config: Any, mca_args: Any) -> None:
    """The layout checks of the linear-attention layers (`recipe_checks.check_linear_attention`: no TE spec, no
    TP and TP x CP dividing the key heads) for `mca_args`."""
    from llamafactory_mca.models.spec import use_transformer_engine
    from llamafactory_mca.recipe_checks import check_linear_attention

    check_linear_attention(text_config.to_dict(), mca_args.tensor_model_parallel_size,
                           mca_args.context_parallel_size, use_transformer_engine(mca_args))


class Qwen3NextBridge(Qwen2MoeBridge):
    """Qwen3-Next: hybrid gated delta-net / gated attention layers on Qwen2-MoE's MLP (module docstring)."""

    model_types = ("qwen3_next",)
    table = qwen3_next_table()

    def check_config(self, hf_config) -> None:
        super(Qwen2MoeBridge, self).check_config(hf_config)
        check_hybrid_config(hf_config, "qwen3_next")

    def add_qkv_bias(self, hf_config) -> bool:
        return False

    def qk_layernorm(self, hf_config) -> bool:
        return True

    def num_experts(self, hf_config):
        return getattr(hf_config, "num_experts", 0) or None

    def config_overrides(self, hf_config) -> dict:
        return linear_attention_overrides(hf_config)

    def transformer_config(self, hf_config, mca_args, params_dtype: torch.dtype = torch.float32):
        """The TransformerConfig, after the layout checks of the linear-attention layers (no TE spec, no context
        parallelism, TP dividing the key heads)."""
        checked_linear_attention(hf_config, mca_args)
        return super().transformer_config(hf_config, mca_args, params_dtype)

    def new_model(self, hf_config, config, mca_args, **kwargs):
        from megatron.core.models.gpt import GPTModel

        kwargs["transformer_layer_spec"] = hybrid_model_spec(kwargs["transformer_layer_spec"], config, hf_config,
                                                             kwargs.get("vp_stage"))
        return GPTModel(config=config, rotary_percent=self.rotary_percent(hf_config), **kwargs)
