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
* Context parallelism: the data path (training/data.split_for_cp) hands the model its CP chunks of the tokens
  plus the full token row (`cp_input_ids`) and the full [3, b, s] positions. The first stage embeds the full
  row, merges the vision features into it, and only then keeps this rank's load-balanced chunks
  (`packing.cp_indices`: chunks r and 2*cp-1-r of every sequence, of every packed sample under THD), so that
  each image's features land where its placeholders are whichever rank holds them. The rotary angles
  (`CPMRoPE`) are computed from the full positions and split the same way: by CP chunk for padded batches; for
  THD rows they stay whole and megatron's THD RoPE picks each sample's chunks by its cu_seqlens offsets.
* neat_packing (THD): one row of samples, each with its own mRoPE positions (training/multimodal.py
  `packed_rope_positions`), its images / videos in order; attention per sample through the cu_seqlens.
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


def mrope_freqs(inv_freq: torch.Tensor, position_ids: torch.Tensor, mrope_section: list) -> torch.Tensor:
    """[s, b, 1, 2 * d] rotary angles of [3, b, s] positions, the channels in mRoPE sections (temporal, height,
    width, in turn over both halves), as megatron's `MultimodalRotaryEmbedding` and Hugging Face compute them."""
    b = position_ids.shape[1]
    inv = inv_freq[None, None, :, None].float().expand(3, b, -1, 1)
    freqs = (inv @ position_ids[:, :, None, :].float()).transpose(2, 3)  # [3, b, s, d]
    emb = torch.cat((freqs, freqs), dim=-1)
    emb = torch.cat([m[i % 3] for i, m in enumerate(emb.split(list(mrope_section) * 2, dim=-1))], dim=-1)
    return emb[..., None, :].transpose(0, 1).contiguous()


class CPMRoPE(torch.nn.Module):
    """Megatron's `MultimodalRotaryEmbedding` (same inverse frequencies) taking the full sequence's positions:
    under context parallelism the angles are split to this rank's chunks, except for THD rows (`packed`), whose
    angles megatron's THD RoPE splits per sample itself. `freqs_fn` computes the angles (`mrope_freqs`;
    Qwen3-VL passes its interleaved layout)."""

    def __init__(self, inner: torch.nn.Module, freqs_fn=mrope_freqs):
        super().__init__()
        self.inner = inner
        self.freqs_fn = freqs_fn
        self.packed = False  # set per forward by the model: THD (packed_seq_params) or not

    @property
    def inv_freq(self) -> torch.Tensor:
        """The inverse frequencies (megatron's, base ** (-2i/d))."""
        return self.inner.inv_freq

    @inv_freq.setter
    def inv_freq(self, value: torch.Tensor) -> None:
        self.inner.inv_freq = value

    def forward(self, position_ids: torch.Tensor, mrope_section: list, cp_group: Any = None) -> torch.Tensor:
        emb = self.freqs_fn(self.inner.inv_freq.to(position_ids.device), position_ids, mrope_section)
        group = cp_group if cp_group is not None else self.inner.cp_group
        if not self.packed and group is not None and group.size() > 1:
            from megatron.core.models.common.embeddings.rotary_pos_embedding import get_pos_emb_on_this_cp_rank

            emb = get_pos_emb_on_this_cp_rank(emb, 0, group)
        return emb


def cp_local_tokens(x: torch.Tensor, packed_seq_params: Any = None) -> torch.Tensor:
    """This context-parallel rank's tokens of [b, s, ...] `x` (the full sequence), in the order
    `packing.cp_split` gives the data path's tokens (per packed sample under THD); `x` itself without CP."""
    from megatron.core import parallel_state as ps

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return x
    from llamafactory_mca.models.packing import cp_indices, segment_lengths

    lens = [x.shape[1]] if packed_seq_params is None else segment_lengths(packed_seq_params)
    return x.index_select(1, cp_indices(lens, cp, ps.get_context_parallel_rank(), x.device))


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
            self.rotary_pos_emb = CPMRoPE(self.rotary_pos_emb, self.rope_freqs_fn())

        def rope_freqs_fn(self):
            """The rotary angle layout (`mrope_freqs`; Qwen3-VL: interleaved)."""
            return mrope_freqs

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
                  video_grid_thw=None, packed_seq_params=None) -> torch.Tensor:
            """[s, b, h] decoder input (sequence-parallel scattered when SP is on) of the full `input_ids`,
            this CP rank's chunks of it under context parallelism."""
            emb = self.word_embeddings(input_ids)
            for values, grid, token in ((pixel_values, image_grid_thw, self.image_token_id),
                                        (pixel_values_videos, video_grid_thw, self.video_token_id)):
                if values is None:
                    continue
                out = self.vision_output(values, grid)
                emb, _ = self.merge_vision(emb, input_ids, token, getattr(out, "pooler_output", out))
            return self.to_decoder_layout(cp_local_tokens(emb, packed_seq_params))

        @staticmethod
        def mrope_positions(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            """[3, b, s] mRoPE positions from [3, b, s], [4, b, s] (text row first) or [b, s] (text only)."""
            if position_ids is not None:
                if position_ids.dim() == 2:
                    position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
                elif position_ids.dim() == 3 and position_ids.shape[0] == 4:
                    position_ids = position_ids[1:]
            return position_ids

        def prepare_rope(self, position_ids: Any, packed_seq_params: Any) -> Optional[torch.Tensor]:
            """[3, b, s] positions (`mrope_positions`); tells the rotary module whether the row is THD."""
            self.rotary_pos_emb.packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
            return self.mrope_positions(position_ids)

        def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                    cp_input_ids=None, **kwargs):
            """`cp_input_ids`: the full token row under context parallelism (`input_ids`: this rank's chunks),
            `position_ids` then the full sequence's (module docstring)."""
            packed_seq_params = kwargs.get("packed_seq_params")
            position_ids = self.prepare_rope(position_ids, packed_seq_params)
            if self.pre_process and decoder_input is None:
                decoder_input = self.embed(input_ids if cp_input_ids is None else cp_input_ids, pixel_values,
                                           image_grid_thw, pixel_values_videos, video_grid_thw, packed_seq_params)
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
        """The text model's TransformerConfig."""
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
