"""Facts about model families that need no torch (the launching process reads them before torchrun starts)."""

from __future__ import annotations

from typing import Any

# the multimodal (vision-language) families: the one list (args.py, model_state.py, the VL bridges)
MULTIMODAL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def is_multimodal(hf_config: Any) -> bool:
    """True for a vision-language family (`MULTIMODAL_MODEL_TYPES`)."""
    return getattr(hf_config, "model_type", None) in MULTIMODAL_MODEL_TYPES
