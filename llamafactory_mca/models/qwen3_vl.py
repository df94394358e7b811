"""Qwen3-VL: Hugging Face's Qwen3-VL vision tower on the first pipeline stage, the Qwen3 language model (q/k
RMSNorm) as a megatron GPTModel with interleaved mRoPE and DeepStack.

* Vision tower: Hugging Face's own `Qwen3VLVisionModel` (learned position embeddings interpolated per grid, the
  patch merger and the DeepStack mergers live inside it), a submodule of the first stage's model chunk,
  replicated over TP; its parameters keep their HF names (`vision_model.*` <-> `model.visual.*`).
* Placeholder tokens take the merger's outputs (as Qwen2-VL, `qwen2_vl.vl_gpt_model_class`).
* DeepStack: the vision tower also returns one feature map per `vision_config.deepstack_visual_indexes` entry;
  Hugging Face adds map k to the hidden states of the visual tokens after decoder layer k (k = 0 .. K-1). Here
  map k becomes a dense [s, b, h] tensor (zero at text tokens, so adding it changes only the visual tokens and
  is the same floating-point addition as HF's masked one), the K maps are stacked to [K, s, b, h] (each
  sequence-parallel scattered like the hidden states) and handed to the decoder as megatron's `context`, which
  every TransformerLayer passes on unchanged (also through full activation recompute, as a checkpoint input, so
  the right micro-batch's maps are used when the layer is recomputed in backward). `DeepstackLayer` adds map k
  after global layer k.
* Pipeline parallelism: the maps are computed on the first stage and travel with the micro-batch inside the
  tensor sent between stages, [hidden ; map_0 ; ... ; map_{K-1}] along the sequence dimension, while a later
  stage still owns layers < K; the receiving stage splits it again (rows beyond the local sequence length are
  the maps). Megatron's p2p then exchanges the tensor shape per micro-batch (`variable_seq_lengths`, switched on
  by the trainer for such models: `varying_p2p_shapes`), and the backward pass returns the maps' gradients to the first stage through
  the same tensor. Batches without images or videos send the plain hidden states.
* Interleaved mRoPE: rotary channel i takes its position from the height row when i % 3 == 1 and
  i < 3 * mrope_section[1], from the width row when i % 3 == 2 and i < 3 * mrope_section[2], else from the
  temporal row (Hugging Face's `apply_interleaved_mrope`), `interleaved_mrope_freqs` in Qwen2-VL's `CPMRoPE`.
* mRoPE positions: Hugging Face's `Qwen3VLModel.get_rope_index` (videos: one grid per frame, the frames' timestamps
  are text tokens between them, so no `second_per_grid_ts`).
* Checkpoint names: transformers' own layout, which Qwen3-VL checkpoints use (`model.language_model.*`,
  `model.visual.*`, `lm_head.*`).
* Context parallelism and neat_packing: as Qwen2-VL (models/qwen2_vl.py); the DeepStack maps are built over the
  full sequence and split to this CP rank's chunks like the merged embeddings.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import torch

from llamafactory_mca.models.bridge import REPL, ModelBridge, dense_table
from llamafactory_mca.models.qwen2_vl import Qwen2VLBridge, cp_local_tokens, hf_rope_index, vl_gpt_model_class
from llamafactory_mca.models.safetensors_io import SafetensorsReader


def internal_layout(table: dict) -> dict:
    """A text-model table in transformers' Qwen3-VL layout: `model.X` -> `model.language_model.X`."""

    def rename(hf):
        if isinstance(hf, tuple):
            return tuple(rename(h) for h in hf)
        return "model.language_model." + hf[len("model."):] if hf.startswith("model.") else hf

    return {key: (rename(hf), kind) for key, (hf, kind) in table.items()}


def interleaved_mrope_freqs(inv_freq: torch.Tensor, position_ids: torch.Tensor, mrope_section: list) -> torch.Tensor:
    """[s, b, 1, 2 * d] rotary angles of [3, b, s] positions with Hugging Face's interleaved mRoPE layout."""
    b = position_ids.shape[1]
    inv = inv_freq[None, None, :, None].float().expand(3, b, -1, 1)
    freqs = (inv @ position_ids[:, :, None, :].float()).transpose(2, 3)  # [3, b, s, d]
    out = freqs[0].clone()
    for row in (1, 2):
        idx = slice(row, mrope_section[row] * 3, 3)
        out[..., idx] = freqs[row, ..., idx]
    emb = torch.cat((out, out), dim=-1)
    return emb[..., None, :].transpose(0, 1).contiguous()


