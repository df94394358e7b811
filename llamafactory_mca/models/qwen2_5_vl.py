"""Qwen2.5-VL: the Qwen2-VL design (models/qwen2_vl.py) with Qwen2.5-VL's vision tower.

* The vision tower is Hugging Face's own `Qwen2_5_VisionTransformerPretrainedModel` (window attention with
  `fullatt_block_indexes`, RMSNorm, gated SiLU MLP, the patch merger and its window reordering all live inside
  it), on the first pipeline stage, replicated over TP; parameters keep their HF names under `visual.`.
* The language model is Qwen2's (q/k/v bias, no q/k norm) with 3-D mRoPE; embeddings tied or not per config.
* Checkpoint names, image/video merge, position_ids handling: as Qwen2-VL (the same GPTModel subclass and table).
* mRoPE positions: Hugging Face's `Qwen2_5_VLModel.get_rope_index`; videos take `second_per_grid_ts` (seconds per
  temporal grid step, scaled by `vision_config.tokens_per_second`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from llamafactory_mca.models.qwen2_vl import Qwen2VLBridge, hf_rope_index


class Qwen2_5_VLBridge(Qwen2VLBridge):
    """Qwen2.5-VL: the Qwen2-VL bridge with Qwen2.5-VL's vision tower."""

    model_types = ("qwen2_5_vl",)

    def vision_cls(self):
        """Hugging Face's Qwen2.5-VL vision tower class."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel


def get_rope_index(hf_config, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                   video_grid_thw: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                   second_per_grid_ts: Optional[torch.Tensor] = None,
                   mm_token_type_ids: Optional[torch.Tensor] = None) -> Any:
    """[3, b, s] mRoPE position ids exactly as Hugging Face computes them for Qwen2.5-VL (its own
    `get_rope_index`). `mm_token_type_ids` defaults to the placeholder tokens; `second_per_grid_ts` (one per
    video) defaults to HF's 1 second."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    return hf_rope_index(Qwen2_5_VLModel, hf_config, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                         second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask)
