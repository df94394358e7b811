"""Megatron checkpoint -> Hugging Face safetensors (merge).

Merge runs in one process, without GPUs, whatever tp/pp/vpp/ep/dp layout wrote the checkpoint, and streams:

1. the model is built for tp=pp=ep=1 on the `meta` device (no memory), in the checkpoint's dtype;
2. a pass over the bridge's table on the meta tensors gives every HF tensor's name, shape and dtype, so the
   safetensors shards (and their headers) are planned before any weight is read;
3. unit by unit (embedding, each decoder layer, final norm + output layer) the unit is materialised, filled
   with megatron-core's own `dist_checkpointing.load` (it reads only that unit's tensors and re-assembles TP
   shards, swiglu halves and expert-parallel experts), converted with the bridge's table, and each tensor is
   written straight to its planned place in its shard file; then the unit goes back to `meta`.

An rm checkpoint's value head is written next to the model as `value_head.safetensors` (LLaMA-Factory's layout,
as the rm stage's own export writes it).

Peak host memory is about one unit (one decoder layer, or the embedding) plus its HF copy, not the model.
The output is written into a hidden sibling directory and published by one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Iterator, Optional

import torch

from llamafactory_mca.checkpoint import (
    SHARDED_STATE_DICT_METADATA,
    CheckpointError,
    checkpoint_info,
    verify_checkpoint,
    checkpoint_tensor_meta,
)
from llamafactory_mca.export.files import (
    bridge_for_config,
    check_output_dir,
    config_dtype,
    copy_tokenizer,
    fresh_tmp,
    hf_config_of_dir,
    publish,
)
from llamafactory_mca.export.lora_merge import is_lora_checkpoint, merge_lora_checkpoint
from llamafactory_mca.models.safetensors_io import StreamingSafetensorsWriter, parse_size
from llamafactory_mca.models.value_head import read_checkpoint_value_head, write_value_head


@contextlib.contextmanager
def single_process_parallel():
    """A one-process gloo group with tp=pp=ep=1 (reused if the caller already has one of world size 1)."""
    import torch.distributed as dist

    from llamafactory_mca import platform
    from llamafactory_mca.args import MegatronArguments

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != 1:
            raise CheckpointError("merge runs in a single process; launch it without torchrun.")
        yield
        return
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for k in saved:
        os.environ.pop(k, None)
    platform.init_parallel(MegatronArguments(), seed=0)
    try:
        yield
    finally:
        platform.destroy_parallel()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_meta_model(bridge: Any, hf_config: Any, dtype: torch.dtype, vocab_rows: Optional[int]):
    """GPTModel for tp=pp=ep=1 with every parameter on `meta`; the vocab padded as in the checkpoint."""
    from llamafactory_mca.args import MegatronArguments

    # `vocab_rows`: the checkpoint's padded vocab (older checkpoints padded depending on their TP size)
    models = bridge.build_model(hf_config, MegatronArguments(), dtype, wrap_with_ddp=False, init_weights=False,
                                device="meta", padded_vocab_size=vocab_rows)
    if len(models) != 1:
        raise CheckpointError("internal: expected one model chunk for tp=pp=1")
    return models[0]


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules materialised one at a time: the vision tower (VL models), embedding, each layer, then the rest
    (final norm, output layer)."""
    units: list[torch.nn.Module] = []
    if getattr(model, "vision_model", None) is not None:
        units.append(model.vision_model)
    if getattr(model, "embedding", None) is not None:
        units.append(model.embedding)
    units.extend(model.decoder.layers)
    rest = [
        m for m in (getattr(model.decoder, "final_layernorm", None), getattr(model, "output_layer", None)) if m is not None
    ]
    if rest:
        units.append(torch.nn.ModuleList(rest))
    return units


def _is_meta(t: Any) -> bool:
    """A tensor on the `meta` device."""
    return isinstance(t, torch.Tensor) and t.is_meta


def _materialized_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The model's sharded tensors that are not on `meta` (the unit being merged)."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )

    sd = model.sharded_state_dict(metadata=dict(SHARDED_STATE_DICT_METADATA))
    return {
        k: v
        for k, v in sd.items()
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and not _is_meta(v.data)
    }


def _hf_tensors(bridge: Any, model: torch.nn.Module, hf_config: Any, meta: bool = False
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf name, tensor) for the materialised parameters of `model` (tp=1) via the bridge's table; with
    `meta`, for the parameters still on `meta` instead (shapes only: the shard plan)."""
    for param in bridge.iter_local_params([model]):
        if param.tied:
            continue
        full = param.get()
        if _is_meta(full) != meta:
            continue
        yield from bridge.megatron_to_hf(param.name, full, hf_config).items()


def _plan(bridge: Any, model: torch.nn.Module, hf_config: Any, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, saved dtype) of every HF tensor, from the meta model: the writer's shard plan."""
    return [
        (name, tuple(t.shape), dtype if t.is_floating_point() else t.dtype)
        for name, t in _hf_tensors(bridge, model, hf_config, meta=True)
    ]