def deepstack_visual_indexes(hf_config: Any) -> list:
    """The vision layers whose features DeepStack adds to the decoder (none for a tower without DeepStack, e.g.
    Qwen3.5's)."""
    return list(getattr(hf_config.vision_config, "deepstack_visual_indexes", None) or ())


def deepstack_features(vision_output: Any) -> list:
    """The vision tower's DeepStack feature maps (none where the tower has no DeepStack)."""
    return list(getattr(vision_output, "deepstack_features", None) or ())


@functools.lru_cache(maxsize=None)
def deepstack_layer_class():
    """megatron's TransformerLayer that adds DeepStack map k (the `context` it is given) after global layer k."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class DeepstackLayer(TransformerLayer):
        """A decoder layer; `context` [K, s, b, h] carries the DeepStack maps (module docstring)."""

        def forward(self, *args, **kwargs):
            output, context = super().forward(*args, **kwargs)
            index = self.layer_number - 1
            if torch.is_tensor(context) and index < context.shape[0]:
                output = output + context[index]
            return output, context

    return DeepstackLayer


def with_deepstack_layers(spec: Any) -> Any:
    """The block spec (or layer spec) with `DeepstackLayer` as the layer module."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    layer_cls = deepstack_layer_class()

    def swap(s):
        return ModuleSpec(module=layer_cls, params=s.params, submodules=s.submodules)

    if hasattr(spec, "layer_specs"):
        spec.layer_specs = [swap(s) for s in spec.layer_specs]
        return spec
    return swap(spec)


@functools.lru_cache(maxsize=None)
def qwen3_vl_model_class():
    """The Qwen-VL GPTModel with DeepStack and interleaved mRoPE (module docstring)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    base = vl_gpt_model_class()

    class Qwen3VLGPTModel(base):
        """First stage: vision tower, merged embeddings and DeepStack maps; every stage: DeepStack layers."""

        def __init__(self, *args, hf_config=None, **kwargs):
            super().__init__(*args, hf_config=hf_config, **kwargs)
            self.num_deepstack = len(deepstack_visual_indexes(hf_config))
            # the trainer then exchanges p2p shapes per micro-batch (training/loop.configure_schedule)
            self.varying_p2p_shapes = self.num_deepstack > 0 and ps.get_pipeline_model_parallel_world_size() > 1

        def rope_freqs_fn(self):
            """Qwen3-VL's interleaved rotary angle layout."""
            return interleaved_mrope_freqs

        def embed_with_deepstack(self, input_ids, pixel_values=None, image_grid_thw=None,
                                 pixel_values_videos=None, video_grid_thw=None, packed_seq_params=None):
            """([s, b, h] decoder input, [K, s, b, h] DeepStack maps or None), SP-scattered under SP, of the full
            `input_ids`: this CP rank's chunks of both under context parallelism."""
            emb = self.word_embeddings(input_ids)
            maps = None
            for values, grid, token in ((pixel_values, image_grid_thw, self.image_token_id),
                                        (pixel_values_videos, video_grid_thw, self.video_token_id)):
                if values is None:
                    continue
                out = self.vision_output(values, grid)
                emb, mask = self.merge_vision(emb, input_ids, token, out.pooler_output)
                if maps is None:
                    maps = [torch.zeros_like(emb) for _ in range(self.num_deepstack)]
                full = mask.unsqueeze(-1).expand_as(emb)
                maps = [m.masked_scatter(full, f.to(emb.dtype)) for m, f in zip(maps, deepstack_features(out))]
            if maps is not None:
                maps = torch.stack([self.to_decoder_layout(cp_local_tokens(m, packed_seq_params))
                                    for m in maps]) if maps else None
            return self.to_decoder_layout(cp_local_tokens(emb, packed_seq_params)), maps

        def local_seq_length(self, input_ids: torch.Tensor) -> int:
            """Rows of this rank's hidden states: its CP chunks' tokens (`input_ids`), over TP under sequence
            parallelism."""
            s = input_ids.shape[1]
            if self.config.sequence_parallel:
                s //= ps.get_tensor_model_parallel_world_size()
            return s

        def split_received(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
            """A later stage: split the received [hidden ; maps] into the decoder input and the maps."""
            received = self.decoder.input_tensor
            s = self.local_seq_length(input_ids)
            if received is None or received.shape[0] == s:
                return None
            k = received.shape[0] // s - 1
            self.decoder.input_tensor = received[:s]
            return received[s:].view(k, s, *received.shape[1:])

        def sends_maps(self) -> bool:
            """Whether a later stage still owns layers that take DeepStack maps."""
            if self.post_process:
                return False
            layers = self.decoder.layers
            last = layers[-1].layer_number if len(layers) else 0
            return last < self.num_deepstack

        def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                    cp_input_ids=None, **kwargs):
            """As Qwen2-VL's forward (`cp_input_ids` under CP), with the DeepStack maps."""
            packed_seq_params = kwargs.get("packed_seq_params")
            position_ids = self.prepare_rope(position_ids, packed_seq_params)
            maps = None
            if self.pre_process and decoder_input is None:
                decoder_input, maps = self.embed_with_deepstack(
                    input_ids if cp_input_ids is None else cp_input_ids, pixel_values, image_grid_thw,
                    pixel_values_videos, video_grid_thw, packed_seq_params)
            elif not self.pre_process:
                maps = self.split_received(input_ids)
            if maps is not None:
                kwargs["extra_block_kwargs"] = {**(kwargs.get("extra_block_kwargs") or {}), "context": maps}
            out = GPTModel.forward(self, input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, **kwargs)
            if maps is not None and self.sends_maps():
                out = torch.cat([out, maps.flatten(0, 1)], 0)
            return out

    return Qwen3VLGPTModel


