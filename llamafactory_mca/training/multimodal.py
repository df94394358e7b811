"""Multimodal models (Qwen2-VL, Qwen2.5-VL) in training: mRoPE positions for the batches and LLaMA-Factory's
freeze rules.

* Positions: LLaMA-Factory's collator computes the [3, b, s] mRoPE positions only when it holds the Hugging Face
  model (`model.get_rope_index`); ours has none, so `rope_fn` gives the same function on the HF config
  (`models.qwen2_vl.get_rope_index` / `models.qwen2_5_vl.get_rope_index`, Hugging Face's own code), applied per
  collated batch with its attention mask. Qwen2.5-VL videos would need the collator's `second_per_grid_ts`
  (not passed yet): refused.
* Freezing (finetuning_type: full): LLaMA-Factory freezes the vision tower and the projector by default
  (`freeze_vision_tower`, `freeze_multi_modal_projector` true; `freeze_language_model` false) with substring
  rules on transformers' parameter names (`get_forbidden_modules`). The same rules run here on the Hugging Face
  names of each megatron parameter, in transformers' internal layout (`model.visual.*`,
  `model.language_model.*`, `lm_head.*`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

from llamafactory_mca.models.model_state import is_multimodal, model_state


def _qwen2_vl_rope(hf_config: Any, input_ids, image_grid_thw, video_grid_thw, attention_mask):
    from llamafactory_mca.models.qwen2_vl import get_rope_index

    return get_rope_index(hf_config, input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                          attention_mask=attention_mask)


def _qwen2_5_vl_rope(hf_config: Any, input_ids, image_grid_thw, video_grid_thw, attention_mask):
    from llamafactory_mca.models.qwen2_5_vl import get_rope_index

    if video_grid_thw is not None:  # temporal positions need the collator's second_per_grid_ts, not passed here
        raise NotImplementedError("qwen2_5_vl videos are not supported by the Megatron backend's training path yet "
                                  "(mRoPE needs second_per_grid_ts); train on images")
    return get_rope_index(hf_config, input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)


def rope_fn(hf_config: Any) -> Optional[Callable]:
    """(input_ids, image_grid_thw, video_grid_thw, attention_mask) -> [3, b, s] positions, or None (text models)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "qwen2_vl":
        return partial(_qwen2_vl_rope, hf_config)
    if model_type == "qwen2_5_vl":
        return partial(_qwen2_5_vl_rope, hf_config)
    return None


def internal_hf_name(name: str) -> str:
    """A checkpoint name as Hugging Face writes it -> transformers' module path (what LLaMA-Factory matches)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith("model.visual.") \
            and not name.startswith("model.language_model."):
        return "model.language_model." + name[len("model."):]
    return name


def apply_full_tuning_freeze(bridge: Any, models: list, finetuning_args: Any) -> list[str]:
    """LLaMA-Factory's `_setup_full_tuning` freezing on the megatron model; returns the frozen module keys."""
    from llamafactory_mca.training.finetune import param_hf_names

    state = model_state(models[0])
    hf_config = state.hf_config if state is not None else None
    if hf_config is None or not is_multimodal(hf_config):
        return []
    from llamafactory.model.model_utils.visual import get_forbidden_modules

    forbidden = sorted(get_forbidden_modules(hf_config, finetuning_args))
    if not forbidden:
        return []
    for _name, param, hf_names in param_hf_names(bridge, models):
        if any(key in internal_hf_name(h) for h in hf_names for key in forbidden):
            param.requires_grad_(False)
    return forbidden


__all__ = ["apply_full_tuning_freeze", "internal_hf_name", "is_multimodal", "rope_fn"]