def stored_keys(sharded: Any) -> list[str]:
    """The checkpoint keys one value of a sharded state dict is stored under: its key, or the keys of the parts a
    ShardedTensorFactory builds (e.g. GatedDeltaNet's convolution sections, `<key>.query` ...)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if not isinstance(sharded, ShardedTensorFactory):
        return [sharded.key]
    parts = sharded.build()
    parts = parts if isinstance(parts, (list, tuple)) else [parts]
    return [key for part in parts for key in stored_keys(part)]


def merge_checkpoint(
    checkpoint_path: str,
    output_path: str,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Any = "5GB",
    overwrite: bool = False,
    save_tokenizer: bool = True,
    merge_lora: bool = False,
    base_model: Optional[str] = None,
) -> str:
    """Write the Hugging Face model of a llamafactory-mca checkpoint to `output_path`; returns the path.

    `dtype`: the saved dtype (default: the HF config's dtype, else the checkpoint's). Single process, no GPU.
    A LoRA checkpoint (adapter only) gives its PEFT adapter, or with `merge_lora` the base model with the
    adapter merged in (the base model recorded in the checkpoint, or `base_model`): see `merge_lora_checkpoint`.
    """
    from megatron.core import dist_checkpointing

    checkpoint_path = os.path.normpath(checkpoint_path)
    output_path = os.path.normpath(output_path)
    info = checkpoint_info(checkpoint_path)  # raises for anything but a complete checkpoint
    check_output_dir(output_path, overwrite)
    hf_config = hf_config_of_dir(checkpoint_path)
    bridge = bridge_for_config(hf_config, checkpoint_path)
    verify_checkpoint(checkpoint_path)  # before any tensor is read: undamaged, nothing pickled is executed
    tensor_meta = checkpoint_tensor_meta(checkpoint_path)
    if is_lora_checkpoint(info, tensor_meta):
        return merge_lora_checkpoint(checkpoint_path, output_path, merge_lora=merge_lora, base_model=base_model,
                                     dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                                     save_tokenizer=save_tokenizer)
    if base_model:
        raise CheckpointError(f"--base_model: {checkpoint_path} holds full model weights, not a LoRA adapter. Fix: "
                              "leave --base_model out.")
    emb = tensor_meta.get("embedding.word_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{checkpoint_path} holds no model weights (no embedding). Fix: pass a model checkpoint.")
    ckpt_dtype = emb[1]
    if dtype is None:
        dtype = config_dtype(hf_config, ckpt_dtype)

    tmp = fresh_tmp(output_path)

    with single_process_parallel():
        model = build_meta_model(bridge, hf_config, ckpt_dtype, emb[0][0])
        writer = StreamingSafetensorsWriter(tmp, _plan(bridge, model, hf_config, dtype), parse_size(max_shard_size))
        try:
            for unit in units(model):
                unit.to_empty(device="cpu")
                sharded = _materialized_sharded_state_dict(model)
                missing = [key for sh in sharded.values() for key in stored_keys(sh) if key not in tensor_meta]
                if missing:
                    raise CheckpointError(
                        f"{checkpoint_path} lacks {missing[:3]}: it was written for another model or with another "
                        f"llamafactory-mca version. Fix: check that config.json in the checkpoint matches its weights."
                    )
                loaded = dist_checkpointing.load(sharded, checkpoint_path)
                loaded = {k: loaded[k] for k in sharded}  # (the common state of the checkpoint comes back too)
                result = model.load_state_dict(loaded, strict=False)
                if result.unexpected_keys:
                    raise CheckpointError(f"unexpected keys while merging: {result.unexpected_keys[:3]}")
                with torch.no_grad():
                    for name, tensor in _hf_tensors(bridge, model, hf_config):
                        writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                del loaded, sharded
                unit.to("meta")
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        writer.close()
    value_head = read_checkpoint_value_head(checkpoint_path)  # rm: LLaMA-Factory's value_head.safetensors too
    if value_head is not None:
        write_value_head(value_head, tmp)

    cfg = hf_config
    cfg.dtype = dtype
    if hasattr(cfg, "torch_dtype"):
        with contextlib.suppress(Exception):
            cfg.torch_dtype = dtype
    cfg.save_pretrained(tmp)
    if save_tokenizer:
        copy_tokenizer(checkpoint_path, tmp)
    publish(tmp, output_path)
    return output_path
