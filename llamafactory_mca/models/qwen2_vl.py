"""Qwen2-VL: Hugging Face's vision tower + merger on the first pipeline stage, the Qwen2 language model as a
megatron GPTModel with 3-D multimodal RoPE (mRoPE).

* The vision tower is Hugging Face's own `Qwen2VisionTransformerPretrainedModel`, a submodule of the first
  stage's model chunk, replicated over tensor-parallel ranks (every TP rank computes the same features from the
  same pixels, so its gradients agree across TP without a reduction). Its parameters keep their HF names under
  `vision_model.` (table: everything under `visual.`, replicated).
* Image / video placeholder tokens (`image_token_id` / `video_token_id`) have their word embeddings replaced by
  the merger's outputs, in Hugging Face's order (masked_scatter over [batch, seq]), before the sequence-parallel
  scatter.
* position_ids: [3, batch, seq] as HF's `get_rope_index` (LLaMA-Factory's collator) gives them; a [4, b, s]
  tensor (text positions first, transformers 5 style) is accepted and its first row dropped; a plain [b, s]
  tensor is broadcast to 3 rows (text only).
* Checkpoint names: the layout Hugging Face writes (also transformers 5.6: `model.layers.*`, `model.embed_tokens`,
  `visual.*`, `lm_head.*`) on export; transformers' internal layout (`model.language_model.*`,
  `model.visual.*`) is read as well.
Context parallelism is not supported for this family yet (image tokens would have to be merged before the split);
`args.validate_megatron_args` refuses it.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import torch

from llamafactory_mca.models.bridge import REPL, ModelBridge, dense_table
from llamafactory_mca.models.safetensors_io import SafetensorsReader


class CompatReader(SafetensorsReader):
    """Reads the checkpoint names Hugging Face writes (`model.layers.*`, `visual.*`) from checkpoints in either
    layout (transformers' internal one is `model.language_model.*`, `model.visual.*`)."""

    def __init__(self, path: str):
        super().__init__(path)
        self._alias = {}
        for name in list(self.weight_map):
            if name.startswith("model.visual."):
                self._alias[name[len("model."):]] = name
            elif name.startswith("model.language_model."):
                self._alias["model." + name[len("model.language_model."):]] = name

    def resolve(self, name: str) -> str:
        """The stored name of `name`: itself if present, else its transformers-internal alias."""
        return name if name in self.weight_map else self._alias.get(name, name)


@functools.lru_cache(maxsize=None)
def vl_gpt_model_class():
    """The GPTModel subclass of the Qwen-VL families (built lazily: megatron is imported on first use).
    Qwen3-VL subclasses it (models/qwen3_vl.py)."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    class Qwen2VLGPTModel(GPTModel):
        """GPTModel whose first stage embeds images / videos with Hugging Face's Qwen2-VL vision tower."""

        def __init__(self, *args, hf_config=None, vision_cls=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.vision_model = None
            self.image_token_id = hf_config.image_token_id
            self.video_token_id = hf_config.video_token_id
            if self.pre_process:
                if vision_cls is None:  # Qwen2-VL's; Qwen2.5-VL passes its own (models/qwen2_5_vl.py)
                    from transformers.models.qwen2_vl.modeling_qwen2_vl import \
                        Qwen2VisionTransformerPretrainedModel as vision_cls

                self.vision_model = vision_cls._from_config(hf_config.vision_config, dtype=self.config.params_dtype)

        def vision_output(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Any:
            """The vision tower's output for `pixel_values` (an output object or a tensor, per family)."""
            dtype = next(self.vision_model.parameters()).dtype
            return self.vision_model(pixel_values.to(dtype), grid_thw=grid_thw)

        def word_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
            """[b, s, h] word embeddings, full over TP (no sequence-parallel scatter)."""
            word = self.embedding.word_embeddings
            reduce_scatter = word.reduce_scatter_embeddings
            word.reduce_scatter_embeddings = False
            try:
                return word(input_ids)
            finally:
                word.reduce_scatter_embeddings = reduce_scatter

        def to_decoder_layout(self, emb: torch.Tensor) -> torch.Tensor:
            """[b, s, h] -> [s, b, h], scattered over TP ranks under sequence parallelism."""
            emb = emb.transpose(0, 1).contiguous()
            if self.config.sequence_parallel:
                emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
            return emb

        def merge_vision(self, emb: torch.Tensor, input_ids: torch.Tensor, token: int,
                         feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(`emb` with the placeholder tokens `token` replaced by `feats` in HF's order, the placeholder mask)."""
            mask = input_ids == token
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"{int(mask.sum())} placeholder tokens {token} but {feats.shape[0]} vision features")
            return emb.masked_scatter(mask.unsqueeze(-1).expand_as(emb), feats.to(emb.dtype)), mask

        def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                  video_grid_thw=None) -> torch.Tensor:
            """[s, b, h] decoder input (sequence-parallel scattered when SP is on)."""
            emb = self.word_embeddings(input_ids)
            for values, grid, token in ((pixel_values, image_grid_thw, self.image_token_id),
                                        (pixel_values_videos, video_grid_thw, self.video_token_id)):
                if values is None:
                    continue
                out = self.vision_output(values, grid)
                emb, _ = self.merge_vision(emb, input_ids, token, getattr(out, "pooler_output", out))
            return self.to_decoder_layout(emb)

        @staticmethod
        def mrope_positions(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            """[3, b, s] mRoPE positions from [3, b, s], [4, b, s] (text row first) or [b, s] (text only)."""
            if position_ids is not None:
                if position_ids.dim() == 2:
                    position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
                elif position_ids.dim() == 3 and position_ids.shape[0] == 4:
                    position_ids = position_ids[1:]
            return position_ids

        def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                    **kwargs):
            position_ids = self.mrope_positions(position_ids)
            if self.pre_process and decoder_input is None:
                decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                           video_grid_thw)
            return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, **kwargs)

    return Qwen2VLGPTModel


class Qwen2VLBridge(ModelBridge):
    """Qwen2-VL: the Qwen2 language model (text config) with Hugging Face's vision tower (module docstring)."""

    model_types = ("qwen2_vl",)
    table = dense_table(attn_bias=True)

    # ------------------------------------------------------------------ config: the text model's
    def text_config(self, hf_config):
        """The language model's config (`text_config`, or the config itself where it is flat)."""
        return getattr(hf_config, "text_config", None) or hf_config

    def check_config(self, hf_config) -> None:
        text = self.text_config(hf_config)
        super().check_config(text)
        if getattr(text, "use_sliding_window", False):
            raise ValueError(f"{hf_config.model_type} with use_sliding_window=True is not supported by the Megatron "
                             "bridge yet")
        if not self.mrope_section(hf_config):
            raise ValueError(f"{hf_config.model_type} config without rope mrope_section")

    def mrope_section(self, hf_config) -> list:
        """The mRoPE section sizes (temporal, height, width) of the rotary channels."""
        rope = self.rope_parameters(hf_config)
        return list(rope.get("mrope_section") or [])

    def rope_parameters(self, hf_config) -> dict:
        """The text model's rope settings."""
        return super().rope_parameters(self.text_config(hf_config))

    def rope_theta(self, hf_config) -> float:
        return super().rope_theta(self.text_config(hf_config))

    def head_dim(self, hf_config) -> int:
        return super().head_dim(self.text_config(hf_config))

    def add_qkv_bias(self, hf_config) -> bool:
        return True

    def tied_embeddings(self, hf_config) -> bool:
        tie = getattr(hf_config, "tie_word_embeddings", None)
        if tie is None:
            tie = getattr(self.text_config(hf_config), "tie_word_embeddings", False)
        return bool(tie)

    def padded_vocab_size(self, hf_config, tp: int) -> int:
        return super().padded_vocab_size(self.text_config(hf_config), tp)

    def config_overrides(self, hf_config) -> dict:
        return {"mrope_section": self.mrope_section(hf_config)}

    def transformer_config(self, hf_config, mca_args, params_dtype: torch.dtype = torch.float32):
        """The text model's TransformerConfig (context parallelism is refused for this family by
        `args.validate_megatron_args`, before anything is built)."""
        return super().transformer_config(self.text_config(hf_config), mca_args, params_dtype)

    # ------------------------------------------------------------------ model
    def new_model(self, hf_config, config, mca_args, **kwargs):
        kwargs["position_embedding_type"] = "mrope"
        kwargs["max_sequence_length"] = getattr(self.text_config(hf_config), "max_position_embeddings", 4096)
        return vl_gpt_model_class()(config=config, hf_config=hf_config, vision_cls=self.vision_cls(), **kwargs)

    def vision_cls(self):
        """Hugging Face's vision tower class (built on the first stage, weights under `visual.`)."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel

    def set_hf_rope(self, model, hf_config, rope: dict) -> None:
        """mRoPE: megatron's own frequencies (only the default rope type is supported)."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{hf_config.model_type} rope_type {rope_type!r} is not supported by the Megatron "
                             "bridge yet")

    # ------------------------------------------------------------------ weights
    def compiled_table(self) -> list:
        """The Qwen2 table plus the vision tower: everything under `vision_model.` is `visual.*`, replicated."""
        out = super().compiled_table()
        out.append((re.compile(r"vision_model\.(?P<rest>.+)$"), ("visual.{rest}",), REPL))
        return out

    def reader(self, hf_path: str) -> SafetensorsReader:
        """A reader that finds the names in either checkpoint layout (`CompatReader`)."""
        return CompatReader(hf_path)


