"""Qwen2 / Qwen2.5: q/k/v projections with bias."""

from llamafactory_mca.models.bridge import ModelBridge, dense_table


class Qwen2Bridge(ModelBridge):
    """Qwen2 / Qwen2.5: the dense table with q/k/v biases."""

    model_types = ("qwen2",)
    table = dense_table(attn_bias=True)

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("qwen2 with use_sliding_window=True is not supported by the Megatron bridge yet")

    def add_qkv_bias(self, hf_config) -> bool:
        return True