class Qwen3VLBridge(Qwen2VLBridge):
    """Qwen3-VL (dense): the Qwen3 language model with DeepStack and interleaved mRoPE (module docstring)."""

    model_types = ("qwen3_vl",)
    table = internal_layout(dense_table(attn_bias=False, qk_norm=True))

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        if getattr(self.text_config(hf_config), "attention_bias", False):
            raise ValueError(f"{hf_config.model_type} with attention_bias=True is not supported by the Megatron "
                             "bridge yet. Fix: set attention_bias: false in config.json (the released models do)")

    def qk_layernorm(self, hf_config) -> bool:
        return True

    def add_qkv_bias(self, hf_config) -> bool:
        return False

    def transformer_config(self, hf_config, mca_args, params_dtype: torch.dtype = torch.float32):
        """The text model's TransformerConfig. DeepStack maps cross pipeline stages inside the p2p tensor, whose
        shape then varies per micro-batch, which megatron's allgather MoE dispatcher does not allow."""
        config = super().transformer_config(hf_config, mca_args, params_dtype)
        if (config.pipeline_model_parallel_size > 1 and config.num_moe_experts and deepstack_visual_indexes(hf_config)
                and config.moe_token_dispatcher_type == "allgather"):
            raise ValueError(
                f"`moe_token_dispatcher_type`: {hf_config.model_type} with pipeline parallelism sends its DeepStack "
                "features between stages in tensors of varying shape, which the allgather dispatcher does not "
                "allow. Fix: set moe_token_dispatcher_type: alltoall")
        return config

    def new_model(self, hf_config, config, mca_args, **kwargs):
        kwargs["position_embedding_type"] = "mrope"
        kwargs["max_sequence_length"] = getattr(self.text_config(hf_config), "max_position_embeddings", 4096)
        kwargs["transformer_layer_spec"] = with_deepstack_layers(kwargs["transformer_layer_spec"])
        return qwen3_vl_model_class()(config=config, hf_config=hf_config, vision_cls=self.vision_cls(), **kwargs)

    def vision_cls(self):
        """Hugging Face's Qwen3-VL vision tower (with the DeepStack mergers)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        return Qwen3VLVisionModel

    def compiled_table(self) -> list:
        """The text table plus the vision tower: everything under `vision_model.` is `model.visual.*`, replicated."""
        out = ModelBridge.compiled_table(self)
        out.append((re.compile(r"vision_model\.(?P<rest>.+)$"), ("model.visual.{rest}",), REPL))
        return out

    def reader(self, hf_path: str) -> SafetensorsReader:
        """Qwen3-VL checkpoints hold transformers' own names: the plain reader."""
        return SafetensorsReader(hf_path)


def get_rope_index(hf_config, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                   video_grid_thw: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                   mm_token_type_ids: Optional[torch.Tensor] = None) -> Any:
    """[3, b, s] mRoPE position ids exactly as Hugging Face computes them for Qwen3-VL (its own
    `get_rope_index`; the same for Qwen3-VL-MoE)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    return hf_rope_index(Qwen3VLModel, hf_config, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                         attention_mask=attention_mask)
