"""Mistral: Llama attention with grouped key/value heads and, where the config sets `sliding_window`, a sliding
attention window (our SDPA attention's band mask, `models/attention.py`)."""

from llamafactory_mca.models.attention import sliding_window_overrides
from llamafactory_mca.models.bridge import ModelBridge, dense_table


class MistralBridge(ModelBridge):
    """Mistral: the dense table without biases; `sliding_window` becomes megatron's `window_size`."""

    model_types = ("mistral",)
    table = dense_table(attn_bias=False)

    def add_qkv_bias(self, hf_config) -> bool:
        return False

    def config_overrides(self, hf_config) -> dict:
        return sliding_window_overrides(hf_config)
