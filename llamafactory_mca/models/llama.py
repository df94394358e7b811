"""Llama (and Llama-shaped) models."""

from llamafactory_mca.models.bridge import ModelBridge, dense_table


class LlamaBridge(ModelBridge):
    """Llama: the dense table without biases."""

    model_types = ("llama",)
    table = dense_table(attn_bias=False)

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("llama with mlp_bias=True is not supported by the Megatron bridge yet")

    def add_qkv_bias(self, hf_config) -> bool:
        if getattr(hf_config, "attention_bias", False):
            raise ValueError("llama with attention_bias=True (o_proj bias) is not supported by the Megatron bridge yet")
        return False
