"""Shared pieces of merge, LoRA merge and convert: output directories (checked, written hidden, published by
one rename), the Hugging Face config and bridge of a directory, the saved dtype."""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch

from llamafactory_mca.checkpoint import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """Refuse to write into a non-empty directory (or over a file) unless `overwrite`."""
    if os.path.isfile(path):
        raise CheckpointError(f"output path {path} is an existing file. Fix: choose a directory path that does not exist.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise CheckpointError(
            f"output path {path} exists and is not empty; writing there would overwrite or mix files. Fix: choose a "
            f"new directory, delete {path}, or pass --overwrite_output_dir."
        )


def bridge_for_config(hf_config: Any, where: str):
    """The model bridge of `hf_config`; CheckpointError naming `where` if no plugin has one."""
    from llamafactory_mca.models import get_bridge

    try:
        return get_bridge(hf_config)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


def hf_config_of_dir(path: str):
    """The Hugging Face config saved in directory `path`; CheckpointError with a fix if there is none."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"{path} has no config.json, so its model family is unknown. Fix: save checkpoints with llamafactory-mca "
            f">= 0.1 (it stores the Hugging Face config), or copy the base model's config.json into {path}."
        )
    return AutoConfig.from_pretrained(path)


def config_dtype(hf_config: Any, default: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype a Hugging Face config declares (`dtype` / `torch_dtype`, a string or a torch.dtype), else
    `default`: the one resolution of the saved dtype of merge, LoRA merge and convert."""
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype, None)
    return cfg_dtype if isinstance(cfg_dtype, torch.dtype) else default


def fresh_tmp(output_path: str) -> str:
    """The hidden sibling directory an output is written into before `publish` renames it."""
    parent = os.path.dirname(output_path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_path)}.tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def copy_tokenizer(checkpoint_path: str, tmp: str) -> None:
    """Copy the tokenizer / processor / generation-config files of `checkpoint_path` into `tmp`."""
    for name in TOKENIZER_FILES:
        src = os.path.join(checkpoint_path, name)
        if os.path.isfile(src) and not (name == "generation_config.json" and os.path.exists(os.path.join(tmp, name))):
            shutil.copy2(src, os.path.join(tmp, name))


def publish(tmp: str, output_path: str) -> None:
    """Replace `output_path` (empty, or overwrite was asked for) by the finished `tmp` in one rename."""
    if os.path.exists(output_path):  # empty, or overwrite was asked for
        shutil.rmtree(output_path)
    os.rename(tmp, output_path)
