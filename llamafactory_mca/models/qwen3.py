"""Qwen3 dense: RMSNorm on queries and keys (per head), no q/k/v bias."""

from llamafactory_mca.models.bridge import ModelBridge, dense_table


class Qwen3Bridge(ModelBridge):
    """Qwen3 dense: the dense table with q/k RMSNorm, no biases."""

    model_types = ("qwen3",)
    table = dense_table(attn_bias=False, qk_norm=True)

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if getattr(hf_config, "attention_bias", False):
            raise ValueError("qwen3 with attention_bias=True is not supported by the Megatron bridge yet")
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("qwen3 with use_sliding_window=True is not supported by the Megatron bridge yet")

    def qk_layernorm(self, hf_config) -> bool:
        return True

    def add_qkv_bias(self, hf_config) -> bool:
        return False
