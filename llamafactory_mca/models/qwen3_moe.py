"""Qwen3-MoE: Qwen3 attention, every layer a sparse MoE (softmax router, top-k, optional renormalisation)."""

from llamafactory_mca.models.bridge import dense_table, moe_table
from llamafactory_mca.models.qwen3 import Qwen3Bridge


class Qwen3MoeBridge(Qwen3Bridge):
    """Qwen3-MoE: Qwen3 attention with a router and gate/up/down experts in every layer."""

    model_types = ("qwen3_moe",)
    table = moe_table(
        dense_table(attn_bias=False, qk_norm=True),
        router="mlp.gate.weight",
        gate="mlp.experts.{E}.gate_proj.weight",
        up="mlp.experts.{E}.up_proj.weight",
        down="mlp.experts.{E}.down_proj.weight",
    )

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if getattr(hf_config, "mlp_only_layers", None):
            raise ValueError("qwen3_moe with mlp_only_layers is not supported by the Megatron bridge yet")
        if getattr(hf_config, "decoder_sparse_step", 1) != 1:
            raise ValueError("qwen3_moe with decoder_sparse_step != 1 is not supported by the Megatron bridge yet")

    def num_experts(self, hf_config):
        return hf_config.num_experts

    def moe_ffn_hidden_size(self, hf_config):
        return hf_config.moe_intermediate_size

    def moe_router_pre_softmax(self, hf_config) -> bool:
        # norm_topk_prob: softmax over all, top-k, renormalise == softmax over the top-k logits
        return not getattr(hf_config, "norm_topk_prob", True)
