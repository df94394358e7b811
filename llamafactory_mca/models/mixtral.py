"""Mixtral: Llama attention, sparse MoE with w1 (gate) / w3 (up) / w2 (down) experts, softmax over the top-k."""

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

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if getattr(hf_config, "sliding_window", None):
            raise ValueError("mixtral with sliding_window is not supported by the Megatron bridge yet")

    def add_qkv_bias(self, hf_config) -> bool:
        return False

    def num_experts(self, hf_config):
        return hf_config.num_local_experts

    def moe_ffn_hidden_size(self, hf_config):
        return hf_config.intermediate_size

    def moe_router_pre_softmax(self, hf_config) -> bool:
        return False  # softmax over all, top-k, renormalise == softmax over the top-k logits
