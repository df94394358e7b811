"""Mixtral: Llama attention (with Mistral's sliding window where the config sets one), sparse MoE with w1 (gate) /
w3 (up) / w2 (down) experts, softmax over the top-k."""

from llamafactory_mca.models.attention import sliding_window_overrides
from llamafactory_mca.models.bridge import ModelBridge, dense_table, moe_table


class MixtralBridge(ModelBridge):
    """Mixtral: the dense attention table with a router and w1/w3/w2 experts per layer."""

    model_types = ("mixtral",)
    table = moe_table(
        dense_table(attn_bias=False),
        router="block_sparse_moe.gate.weight",
        gate="block_sparse_moe.experts.{E}.w1.weight",
        up="block_sparse_moe.experts.{E}.w3.weight",
        down="block_sparse_moe.experts.{E}.w2.weight",
    )

    def add_qkv_bias(self, hf_config) -> bool:
        return False

    def config_overrides(self, hf_config) -> dict:
        return sliding_window_overrides(hf_config)

    def num_experts(self, hf_config):
        return hf_config.num_local_experts

    def moe_ffn_hidden_size(self, hf_config):
        return hf_config.intermediate_size

    def moe_router_pre_softmax(self, hf_config) -> bool:
        return False  # softmax over all, top-k, renormalise == softmax over the top-k logits
