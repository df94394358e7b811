"""Multimodal models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) in training: mRoPE positions for the batches and
LLaMA-Factory's freeze rules.

* Positions: LLaMA-Factory's collator computes the [3, b, s] mRoPE positions only when it holds the Hugging Face
  model (`model.get_rope_index`); ours has none, so `rope_fn` gives the same function on the HF config
  (`get_rope_index` of models.qwen2_vl / qwen2_5_vl / qwen3_vl, Hugging Face's own code; Qwen3.5 uses Qwen3-VL's),
  applied per collated batch with its attention mask; Qwen2.5-VL videos take the collator's `second_per_grid_ts` (Qwen3-VL marks its
  video frames with timestamp text tokens instead).
* neat_packing: each packed sample's positions are computed as if it were unpacked and the rows concatenated
  (`packed_rope_positions`), as LLaMA-Factory's collator does per sub-sequence
  (`_compute_rope_position_ids_with_packing`); the samples' images / videos stay in order.
* Freezing (finetuning_type: full): LLaMA-Factory freezes the vision tower and the projector by default
  (`freeze_vision_tower`, `freeze_multi_modal_projector` true; `freeze_language_model` false) with substring
  rules on transformers' parameter names (`get_forbidden_modules`). The same rules run here on the Hugging Face
  names of each megatron parameter, in transformers' internal layout (`model.visual.*`,
  `model.language_model.*`, `lm_head.*`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch

from llamafactory_mca.models.model_state import is_multimodal, model_state
from llamafactory_mca.models.packing import segment_spans


def _qwen2_vl_rope(hf_config: Any, input_ids, image_grid_thw, video_grid_thw, attention_mask,
                   second_per_grid_ts=None):
    from llamafactory_mca.models.qwen2_vl import get_rope_index

    return get_rope_index(hf_config, input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                          attention_mask=attention_mask)


def _qwen2_5_vl_rope(hf_config: Any, input_ids, image_grid_thw, video_grid_thw, attention_mask,
                     second_per_grid_ts=None):
    from llamafactory_mca.models.qwen2_5_vl import get_rope_index

    return get_rope_index(hf_config, input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                          attention_mask=attention_mask, second_per_grid_ts=second_per_grid_ts)


def _qwen3_vl_rope(hf_config: Any, input_ids, image_grid_thw, video_grid_thw, attention_mask,
                   second_per_grid_ts=None):
    from llamafactory_mca.models.qwen3_vl import get_rope_index

    return get_rope_index(hf_config, input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                          attention_mask=attention_mask)


_ROPE_FNS = {"qwen2_vl": _qwen2_vl_rope, "qwen2_5_vl": _qwen2_5_vl_rope, "qwen3_vl": _qwen3_vl_rope,
             "qwen3_vl_moe": _qwen3_vl_rope, "qwen3_5": _qwen3_vl_rope, "qwen3_5_moe": _qwen3_vl_rope}


def rope_fn(hf_config: Any) -> Optional[Callable]:
    """(input_ids, image_grid_thw, video_grid_thw, attention_mask, second_per_grid_ts=None) -> [3, b, s] positions
    (Hugging Face's get_rope_index of the family), or None (text models). `second_per_grid_ts`: the collator's
    seconds per temporal grid step of each video (Qwen2.5-VL; the other families ignore it)."""
    found = _ROPE_FNS.get(getattr(hf_config, "model_type", None))
    return partial(found, hf_config) if found is not None else None


def packed_rope_positions(rope: Callable, input_ids: torch.Tensor, segment_ids: torch.Tensor,
                          image_grid_thw: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                          second_per_grid_ts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[3, b, s] mRoPE positions of neat_packing rows: every sample (segment id k > 0 of `segment_ids` [b, s])
    numbered as if it were alone, padding (segment 0) 0, 1, 2 ... as LLaMA-Factory's padding sub-sequence.

    The samples become the rows of one right-padded batch, in order, for a single `rope` call (`rope_fn`):
    Hugging Face's get_rope_index takes the image / video grids (and `second_per_grid_ts`) in order over its
    rows, which is the order of the samples' images and videos in the packed rows."""
    b, s = input_ids.shape
    spans = segment_spans(segment_ids)
    positions = torch.arange(s, dtype=torch.long).expand(3, b, s).clone()
    for row in range(b):
        pad = segment_ids[row] == 0
        positions[:, row, pad] = torch.arange(int(pad.sum())).expand(3, -1)
    if not spans:
        return positions
    longest = max(e - a for _, a, e in spans)
    ids = torch.zeros(len(spans), longest, dtype=input_ids.dtype)
    mask = torch.zeros(len(spans), longest, dtype=torch.long)
    for i, (row, a, e) in enumerate(spans):
        ids[i, : e - a] = input_ids[row, a:e]
        mask[i, : e - a] = 1
    per_sample = rope(ids, image_grid_thw, video_grid_thw, mask, second_per_grid_ts=second_per_grid_ts).long()
    for i, (row, a, e) in enumerate(spans):
        positions[:, row, a:e] = per_sample[:, i, : e - a]
    return positions


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


__all__ = ["apply_full_tuning_freeze", "internal_hf_name", "is_multimodal", "packed_rope_positions", "rope_fn"]
