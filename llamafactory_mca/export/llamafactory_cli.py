"""`llamafactory-cli export` under USE_MCA with a Megatron checkpoint as model_name_or_path."""

from __future__ import annotations

from typing import Any

import torch

from llamafactory_mca.checkpoint import CheckpointError
from llamafactory_mca.export.merge import merge_checkpoint


def export_from_llamafactory_args(args: dict[str, Any]) -> None:
    """`llamafactory-cli export` with model_name_or_path = a Megatron checkpoint: merge it into export_dir.

    As LLaMA-Factory's export merges adapters, a LoRA checkpoint is exported as its base model (recorded in the
    checkpoint) with the adapter merged in. (A LoRA checkpoint also holds a PEFT adapter: with the base model as
    model_name_or_path and the checkpoint as adapter_name_or_path, LLaMA-Factory's own export merges it.)"""
    path = args.get("model_name_or_path")
    export_dir = args.get("export_dir")
    if not export_dir:
        raise CheckpointError("`export_dir`: required to export a Megatron checkpoint. Fix: set export_dir: DIR.")
    if args.get("adapter_name_or_path"):
        raise CheckpointError(
            "`adapter_name_or_path`: a Megatron checkpoint as model_name_or_path is exported with its own weights "
            "(a LoRA checkpoint with its adapter merged in). Fix: remove adapter_name_or_path, or pass the base model "
            "as model_name_or_path and the LoRA checkpoint as adapter_name_or_path."
        )
    if args.get("export_quantization_bit"):
        raise CheckpointError(
            "`export_quantization_bit`: not supported for Megatron checkpoints. Fix: export first, then quantize "
            "the exported model with llamafactory-cli export."
        )
    dtype = None
    infer = str(args.get("infer_dtype", "auto") or "auto")
    if infer in ("bfloat16", "float16", "float32"):
        dtype = getattr(torch, infer)
    size = args.get("export_size", 5)
    max_shard = f"{size}GB" if isinstance(size, (int, float)) or str(size).isdigit() else str(size)
    merge_checkpoint(path, export_dir, dtype, max_shard, merge_lora=True)
    print(f"exported {path} -> {export_dir}")
