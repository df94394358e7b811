"""What llamafactory-mca keeps about one megatron model chunk: one typed object, `model.mca_state`.

`ModelBridge.build_model` attaches it; `unwrap_model` peels DDP / Float16Module wrappers, so `model_state(chunk)`
works on wrapped and bare chunks alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from llamafactory_mca.models.families import MULTIMODAL_MODEL_TYPES, is_multimodal  # noqa: F401 (re-exported)


@dataclass
class ModelState:
    """Per-chunk state: the Hugging Face config, the bridge that built the chunk, the padded vocab rows, and
    under LoRA the adapter state (`lora`; `adapter_only`: checkpoints hold the adapter tensors only)."""

    hf_config: Any
    bridge: Any
    padded_vocab_size: int
    lora: Any = None
    adapter_only: bool = False


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model chunk inside megatron's DDP / Float16Module / FSDP wrappers (every `.module` peeled off)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def model_state(model: torch.nn.Module) -> Optional[ModelState]:
    """The `ModelState` of a (wrapped or bare) model chunk, or None for a module not built by a bridge."""
    return getattr(unwrap_model(model), "mca_state", None)


def hf_config_of(model: torch.nn.Module) -> Any:
    """The Hugging Face config of a (wrapped or bare) model chunk built by a bridge."""
    return unwrap_model(model).mca_state.hf_config
