"""Built-in model families, one of `plugins.DEFAULT_PLUGINS`.

A third-party package adds a family the same way: a module with a `ModelBridge` subclass (a table) and
`@hookimpl` functions `mca_model_bridge(hf_config)` / `mca_supported_model_types()`, announced through the
`llamafactory_mca` entry-point group. Our `mca_model_bridge` is `trylast`: a third-party bridge for the same
`model_type` wins.
"""

from __future__ import annotations

from typing import Any, Optional

from llamafactory_mca.hookspecs import hookimpl

_FAMILIES = {
    "llama": ("llamafactory_mca.models.llama", "LlamaBridge"),
    "qwen2": ("llamafactory_mca.models.qwen2", "Qwen2Bridge"),
    "qwen3": ("llamafactory_mca.models.qwen3", "Qwen3Bridge"),
    "qwen3_moe": ("llamafactory_mca.models.qwen3_moe", "Qwen3MoeBridge"),
    "mixtral": ("llamafactory_mca.models.mixtral", "MixtralBridge"),
    "qwen2_moe": ("llamafactory_mca.models.qwen2_moe", "Qwen2MoeBridge"),
    "glm4_moe": ("llamafactory_mca.models.glm4_moe", "Glm4MoeBridge"),
    "mistral": ("llamafactory_mca.models.mistral", "MistralBridge"),
    "deepseek_v3": ("llamafactory_mca.models.deepseek_v3", "DeepseekV3Bridge"),
    "qwen2_vl": ("llamafactory_mca.models.qwen2_vl", "Qwen2VLBridge"),
    "qwen2_5_vl": ("llamafactory_mca.models.qwen2_5_vl", "Qwen2_5_VLBridge"),
    "qwen3_vl": ("llamafactory_mca.models.qwen3_vl", "Qwen3VLBridge"),
    "qwen3_vl_moe": ("llamafactory_mca.models.qwen3_vl_moe", "Qwen3VLMoeBridge"),
    "qwen3_next": ("llamafactory_mca.models.qwen3_next", "Qwen3NextBridge"),
    "qwen3_5": ("llamafactory_mca.models.qwen3_5", "Qwen3_5Bridge"),
    "qwen3_5_moe": ("llamafactory_mca.models.qwen3_5", "Qwen3_5MoeBridge"),
}


def bridge_for(model_type: str):
    """The built-in bridge for `model_type`, or None (imports megatron-core only when found)."""
    import importlib

    found = _FAMILIES.get(model_type)
    if found is None:
        return None
    module, cls = found
    return getattr(importlib.import_module(module), cls)()


@hookimpl(trylast=True)
def mca_model_bridge(hf_config: Any) -> Optional[Any]:
    """The built-in bridge for `hf_config.model_type`, asked after every third-party bridge."""
    return bridge_for(getattr(hf_config, "model_type", None))


@hookimpl
def mca_supported_model_types() -> list[str]:
    """The `model_type` names of the built-in families."""
    return list(_FAMILIES)
