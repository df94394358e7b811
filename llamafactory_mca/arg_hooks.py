"""Hook implementations for the arguments: our dataclass, and the checks that need LLaMA-Factory's parsed
arguments (finetuning method, model family, stage options, resume), made before anything is built."""

from __future__ import annotations

from typing import Any

from llamafactory_mca.args import MegatronArguments, require
from llamafactory_mca.hookspecs import hookimpl
from llamafactory_mca.model_config import model_type as local_model_type
from llamafactory_mca.model_config import num_experts, read_local_config, text_config
from llamafactory_mca.models.families import MULTIMODAL_MODEL_TYPES
from llamafactory_mca.plan.options import PlanArguments
from llamafactory_mca.recipe_checks import FINETUNING_TYPES


@hookimpl
def mca_argument_dataclasses() -> list[type]:
    return [MegatronArguments, PlanArguments]


@hookimpl
def mca_validate_args(mca_args: dict[type, Any], lf_args: tuple, world_size: int) -> None:
    """What needs LLaMA-Factory's parsed arguments; the Megatron keys were checked before that parse."""
    model_args, data_args, training_args, finetuning_args, _generating_args = lf_args
    ftype = finetuning_args.finetuning_type
    require(
        ftype in FINETUNING_TYPES,
        "finetuning_type",
        f"'{ftype}' is not supported by the Megatron backend (supported: full, freeze, lora)",
        "set finetuning_type: full, freeze or lora, or run without USE_MCA",
    )
    if ftype == "lora":
        check_lora(model_args, finetuning_args)
    check_model_family(model_args, data_args, ftype)
    if ftype == "freeze":
        require(not finetuning_args.use_llama_pro, "use_llama_pro",
                "is not supported by the Megatron backend", "remove use_llama_pro")
    if finetuning_args.stage == "dpo":
        check_dpo(finetuning_args, ftype)
    if finetuning_args.stage == "kto":
        check_reference_model(finetuning_args, ftype)
    require(
        not getattr(training_args, "deepspeed", None),
        "deepspeed",
        "DeepSpeed and Megatron parallelism cannot be combined",
        "remove the deepspeed key (use use_distributed_optimizer for ZeRO-1-like sharding)",
    )
    require(
        not getattr(training_args, "fsdp", None),
        "fsdp",
        "FSDP and Megatron parallelism cannot be combined",
        "remove the fsdp key",
    )
    check_resume(training_args)
    from llamafactory_mca.upstream_checkpoint import check_training_paths

    check_training_paths(model_args.model_name_or_path,
                         training_args.resume_from_checkpoint if training_args.do_train else None,
                         training_args.output_dir)


def check_lora(model_args: Any, finetuning_args: Any) -> None:
    """LoRA options the Megatron backend does not implement (DoRA runs on the dense linears, without dropout; expert
    adapters have no dropout, as PEFT's)."""
    dropout = float(getattr(finetuning_args, "lora_dropout", 0.0) or 0.0)
    require(not (finetuning_args.use_dora and dropout > 0), "lora_dropout",
            "DoRA with dropout is not supported by the Megatron backend", "set lora_dropout: 0, or use_dora: false")
    config = read_local_config(getattr(model_args, "model_name_or_path", None))
    targets = [t.strip() for t in (finetuning_args.lora_target or []) if isinstance(t, str)]
    experts = bool(config and num_experts(text_config(config))) and any(
        t in ("all", "experts", "mlp.experts.gate_up_proj", "mlp.experts.down_proj") for t in targets)
    if experts and not getattr(model_args, "adapter_name_or_path", None):
        require(dropout == 0, "lora_dropout", "LoRA on MoE experts has no dropout (as PEFT's target_parameters)",
                "set lora_dropout: 0, or list the attention modules in lora_target (e.g. q_proj,k_proj,v_proj,o_proj)")
        require(not finetuning_args.use_dora, "use_dora", "DoRA is not available for MoE experts (nor in PEFT)",
                "set use_dora: false, or list the attention modules in lora_target (e.g. q_proj,k_proj,v_proj,o_proj)")
    for key, bad in (("pissa_init", finetuning_args.pissa_init),
                     ("use_llama_pro", finetuning_args.use_llama_pro),
                     ("additional_target", finetuning_args.additional_target),
                     ("quantization_bit", getattr(model_args, "quantization_bit", None))):
        require(not bad, key, "is not supported with LoRA by the Megatron backend",
                f"remove {key}, or run without USE_MCA")
    require(not finetuning_args.create_new_adapter, "create_new_adapter",
            "is not supported by the Megatron backend", "remove create_new_adapter")
    adapters = getattr(model_args, "adapter_name_or_path", None) or []
    require(len(adapters) <= 1, "adapter_name_or_path",
            "the Megatron backend resumes one LoRA adapter and merges none",
            "merge the other adapters first (llamafactory-cli export) and pass one adapter")


def check_model_family(model_args: Any, data_args: Any, ftype: str) -> None:
    """Rules of the model family read from the local config.json (vision-language models)."""
    model_type = local_model_type(getattr(model_args, "model_name_or_path", None))
    if model_type in MULTIMODAL_MODEL_TYPES:  # packing / neat_packing run (per-sample mRoPE: training/multimodal)
        require(ftype == "full", "finetuning_type",
                f"only full fine-tuning is supported for {model_type} by the Megatron backend yet",
                "set finetuning_type: full (freeze_vision_tower / freeze_multi_modal_projector / "
                "freeze_language_model select what trains)")


def check_dpo(finetuning_args: Any, ftype: str) -> None:
    """DPO options the Megatron backend does not implement."""
    require(finetuning_args.pref_loss in ("sigmoid", "ipo", "orpo", "simpo"), "pref_loss",
            f"'{finetuning_args.pref_loss}' is not supported by the Megatron backend",
            "use pref_loss: sigmoid, ipo, orpo or simpo")
    require(finetuning_args.pref_bco_weight < 1e-6, "pref_bco_weight",
            "BCO is not supported by the Megatron backend", "set pref_bco_weight: 0")
    require(finetuning_args.ld_alpha is None, "ld_alpha",
            "LD-DPO is not supported by the Megatron backend", "remove ld_alpha")
    check_reference_model(finetuning_args, ftype)


def check_reference_model(finetuning_args: Any, ftype: str) -> None:
    """Reference-model options (dpo, kto) the Megatron backend does not implement."""
    require(not (ftype == "lora" and finetuning_args.ref_model), "ref_model",
            "with LoRA the reference model is the base model with the adapter disabled",
            "remove ref_model, or use finetuning_type: full/freeze")
    require(not finetuning_args.ref_model_adapters, "ref_model_adapters",
            "is not supported by the Megatron backend", "merge the adapters into ref_model first")


def check_resume(training_args: Any) -> None:
    """Refuse a save_only_model checkpoint as resume_from_checkpoint (given in the recipe, or picked from output_dir
    by LLaMA-Factory's automatic resume) now, before any model is built; the trainer's load refuses it too."""
    path = getattr(training_args, "resume_from_checkpoint", None)
    if not (getattr(training_args, "do_train", False) and isinstance(path, str) and path):
        return
    from llamafactory_mca.checkpoint import check_resumable, is_megatron_checkpoint

    if is_megatron_checkpoint(path):  # anything else gets load_checkpoint's own error, naming its fix
        check_resumable(path)
