"""A training recipe as the planner needs it: the HF config, our Megatron arguments and the workload."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

from llamafactory_mca.args import McaArgumentError, MegatronArguments, field_names
from llamafactory_mca.plan.memory import Workload


def read_recipe(path: str) -> dict:
    """The YAML (or JSON) recipe as a dict."""
    import yaml

    if not os.path.isfile(path):
        raise McaArgumentError(f"recipe {path} does not exist. Fix: pass the path of a training YAML.")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise McaArgumentError(f"recipe {path} is not a mapping of keys to values. Fix: pass a training YAML.")
    return data


def megatron_args(recipe: dict, **overrides: Any) -> MegatronArguments:
    """Our Megatron keys of the recipe (plus `overrides`) as MegatronArguments."""
    ours = field_names(MegatronArguments)
    return MegatronArguments(**{**{k: v for k, v in recipe.items() if k in ours}, **overrides})


def hf_config_of(recipe: dict) -> Any:
    """The model's HF config: a local directory, or a hub name already in the local cache (nothing is
    downloaded)."""
    from transformers import AutoConfig

    path = recipe.get("model_name_or_path")
    if not path:
        raise McaArgumentError("`model_name_or_path`: missing in the recipe. Fix: set the model to plan for.")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise McaArgumentError(
            f"`model_name_or_path`: no config.json found for {path!r} locally ({err.__class__.__name__}). Fix: "
            f"download only the config, e.g. `huggingface-cli download {path} config.json`, or pass a local "
            "directory."
        ) from None


def training_dtype(recipe: dict) -> torch.dtype:
    if recipe.get("bf16"):
        return torch.bfloat16
    if recipe.get("fp16"):
        return torch.float16
    return torch.float32


def workload_of(recipe: dict, world_size: int) -> Workload:
    """Micro-batch, sequence length, accumulation and export settings of the recipe."""
    from llamafactory_mca.models.safetensors_io import parse_size

    stage = recipe.get("stage", "sft")
    return Workload(
        world_size=world_size,
        micro_batch=int(recipe.get("per_device_train_batch_size", 8)),  # HF TrainingArguments' default
        seq_len=int(recipe.get("cutoff_len", 2048)),  # LLaMA-Factory's default
        grad_accum=int(recipe.get("gradient_accumulation_steps", 1)),
        sequences_per_sample=2 if stage in ("dpo", "kto", "rm") else 1,
        dtype_bytes=torch.empty((), dtype=training_dtype(recipe)).element_size(),
        packing=bool(recipe.get("packing") or recipe.get("neat_packing")),
        max_shard_size=parse_size(str(recipe.get("export_size", "5GB"))),
        save_hf_model=bool(recipe.get("save_hf_model", True)) and recipe.get("finetuning_type", "lora") != "lora",
    )


def freeze_rule(recipe: dict) -> Optional[Callable[[Any, list], Any]]:
    """LLaMA-Factory's full-tuning freezing of vision-language models (vision tower, projector) applied to the
    meta model, or None."""
    if recipe.get("finetuning_type", "lora") != "full":
        return None
    from llamafactory_mca.training.multimodal import apply_full_tuning_freeze

    args = SimpleNamespace(freeze_vision_tower=recipe.get("freeze_vision_tower", True),
                           freeze_multi_modal_projector=recipe.get("freeze_multi_modal_projector", True),
                           freeze_language_model=recipe.get("freeze_language_model", False))
    return lambda bridge, chunks: apply_full_tuning_freeze(bridge, chunks, args)


def recipe_lines(m: MegatronArguments, recipe: Optional[dict] = None) -> list[str]:
    """The `key: value` lines to paste for `m`: every parallel size, and each other key that differs from the
    defaults (or from `recipe`)."""
    base = {f.name: f.default for f in dataclasses.fields(MegatronArguments)}
    base.update({k: v for k, v in (recipe or {}).items() if k in base})
    lines = []
    for f in dataclasses.fields(m):
        v = getattr(m, f.name)
        if v != base[f.name] or (f.name.endswith("_parallel_size") and v is not None):
            lines.append(f"{f.name}: {str(v).lower() if isinstance(v, bool) else ('null' if v is None else v)}")
    return lines


__all__ = ["freeze_rule", "hf_config_of", "megatron_args", "read_recipe", "recipe_lines", "training_dtype",
           "workload_of"]
