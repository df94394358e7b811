"""The model's Hugging Face config.json, read as plain JSON (no transformers), for checks made before anything
is built: layout against heads, layers and experts, and the model family."""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def read_local_config(model_path: Optional[str]) -> Optional[dict[str, Any]]:
    """The config.json of a local model directory as a dict; None for hub ids or paths without one."""
    if not isinstance(model_path, str) or not model_path:
        return None
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # the model loader reports a broken config.json with its own message
    return config if isinstance(config, dict) else None


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (`text_config` of vision-language models, else the config itself)."""
    text = config.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" in text:
        return text
    return config


def num_experts(text: dict[str, Any]) -> int:
    """Routed experts per MoE layer (0 for dense models), under the names the HF families use."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def model_type(model_path: Optional[str]) -> Optional[str]:
    """`model_type` of a local model directory's config.json, or None."""
    config = read_local_config(model_path)
    return config.get("model_type") if config else None
