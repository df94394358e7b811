"""The argparse front-ends `llamafactory-mca merge` and `llamafactory-mca convert` (also
`python -m llamafactory_mca.export merge|convert` and scripts/megatron_merge.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from llamafactory_mca.checkpoint import CheckpointError
from llamafactory_mca.export.convert import convert_hf_to_megatron
from llamafactory_mca.export.merge import merge_checkpoint

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _dtype_from_flags(ns: argparse.Namespace) -> Optional[torch.dtype]:
    """The dtype chosen by --bf16 / --fp16 / --fp32 (at most one), or None."""
    chosen = [name for name in ("bf16", "fp16", "fp32") if getattr(ns, name, False)]
    if len(chosen) > 1:
        raise CheckpointError(f"choose one of --bf16/--fp16/--fp32, got {', '.join('--' + c for c in chosen)}")
    return _DTYPES[chosen[0]] if chosen else None


def _add_dtype_flags(p: argparse.ArgumentParser) -> None:
    """--bf16 / --fp16 / --fp32."""
    p.add_argument("--bf16", action="store_true", help="save bfloat16 weights")
    p.add_argument("--fp16", action="store_true", help="save float16 weights")
    p.add_argument("--fp32", action="store_true", help="save float32 weights")


def merge_command(argv: list[str]) -> int:
    """`llamafactory-mca merge --checkpoint_path CKPT --output_path DIR [--bf16|--fp16|--fp32] [--merge_lora]
    [--base_model DIR]`."""
    p = argparse.ArgumentParser(
        prog="llamafactory-mca merge",
        description="Merge a Megatron checkpoint (any tp/pp/vpp/ep layout) into Hugging Face safetensors, config "
        "and tokenizer. One process, no GPU; memory about one decoder layer. A LoRA checkpoint gives its PEFT "
        "adapter, or with --merge_lora the base model with the adapter merged in.",
    )
    p.add_argument("--checkpoint_path", required=True, help="a checkpoint-N directory written by llamafactory-mca")
    p.add_argument("--output_path", required=True, help="a new (or empty) directory for the Hugging Face model")
    _add_dtype_flags(p)
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB (default)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--merge_lora", action="store_true",
                   help="LoRA checkpoints: write the base model with the adapter merged in (a full model) instead of "
                   "the PEFT adapter")
    p.add_argument("--base_model", default=None,
                   help="LoRA checkpoints with --merge_lora: the base Hugging Face model directory (default: the "
                   "one recorded at training time)")
    ns = p.parse_args(argv)
    try:
        out = merge_checkpoint(ns.checkpoint_path, ns.output_path, _dtype_from_flags(ns), ns.max_shard_size,
                               ns.overwrite_output_dir, merge_lora=ns.merge_lora, base_model=ns.base_model)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {ns.checkpoint_path} -> {out}")
    return 0


def convert_command(argv: list[str]) -> int:
    """`llamafactory-mca convert --model_name_or_path HF_DIR --output_path DIR [--tensor_model_parallel_size N ...]`."""
    from llamafactory_mca.args import (
        McaArgumentError,
        MegatronArguments,
        validate_megatron_args,
    )

    p = argparse.ArgumentParser(
        prog="llamafactory-mca convert",
        description="Convert a Hugging Face model into a llamafactory-mca Megatron checkpoint (model weights only; "
        "usable as resume_from_checkpoint or with merge). The checkpoint loads into any parallel layout.",
    )
    p.add_argument("--model_name_or_path", required=True, help="a local Hugging Face model directory")
    p.add_argument("--output_path", required=True, help="a new (or empty) directory for the checkpoint")
    _add_dtype_flags(p)
    p.add_argument("--overwrite_output_dir", action="store_true")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                "expert_model_parallel_size", "expert_tensor_parallel_size", "context_parallel_size"):
        p.add_argument(f"--{key}", type=int, default=None)
    ns = p.parse_args(argv)
    layout = {k: v for k, v in vars(ns).items() if k.endswith("_parallel_size") and v is not None}
    m = MegatronArguments(**layout)
    try:
        validate_megatron_args(m, int(os.environ.get("WORLD_SIZE", "1")) if os.environ.get("WORLD_SIZE") else
                               m.model_parallel_size * m.expert_model_parallel_size, ns.model_name_or_path)
        out = convert_hf_to_megatron(ns.model_name_or_path, ns.output_path, m, _dtype_from_flags(ns),
                                     ns.overwrite_output_dir)
    except (CheckpointError, McaArgumentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"converted {ns.model_name_or_path} -> {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m llamafactory_mca.export merge|convert ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("merge", "convert"):
        print("usage: python -m llamafactory_mca.export {merge,convert} ...", file=sys.stderr)
        return 2
    return (merge_command if argv[0] == "merge" else convert_command)(argv[1:])
