"""Building a family's megatron model chunks: GPTModel (or the family's `new_model`) per virtual pipeline chunk,
patched so it computes what the Hugging Face model computes (HF rotary frequencies, masked vocab padding, our
vocab-parallel cross entropy) and carrying its `ModelState`."""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

import torch

from llamafactory_mca.models.model_state import ModelState


def set_tensor_parallel_attributes(model: torch.nn.Module) -> None:
    """Mark TP-split weights as megatron's weight-init functions would have.

    With `perform_initialization=False` megatron-core 0.16 skips the init functions, and with them the
    `tensor_model_parallel` / `partition_dim` attributes: the gradient norm (hence clipping), the distributed
    optimizer and checkpoints then treat split weights as duplicates. Biases are marked by megatron itself.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )
    from megatron.core.transformer.moe.experts import GroupedMLP

    split_dims = {ColumnParallelLinear: {"weight": 0}, VocabParallelEmbedding: {"weight": 0},
                  RowParallelLinear: {"weight": 1}, GroupedMLP: {"weight1": 1, "weight2": 0}}
    for module in model.modules():
        for cls, params in split_dims.items():
            if not isinstance(module, cls):
                continue
            for name, dim in params.items():
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter) and not getattr(param, "tensor_model_parallel", False):
                    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def build_model(
    bridge: Any,
    hf_config: Any,
    mca_args: Any,
    params_dtype: torch.dtype = torch.float32,
    wrap_with_ddp: bool = False,
    init_weights: bool = True,
    ddp_config: Any = None,
    device: Union[str, torch.device, None] = None,
    padded_vocab_size: Optional[int] = None,
) -> list:
    """`ModelBridge.build_model` (see there): one model chunk per virtual pipeline stage of this rank."""
    from megatron.core import parallel_state as ps

    from llamafactory_mca.kernels.cross_entropy import patch_language_model_loss
    from llamafactory_mca.platform import device as platform_device
    from llamafactory_mca.platform import setup_platform

    setup_platform()
    target = torch.device(device) if device is not None else platform_device()
    fp8 = fp8_recipe_checked(mca_args, target)  # refused here, before anything is built
    tp = ps.get_tensor_model_parallel_world_size()
    rows = bridge.padded_vocab_size(hf_config, tp) if padded_vocab_size is None else int(padded_vocab_size)
    vocab = bridge.vocab_size(hf_config)
    if rows % tp or rows < vocab:
        raise ValueError(f"padded_vocab_size {rows}: must be a multiple of the TP size {tp} and at least the "
                         f"vocab size {vocab}")
    config = bridge.transformer_config(hf_config, mca_args, params_dtype)
    config.perform_initialization = init_weights
    if target.type == "meta":
        config.use_cpu_initialization = True  # megatron passes device=cuda explicitly otherwise: no meta
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    rope = bridge.rope_parameters(hf_config)
    models = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        with torch.device("meta") if target.type == "meta" else contextlib.nullcontext():
            model = new_chunk(bridge, hf_config, config, mca_args, rows, vp_stage)
        model.mca_state = ModelState(hf_config=hf_config, bridge=bridge, padded_vocab_size=rows)
        bridge.set_hf_rope(model, hf_config, rope)
        bridge.mask_padded_logits(model, hf_config)
        if model.post_process:
            # vocab-parallel cross entropy that writes its gradient into the logits buffer (Triton on
            # GPU): less memory and time than megatron's TE-less version, same arithmetic.
            patch_language_model_loss(model)
        if not init_weights:
            set_tensor_parallel_attributes(model)
        if fp8 is not None:
            apply_fp8(model, fp8)
        model.to(target)
        models.append(model)
    if wrap_with_ddp:
        from llamafactory_mca.training.ddp import wrap_ddp

        models = wrap_ddp(mca_args, models, ddp_config)
    return models


def fp8_recipe_checked(mca_args: Any, target: torch.device):
    """The FP8 recipe of `mca_args` (`fp8` / `fp8_recipe`), None when FP8 is off; ValueError naming the key and
    the fix where it cannot run (CPU, pre-Hopper GPU, a kernel missing or wrong in this torch). A model built on
    the meta device (planning, conversion) skips the device check."""
    from llamafactory_mca.kernels.fp8 import check_fp8_supported, recipe_from_args

    recipe = recipe_from_args(getattr(mca_args, "fp8_format", None), getattr(mca_args, "fp8_recipe", None))
    if recipe is not None and target.type != "meta":
        check_fp8_supported(recipe)
    return recipe


def apply_fp8(model: torch.nn.Module, recipe: Any) -> list[str]:
    """Run the chunk's transformer-layer linears and experts in FP8 (kernels/fp8.py); parameters untouched."""
    from llamafactory_mca.kernels.fp8 import convert_model_to_fp8
    from llamafactory_mca.log import get_logger

    converted = convert_model_to_fp8(model, recipe)
    get_logger("fp8").info_rank0(f"FP8 ({recipe.fp8_format}, {recipe.name}): {len(converted)} modules of this chunk")
    return converted


def new_chunk(bridge: Any, hf_config: Any, config: Any, mca_args: Any, rows: int, vp_stage: Optional[int]):
    """One model chunk through the family's `new_model`, with the layer spec and pipeline position of `vp_stage`."""
    from megatron.core import parallel_state as ps

    from llamafactory_mca.models.spec import block_spec

    return bridge.new_model(
        hf_config,
        config,
        mca_args,
        transformer_layer_spec=block_spec(config, mca_args, config.qk_layernorm, vp_stage),
        vocab_size=rows,
        max_sequence_length=getattr(hf_config, "max_position_embeddings", 4096),
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=bridge.tied_embeddings(hf_config),
        position_embedding_type="rope",
        rotary_base=bridge.rope_theta(hf_config),
        vp_stage=vp_stage,
    )


def mask_padded_logits(model: torch.nn.Module, vocab_size: int, padded_rows: int) -> None:
    """Give the TP vocab-padding columns the lowest finite logit, so softmax and loss equal the HF model's.

    The padding rows of the output weight are zero: left alone they would add exp(0) terms to every
    softmax denominator. Only the TP ranks holding padding columns get the hook.
    """
    from megatron.core import parallel_state as ps

    output_layer = getattr(model, "output_layer", None)
    if output_layer is None:
        return
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    per_rank = padded_rows // tp
    first_pad = vocab_size - rank * per_rank  # local index of the first padding column
    if first_pad >= per_rank:
        return

    def hook(_module, _inputs, output):
        logits, bias = output
        logits = logits.clone()
        # the dtype's lowest finite value, not -inf: a TP rank holding only padding must not turn the
        # vocab-parallel max / log-sum-exp into NaN
        logits[..., max(first_pad, 0):] = torch.finfo(logits.dtype).min
        return logits, bias

    output_layer.register_forward_hook(hook)


def set_hf_rope(model: torch.nn.Module, hf_config: Any, rope: dict) -> None:
    """Use Hugging Face's own inverse frequencies (covers linear / llama3 / dynamic scaling exactly)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return  # megatron computes the same base ** (-2i/d)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    if abs(float(scaling) - 1.0) > 1e-12:
        raise ValueError(f"rope_type {rope_type!r} with attention scaling is not supported yet")
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device, rotary.inv_freq.dtype)