def get_rope_index(hf_config, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                   video_grid_thw: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                   mm_token_type_ids: Optional[torch.Tensor] = None) -> Any:
    """[3, b, s] mRoPE position ids exactly as Hugging Face computes them (its own `get_rope_index`), for
    callers without LLaMA-Factory's collator. `mm_token_type_ids` defaults to the placeholder tokens."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    return hf_rope_index(Qwen2VLModel, hf_config, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                         attention_mask=attention_mask)


def hf_rope_index(hf_model_cls: Any, hf_config, input_ids: torch.Tensor, mm_token_type_ids: Optional[torch.Tensor],
                  *args: Any, **kwargs: Any) -> torch.Tensor:
    """Call `hf_model_cls.get_rope_index` (a Qwen-VL model class) on a config-only stub, no weights built;
    `mm_token_type_ids` defaults to marking the image (1) and video (2) placeholder tokens."""
    if mm_token_type_ids is None:
        mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
        mm_token_type_ids[input_ids == hf_config.image_token_id] = 1
        mm_token_type_ids[input_ids == hf_config.video_token_id] = 2
    stub = hf_model_cls.__new__(hf_model_cls)
    object.__setattr__(stub, "config", hf_config)
    pos, _ = hf_model_cls.get_rope_index(stub, input_ids, mm_token_type_ids, *args, **kwargs)
    return pos
