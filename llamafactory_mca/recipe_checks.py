"""Checks of LLaMA-Factory's own recipe keys under USE_MCA, on the raw recipe (plain values, no LLaMA-Factory import).

They catch what LLaMA-Factory accepts silently but can only be a mistake (`learning_rate: -1.0`, `cutoff_len: 0`),
values of the wrong type (our message instead of a TypeError deep inside a worker), and keys the Megatron backend
cannot honour (`fsdp`); `fp8` (LLaMA-Factory's bool, upstream's `e4m3 | hybrid`) becomes our `fp8_format`. `deepspeed` is dropped with one notice, as LLaMA-Factory's own USE_MCA mode does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from llamafactory_mca.args import McaArgumentError, coerce_value, require
from llamafactory_mca.model_config import model_type as local_model_type

# key -> (type, test of the value, what a valid value is)
_Rule = tuple[type, Callable[[Any], bool], str]
VALUE_RULES: dict[str, _Rule] = {
    "learning_rate": (float, lambda v: v > 0, "a positive number, e.g. 1.0e-5"),
    "weight_decay": (float, lambda v: v >= 0, "0 or a positive number"),
    "adam_beta1": (float, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.9"),
    "adam_beta2": (float, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.999"),
    "adam_epsilon": (float, lambda v: v > 0, "a small positive number, e.g. 1.0e-8"),
    "max_grad_norm": (float, lambda v: v >= 0, "0 (no clipping) or a positive number, e.g. 1.0"),
    "warmup_ratio": (float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "warmup_steps": (float, lambda v: v >= 0, "0 or a positive number of steps"),
    "max_steps": (int, lambda v: True, "a number of steps (-1: num_train_epochs decides)"),
    "per_device_train_batch_size": (int, lambda v: v >= 1, "1 or more"),
    "per_device_eval_batch_size": (int, lambda v: v >= 1, "1 or more"),
    "gradient_accumulation_steps": (int, lambda v: v >= 1, "1 or more"),
    "cutoff_len": (int, lambda v: v >= 1, "the maximum sequence length in tokens, e.g. 2048"),
    "logging_steps": (float, lambda v: v > 0, "a positive number of steps"),
    "save_steps": (float, lambda v: v > 0, "a positive number of steps"),
    "seed": (int, lambda v: v >= 0, "0 or a positive integer"),
    "lora_rank": (int, lambda v: v >= 1, "1 or more, e.g. 8"),
    "lora_alpha": (int, lambda v: v >= 1, "1 or more (default: 2 * lora_rank)"),
    "lora_dropout": (float, lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "val_size": (float, lambda v: v >= 0, "a fraction in [0, 1) or a number of samples"),
    "bf16": (bool, lambda v: True, "true or false"),
    "fp16": (bool, lambda v: True, "true or false"),
    "do_train": (bool, lambda v: True, "true or false"),
}
FINETUNING_TYPES = ("full", "freeze", "lora")
LF_DEFAULT_FINETUNING_TYPE = "lora"  # LLaMA-Factory's FinetuningArguments default (0.9.4 - 0.9.5)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "no", "n", "off", "0", "none", "null")
    return bool(value)


def check_stage(stage: Any, stages: list[str]) -> None:
    """McaArgumentError unless `stage` is one of the `stages` our workflows run."""
    require(stage in stages, "stage", f"'{stage}' is not supported by the Megatron backend (supported: "
            f"{', '.join(stages)})", "choose a supported stage, or run without USE_MCA to use LLaMA-Factory's "
            "own trainer")


def check_stage_options(recipe: dict[str, Any]) -> None:
    """McaArgumentError for what the rm and kto stages do not run yet under the Megatron backend."""
    stage = recipe.get("stage", "sft")
    if stage not in ("rm", "kto"):
        return
    ftype = recipe.get("finetuning_type") or LF_DEFAULT_FINETUNING_TYPE
    default = "" if recipe.get("finetuning_type") else " (LLaMA-Factory's default finetuning_type)"
    require(not (stage == "rm" and ftype == "lora"), "finetuning_type",
            f"stage rm with LoRA{default} is not supported by the Megatron backend yet (its checkpoints would not hold the value "
            "head)", "set finetuning_type: full or freeze, or run without USE_MCA")
    cp = coerce_value("context_parallel_size", recipe.get("context_parallel_size") or 1, int)
    require(cp == 1, "context_parallel_size", f"stage {stage} does not support context parallelism yet",
            "set context_parallel_size: 1 (use tensor or pipeline parallelism for long sequences)")
    for key in ("packing", "neat_packing"):
        require(not _truthy(recipe.get(key)), key, f"stage {stage} trains unpacked samples", f"set {key}: false")


# gated delta-net (linear attention) layers: models/gated_delta_net.py
HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")
GATED_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # fused as q|gate, k, v per group: no LoRA slots yet


def check_hybrid_model_options(recipe: dict[str, Any]) -> None:
    """McaArgumentError for what a hybrid linear-attention model (Qwen3-Next) does not run yet under the Megatron
    backend: packed sequences (the delta rule runs over whole rows) and LoRA on the gated attention's q/k/v
    projections (LLaMA-Factory's default `lora_target: all` includes them)."""
    model_type = local_model_type(recipe.get("model_name_or_path"))
    if model_type not in HYBRID_MODEL_TYPES:
        return
    for key in ("packing", "neat_packing"):
        require(not _truthy(recipe.get(key)), key, f"{model_type}'s linear-attention layers do not take packed "
                "sequences yet", f"set {key}: false")
    if (recipe.get("finetuning_type") or LF_DEFAULT_FINETUNING_TYPE) != "lora":
        return
    targets = [t.strip() for t in str(recipe.get("lora_target") or "all").split(",")]
    hit = [t for t in targets if t == "all" or t in GATED_ATTENTION_PROJECTIONS]
    require(not hit, "lora_target", f"{model_type}: LoRA on the gated attention's q_proj / k_proj / v_proj is not "
            f"supported by the Megatron backend yet ({', '.join(hit)})",
            "list the modules instead, e.g. lora_target: o_proj,gate_proj,up_proj,down_proj (or use "
            "finetuning_type: full)")


def check_llamafactory_keys(recipe: dict[str, Any], stages: Optional[list[str]] = None,
                            schedules: Optional[tuple] = None) -> tuple[dict[str, Any], list[str]]:
    """(recipe without the keys dropped, notices to print once) or McaArgumentError naming key and fix.

    `stages`: the stages our workflows run (None: not checked); `schedules`: the lr_scheduler_type names we run."""
    out = dict(recipe)
    notices: list[str] = []
    for key, (tp, ok, valid) in VALUE_RULES.items():
        if key not in out or out[key] is None:
            continue
        value = coerce_value(key, out[key], tp)
        require(ok(value), key, f"{out[key]!r} cannot be right", f"set {key}: {valid}")
    if out.get("num_train_epochs") is not None and coerce_value("max_steps", out.get("max_steps", -1), int) <= 0:
        epochs = coerce_value("num_train_epochs", out["num_train_epochs"], float)
        require(epochs > 0, "num_train_epochs", f"{out['num_train_epochs']!r} cannot be right",
                "set num_train_epochs: a positive number (or max_steps)")
    require(not (_truthy(out.get("bf16")) and _truthy(out.get("fp16"))), "fp16",
            "bf16 and fp16 cannot both be true", "keep one of them")
    if stages is not None:
        check_stage(out.get("stage", "sft"), stages)
    check_stage_options(out)
    check_hybrid_model_options(out)
    ftype = out.get("finetuning_type")
    if ftype is None:
        notices.append(f"`finetuning_type` is not set: LLaMA-Factory's default '{LF_DEFAULT_FINETUNING_TYPE}' runs "
                       "(LLaMA-Factory's own USE_MCA mode always trains full; set finetuning_type: full for that).")
    else:
        require(ftype in FINETUNING_TYPES, "finetuning_type", f"'{ftype}' is not supported by the Megatron backend "
                f"(supported: {', '.join(FINETUNING_TYPES)})", "set finetuning_type: full, freeze or lora, or run "
                "without USE_MCA")
    name = out.get("lr_scheduler_type")
    if schedules is not None and name is not None:
        require(name in schedules, "lr_scheduler_type", f"'{name}' cannot be used by the Megatron backend",
                f"use one of {', '.join(schedules)}")
    kwargs = out.get("lr_scheduler_kwargs")
    require(kwargs is None or isinstance(kwargs, (dict, str)), "lr_scheduler_kwargs",
            f"expects a mapping, got {kwargs!r}", "write it as a YAML mapping, e.g. lr_scheduler_kwargs: {min_lr_rate: 0.1}")
    normalize_fp8_keys(out)
    require(not _truthy(out.get("fsdp")), "fsdp", "FSDP and Megatron parallelism cannot be combined",
            "remove the fsdp key (use use_distributed_optimizer: true to shard optimizer state)")
    if "deepspeed" in out:
        value = out.pop("deepspeed")
        if _truthy(value):
            notices.append(f"`deepspeed: {value}` is ignored under USE_MCA (as in LLaMA-Factory's own Megatron mode): "
                           "Megatron's use_distributed_optimizer: true replaces DeepSpeed ZeRO (ZeRO-1-like sharding "
                           "of the optimizer state).")
    return out, notices


def normalize_fp8_keys(recipe: dict[str, Any]) -> None:
    """`fp8: true | e4m3 | hybrid` (LLaMA-Factory's bool, mcore_adapter's format) -> our `fp8_format` (true: e4m3),
    in place, so LLaMA-Factory's own FP8 path (accelerate) never sees it; LLaMA-Factory's FP8 options that this
    backend cannot honour are refused."""
    value = recipe.pop("fp8", None)
    if isinstance(value, str) and value.strip().lower() in ("e4m3", "hybrid"):
        fmt = value.strip().lower()
    elif value is None or not _truthy(value):
        fmt = None
    elif value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1")):
        fmt = "e4m3"
    else:
        raise McaArgumentError(f"`fp8`: {value!r} is not an FP8 format. Fix: set fp8: true | e4m3 | hybrid, or "
                               "remove it.")
    if fmt is not None:
        given = recipe.get("fp8_format")
        require(given in (None, fmt), "fp8_format", f"{given!r} contradicts fp8: {value}", "keep one of the two keys")
        recipe["fp8_format"] = fmt
    backend = recipe.get("fp8_backend")
    require(backend in (None, "auto", "torchao"), "fp8_backend", f"'{backend}' is not used by the Megatron backend "
            "(its FP8 GEMMs are torch's own scaled matmuls)", "remove fp8_backend")
    require(not _truthy(recipe.get("fp8_enable_fsdp_float8_all_gather")), "fp8_enable_fsdp_float8_all_gather",
            "FSDP is not used by the Megatron backend", "remove the key")
    require(recipe.get("fp8_format") is None or recipe.get("finetuning_type") != "lora", "fp8",
            "FP8 with finetuning_type: lora is not supported yet", "use finetuning_type: full or freeze, or remove fp8")


def check_sliding_window(text_config: dict[str, Any], context_parallel_size: int) -> None:
    """McaArgumentError when the model's attention has a sliding window (Mistral, Mixtral `sliding_window`) and the
    layout splits the sequence over context-parallel ranks: the window mask is not split over CP ranks yet."""
    window = text_config.get("sliding_window")
    if not window or text_config.get("use_sliding_window") is False:
        return
    require(context_parallel_size == 1, "context_parallel_size",
            f"the model attends through a sliding window (sliding_window: {window}), which is not split over "
            "context-parallel ranks yet", "set context_parallel_size: 1 (tensor/pipeline parallelism work with the "
            "window)")


def check_mla_tensor_parallel(text_config: dict[str, Any], tensor_model_parallel_size: int,
                              sequence_parallel: bool = True) -> None:
    """McaArgumentError when multi-latent attention's down projections (DeepSeek `q_lora_rank`, `kv_lora_rank` +
    `qk_rope_head_dim` rows; megatron splits them over TP) do not split evenly over the tensor-parallel ranks, or
    when TP runs without sequence parallelism (the shared rope key's gradient is only summed over the TP ranks on
    the sequence-parallel path: models/deepseek_v3.py, sequence_local_down_projection)."""
    tp = tensor_model_parallel_size
    kv_rank = text_config.get("kv_lora_rank")
    if not isinstance(kv_rank, int) or tp <= 1:
        return
    require(sequence_parallel, "sequence_parallel", f"multi-latent attention at tensor_model_parallel_size {tp} "
            "trains correctly only with sequence parallelism", "set sequence_parallel: true")
    rows = {"q_lora_rank": text_config.get("q_lora_rank"),
            "kv_lora_rank + qk_rope_head_dim": kv_rank + int(text_config.get("qk_rope_head_dim") or 0)}
    for name, value in rows.items():
        require(not isinstance(value, int) or value % tp == 0, "tensor_model_parallel_size",
                f"the model's {name} ({value}) does not split evenly over {tp} ranks (multi-latent attention's "
                "down projections are split over TP)", f"choose a tensor_model_parallel_size that divides {value}")


def check_linear_attention(text_config: dict[str, Any], tensor_model_parallel_size: int,
                           context_parallel_size: int, transformer_engine: bool = False) -> None:
    """McaArgumentError for layouts the gated delta-net layers of a hybrid model (Qwen3-Next `linear_num_key_heads`)
    cannot run: key heads not splitting over the TP ranks (TP splits them by key-head groups), context
    parallelism (the recurrence runs over the whole sequence on one rank) and Transformer Engine's layer spec
    (our GatedDeltaNet has local linears only)."""
    heads = text_config.get("linear_num_key_heads")
    if not isinstance(heads, int):
        return
    tp = tensor_model_parallel_size
    require(heads % tp == 0, "tensor_model_parallel_size",
            f"the model's {heads} linear-attention key heads (linear_num_key_heads) do not split evenly over {tp} "
            "ranks", "choose a tensor_model_parallel_size that divides linear_num_key_heads")
    require(context_parallel_size == 1, "context_parallel_size",
            "the gated delta-net (linear-attention) layers are not split over context-parallel ranks yet",
            "set context_parallel_size: 1")
    require(not transformer_engine, "transformer_impl",
            "the gated delta-net layers have no Transformer Engine implementation",
            "set transformer_impl: local (or auto) and remove attention_backend: te")
