"""GLM-4-MoE (GLM-4.5, GLM-4.5-Air, GLM-4.6): attention with q/k/v bias, optional per-head q/k RMSNorm and partial
rotary embedding; the first `first_k_dense_replace` layers dense, the others MoE with shared experts and a sigmoid
router (expert-choice bias `e_score_correction_bias`, group-limited top-k, normalised and scaled weights)."""

from llamafactory_mca.models.bridge import ModelBridge, dense_table, moe_table
from llamafactory_mca.models.param_mapping import shared_expert_entries


class Glm4MoeBridge(ModelBridge):
    """GLM-4-MoE: the dense table (q/k/v bias, q/k norm) with router, experts and shared experts per MoE layer."""

    model_types = ("glm4_moe",)
    table = {
        **moe_table(dense_table(attn_bias=True, qk_norm=True), router="mlp.gate.weight",
                    gate="mlp.experts.{E}.gate_proj.weight", up="mlp.experts.{E}.up_proj.weight",
                    down="mlp.experts.{E}.down_proj.weight", keep_dense_mlp=True),
        **shared_expert_entries("mlp.shared_experts", expert_bias="mlp.gate.e_score_correction_bias"),
    }

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if not getattr(hf_config, "norm_topk_prob", True):
            raise ValueError("glm4_moe with norm_topk_prob=false is not supported by the Megatron bridge "
                             "(megatron's sigmoid router always normalises the top-k weights). Fix: set "
                             "norm_topk_prob: true in config.json (the released models do)")
        groups, kept = self.moe_router_groups(hf_config)
        if groups and groups > 1 and hf_config.num_experts_per_tok // kept != 2:
            raise ValueError(
                f"glm4_moe: n_group={groups} with topk_group={kept} and num_experts_per_tok="
                f"{hf_config.num_experts_per_tok}: Hugging Face scores a group by its 2 best experts, megatron by "
                "num_experts_per_tok // topk_group of them. Fix: use a config with num_experts_per_tok == "
                "2 * topk_group (as GLM-4.5 / DeepSeek-V3), or n_group: 1")
        if hf_config.first_k_dense_replace >= hf_config.num_hidden_layers:
            raise ValueError("glm4_moe: first_k_dense_replace leaves no MoE layer. Fix: use a smaller "
                             "first_k_dense_replace")

    def hf_router_aux_loss(self, hf_config) -> bool:
        # Glm4MoeForCausalLM computes no load-balancing loss and LLaMA-Factory's configure_moe sets none for it
        return False

    def qk_layernorm(self, hf_config) -> bool:
        return bool(getattr(hf_config, "use_qk_norm", False))

    def new_model(self, hf_config, config, mca_args, **kwargs):
        from megatron.core.models.gpt import GPTModel

        return GPTModel(config=config, rotary_percent=self.rotary_percent(hf_config), **kwargs)

    def num_experts(self, hf_config):
        return hf_config.n_routed_experts

    def moe_ffn_hidden_size(self, hf_config):
        return hf_config.moe_intermediate_size

    def moe_layer_freq(self, hf_config):
        k = hf_config.first_k_dense_replace
        return [0] * k + [1] * (hf_config.num_hidden_layers - k) if k else 1

    def moe_shared_expert_intermediate_size(self, hf_config):
        return hf_config.moe_intermediate_size * hf_config.n_shared_experts if hf_config.n_shared_experts else None

    def moe_router_score_function(self, hf_config) -> str:
        return "sigmoid"

    def moe_router_expert_bias(self, hf_config) -> bool:
        return True

    def moe_router_groups(self, hf_config):
        return getattr(hf_config, "n_group", None) or 1, getattr(hf_config, "topk_group", None) or 1

    def moe_router_topk_scaling_factor(self, hf_config):
        return float(getattr(hf_config, "routed_scaling_factor", 1.0))
