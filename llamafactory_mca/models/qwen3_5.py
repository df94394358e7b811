"""Qwen3.5 (dense, `qwen3_5`) and Qwen3.5-MoE (`qwen3_5_moe`): vision-language models whose language model is
Qwen3-Next's hybrid decoder. What they take from where:

* Vision tower: Hugging Face's own `Qwen3_5VisionModel` (Qwen3-VL's tower without the DeepStack mergers: learned
  position embeddings interpolated per grid, the patch merger) on the first pipeline stage, as Qwen3-VL
  (`models/qwen3_vl.py`, whose model class runs with no DeepStack maps); placeholder tokens take its outputs.
* Positions: Qwen3-VL's interleaved mRoPE (`mrope_section`, e.g. [11, 11, 10]) on the `partial_rotary_factor`
  share of each head's channels (0.25 in the released models: 64 of 256), positions from Hugging Face's
  Qwen3-VL `get_rope_index` (videos: one grid per frame, timestamps as text tokens).
* Decoder: Qwen3-Next's hybrid layers (`layer_types`: gated delta-net linear attention, gated full attention with
  q/k norm; zero-centred (1 + w) RMSNorms everywhere; `models/qwen3_next.py`), except that the delta-net's input
  projections are separate tensors (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`:
  `gated_delta_net.SplitGatedDeltaNet`) where Qwen3-Next fuses them per key head.
* MLP: a dense SwiGLU (`qwen3_5`); `qwen3_5_moe`: a MoE block in every layer, Qwen3-Next's (softmax router whose
  top-k weights are always renormalised, a shared expert scaled by a sigmoid gate), its routed experts stored
  fused (`mlp.experts.gate_up_proj` [E, 2F, H] = (gate_e ; up_e), `mlp.experts.down_proj` [E, H, F]: the layout
  transformers keeps in memory, which it loads without conversion), read per expert by Qwen3-VL-MoE's
  `FusedExpertReader` (either orientation) and written back fused in that same layout.
* Config nesting: `text_config` (the hybrid decoder's fields, `layer_types`, `rope_parameters` with
  `mrope_section` and `partial_rotary_factor`) and `vision_config`; `tie_word_embeddings` at either level.
* Checkpoint names: transformers' layout (`model.language_model.*`, `model.visual.*`, `lm_head.*`); the released
  checkpoints' multi-token-prediction weights (`mtp.*`) are neither loaded nor exported (transformers ignores
  them too).

Packing (neat_packing) and context parallelism run as for Qwen3-Next's delta-net layers (per-sample restarts, the
CP head exchange) and Qwen3-VL's vision path (tests/test_vl_packing_cp.py). Refused as for Qwen3-Next (before
launch, naming key and fix): the TE layer spec, TP or TP x CP sizes not dividing `linear_num_key_heads`, attention
biases; LoRA as for every vision-language family (full fine-tuning only).
"""

from __future__ import annotations

from typing import Optional

import torch

from llamafactory_mca.models.bridge import COLUMN, dense_table, moe_table
from llamafactory_mca.models.param_mapping import CONV3, shared_expert_entries
from llamafactory_mca.models.qwen3_next import (
    check_hybrid_config,
    checked_linear_attention,
    hybrid_attention_table,
    hybrid_model_spec,
    linear_attention_overrides,
)
from llamafactory_mca.models.qwen3_vl import Qwen3VLBridge, internal_layout, qwen3_vl_model_class
from llamafactory_mca.models.qwen3_vl_moe import Qwen3VLMoeBridge

DEFAULT_MROPE_SECTION = (11, 11, 10)  # transformers' Qwen3_5TextRotaryEmbedding without rope mrope_section
SPLIT_PROJECTIONS = (("in_proj_qkv.weight", CONV3), ("in_proj_z.weight", COLUMN), ("in_proj_b.weight", COLUMN),
                     ("in_proj_a.weight", COLUMN))


