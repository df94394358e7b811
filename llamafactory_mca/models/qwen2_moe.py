"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v bias), MoE layers with a softmax router and a
shared expert scaled by a sigmoid gate, dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from llamafactory_mca.models.bridge import ModelBridge, dense_table, moe_table
from llamafactory_mca.models.param_mapping import shared_expert_entries


def qwen2_moe_layer_freq(hf_config) -> list:
    """1 (MoE) or 0 (dense) per layer, as `Qwen2MoeDecoderLayer` decides: MoE unless the layer is in
    `mlp_only_layers` or (layer + 1) is not a multiple of `decoder_sparse_step`."""
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return [int(i not in dense and (i + 1) % step == 0) for i in range(hf_config.num_hidden_layers)]


class Qwen2MoeBridge(ModelBridge):
    """Qwen2-MoE: the dense table with q/k/v biases, a router, experts and a gated shared expert per MoE layer."""

    model_types = ("qwen2_moe",)
    table = {
        **moe_table(dense_table(attn_bias=True), router="mlp.gate.weight", gate="mlp.experts.{E}.gate_proj.weight",
                    up="mlp.experts.{E}.up_proj.weight", down="mlp.experts.{E}.down_proj.weight",
                    keep_dense_mlp=True),
        **shared_expert_entries("mlp.shared_expert", gate="mlp.shared_expert_gate.weight"),
    }

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("qwen2_moe with use_sliding_window=True is not supported by the Megatron bridge yet. "
                             "Fix: set use_sliding_window: false in config.json (the released models do)")
        if not getattr(hf_config, "num_experts", 0):
            raise ValueError("qwen2_moe with num_experts=0 is a dense model. Fix: load it as qwen2")
        if not any(qwen2_moe_layer_freq(hf_config)):
            raise ValueError("qwen2_moe: mlp_only_layers / decoder_sparse_step leave no MoE layer. Fix: load it as "
                             "a dense qwen2 model")

    def add_qkv_bias(self, hf_config) -> bool:
        return bool(getattr(hf_config, "qkv_bias", True))

    def num_experts(self, hf_config):
        return hf_config.num_experts

    def moe_ffn_hidden_size(self, hf_config):
        return hf_config.moe_intermediate_size

    def moe_router_pre_softmax(self, hf_config) -> bool:
        # norm_topk_prob false: softmax over all experts, then top-k (no renormalisation); true: softmax over the
        # top-k logits (== renormalised)
        return not getattr(hf_config, "norm_topk_prob", False)

    def moe_layer_freq(self, hf_config):
        pattern = qwen2_moe_layer_freq(hf_config)
        return 1 if all(pattern) else pattern

    def moe_shared_expert_intermediate_size(self, hf_config):
        return getattr(hf_config, "shared_expert_intermediate_size", None) or None

    def moe_shared_expert_gate(self, hf_config) -> bool:
        return True
