"""Hugging Face <-> megatron-core model bridges (one table per family) and the layer specs."""

from __future__ import annotations

from typing import Any


def get_bridge(hf_config: Any):
    """The bridge for `hf_config`, asked from every plugin (`mca_model_bridge`); ValueError if none has one."""
    from llamafactory_mca.plugins import flat, hook

    bridge = hook().mca_model_bridge(hf_config=hf_config)
    if bridge is None:
        supported = flat(hook().mca_supported_model_types())
        raise ValueError(
            f"model_type {getattr(hf_config, 'model_type', None)!r} is not supported by the Megatron backend "
            f"(supported: {', '.join(supported)}). Fix: use one of those models, run without USE_MCA, or install "
            "a llamafactory-mca plugin that adds this family."
        )
    return bridge


__all__ = ["get_bridge"]