def qwen3_5_table(moe: bool = False):
    """The text table (Hugging Face names relative to the text model, `model.layers.*`): q/k norms, the gated
    q_proj, Qwen3.5's delta-net projections; a dense MLP or (`moe`) router, per-expert names (views of the fused
    tensors, `FusedExpertReader`) and the gated shared expert."""
    base = dense_table(attn_bias=False, qk_norm=True)
    if moe:
        base = {**moe_table(base, router="mlp.gate.weight", gate="mlp.experts.{E}.gate_proj.weight",
                            up="mlp.experts.{E}.up_proj.weight", down="mlp.experts.{E}.down_proj.weight"),
                **shared_expert_entries("mlp.shared_expert", gate="mlp.shared_expert_gate.weight")}
    return hybrid_attention_table(base, SPLIT_PROJECTIONS)


class Qwen3_5Bridge(Qwen3VLBridge):
    """Qwen3.5 (dense): Qwen3-VL's vision tower and mRoPE without DeepStack, Qwen3-Next's hybrid decoder with
    Qwen3.5's delta-net projections (module docstring)."""

    model_types = ("qwen3_5",)
    table = internal_layout(qwen3_5_table())

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        check_hybrid_config(self.text_config(hf_config), hf_config.model_type)

    def mrope_section(self, hf_config) -> list:
        """The config's mRoPE sections, else transformers' default for Qwen3.5 (`Qwen3_5TextRotaryEmbedding`)."""
        return super().mrope_section(hf_config) or list(DEFAULT_MROPE_SECTION)

    def rotary_percent(self, hf_config) -> float:
        return super().rotary_percent(self.text_config(hf_config))

    def config_overrides(self, hf_config) -> dict:
        return {**super().config_overrides(hf_config), **linear_attention_overrides(self.text_config(hf_config))}

    def transformer_config(self, hf_config, mca_args, params_dtype: torch.dtype = torch.float32):
        """The text model's TransformerConfig, after the layout checks of the linear-attention layers."""
        checked_linear_attention(self.text_config(hf_config), mca_args)
        return super().transformer_config(hf_config, mca_args, params_dtype)

    def new_model(self, hf_config, config, mca_args, **kwargs):
        from llamafactory_mca.models.gated_delta_net import SplitGatedDeltaNet

        text = self.text_config(hf_config)
        kwargs["position_embedding_type"] = "mrope"
        kwargs["max_sequence_length"] = getattr(text, "max_position_embeddings", 4096)
        kwargs["transformer_layer_spec"] = hybrid_model_spec(kwargs["transformer_layer_spec"], config, text,
                                                             kwargs.get("vp_stage"), SplitGatedDeltaNet)
        return qwen3_vl_model_class()(config=config, hf_config=hf_config, vision_cls=self.vision_cls(),
                                      rotary_percent=self.rotary_percent(hf_config), **kwargs)

    def vision_cls(self):
        """Hugging Face's Qwen3.5 vision tower (Qwen3-VL's without DeepStack)."""
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

        return Qwen3_5VisionModel


class Qwen3_5MoeBridge(Qwen3_5Bridge, Qwen3VLMoeBridge):
    """Qwen3.5-MoE: Qwen3.5 with Qwen3-Next's MoE block in every layer; Qwen3-VL-MoE's per-expert view of the
    fused expert tensors and its MoE hooks (text config), written back in transformers' in-memory layout (module
    docstring)."""

    model_types = ("qwen3_5_moe",)
    table = internal_layout(qwen3_5_table(moe=True))
    expert_layout = "memory"

    def moe_shared_expert_intermediate_size(self, hf_config) -> Optional[int]:
        return self.text_config(hf_config).shared_expert_intermediate_size or None

    def moe_shared_expert_gate(self, hf_config) -> bool:
        return True

    def vision_cls(self):
        """Hugging Face's Qwen3.5-MoE vision tower."""
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel

        return Qwen3_5MoeVisionModel
