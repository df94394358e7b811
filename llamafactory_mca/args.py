"""Megatron arguments: the extra keys of a training recipe, and their validation.

Every error raised here names the key and the fix, and is raised before any model is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from llamafactory_mca.hookspecs import hookimpl


class McaArgumentError(ValueError):
    """A recipe key has a value our backend cannot run with; the message names the key and the fix."""


@dataclass
class MegatronArguments:
    """Megatron-core settings, given in the same YAML / `key=value` overrides as LLaMA-Factory's arguments."""

    # --- parallel layout -------------------------------------------------------------------------------
    tensor_model_parallel_size: int = field(default=1, metadata={"help": "Tensor parallel size (TP)."})
    pipeline_model_parallel_size: int = field(default=1, metadata={"help": "Pipeline parallel size (PP)."})
    virtual_pipeline_model_parallel_size: Optional[int] = field(
        default=None, metadata={"help": "Model chunks per pipeline rank (interleaved 1F1B, VPP). Needs PP > 1."}
    )
    expert_model_parallel_size: int = field(default=1, metadata={"help": "Expert parallel size (EP), MoE only."})
    expert_tensor_parallel_size: Optional[int] = field(
        default=None, metadata={"help": "Tensor parallel size inside experts; default: tensor_model_parallel_size."}
    )
    context_parallel_size: int = field(default=1, metadata={"help": "Context parallel size (CP), long sequences."})
    sequence_parallel: bool = field(default=False, metadata={"help": "Sequence parallel inside TP (needs TP > 1)."})
    num_layers_in_first_pipeline_stage: Optional[int] = field(
        default=None, metadata={"help": "Layers on the first pipeline stage (uneven split)."}
    )
    num_layers_in_last_pipeline_stage: Optional[int] = field(
        default=None, metadata={"help": "Layers on the last pipeline stage (uneven split)."}
    )
    # --- memory -------------------------------------------------------------------------------------------
    recompute_granularity: Optional[Literal["full", "selective"]] = field(
        default=None, metadata={"help": "Activation recompute: 'full' (whole layers) or 'selective'."}
    )
    recompute_method: Optional[Literal["uniform", "block"]] = field(
        default=None, metadata={"help": "For full recompute: 'uniform' or 'block'; default 'uniform'."}
    )
    recompute_num_layers: Optional[int] = field(
        default=None, metadata={"help": "For full recompute: layers per recompute unit; default 1."}
    )
    recompute_modules: Optional[str] = field(
        default=None, metadata={"help": "For selective recompute: comma-separated modules, e.g. 'core_attn,mlp'."}
    )
    moe_layer_recompute: bool = field(default=False, metadata={"help": "Recompute the MoE layer in backward."})
    # --- MoE ----------------------------------------------------------------------------------------------
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = field(
        default="alltoall", metadata={"help": "How tokens reach their experts: 'alltoall' or 'allgather'."}
    )
    moe_grouped_gemm: bool = field(
        default=True, metadata={"help": "One grouped GEMM for all local experts instead of a loop over experts."}
    )
    moe_router_topk: Optional[int] = field(default=None, metadata={"help": "Experts per token; default: HF config."})
    moe_router_load_balancing_type: str = field(
        default="aux_loss", metadata={"help": "'aux_loss', 'seq_aux_loss', 'global_aux_loss' or 'none'."}
    )
    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = field(
        default="fp32", metadata={"help": "Router computation dtype."}
    )
    moe_router_pre_softmax: Optional[bool] = field(
        default=None, metadata={"help": "Softmax before top-k; default: what the HF model family does."}
    )
    moe_aux_loss_coeff: Optional[float] = field(
        default=None,
        metadata={"help": "Load-balancing loss weight; default: LLaMA-Factory's moe_aux_loss_coef, else no aux loss."},
    )
    moe_z_loss_coeff: Optional[float] = field(default=None, metadata={"help": "Router z-loss weight."})
    moe_expert_capacity_factor: Optional[float] = field(
        default=None, metadata={"help": "Token-drop capacity factor; None keeps every token (as HF does)."}
    )
    moe_shared_expert_overlap: bool = field(
        default=False, metadata={"help": "Overlap shared-expert compute with token dispatch."}
    )
    moe_permute_fusion: bool = field(default=False, metadata={"help": "Fused token permutation (needs TE)."})
    # --- data-parallel, optimizer ---------------------------------------------------------------------------
    use_distributed_optimizer: bool = field(
        default=False, metadata={"help": "Shard optimizer state across data-parallel ranks (ZeRO-1)."}
    )
    overlap_grad_reduce: bool = field(default=False, metadata={"help": "Overlap gradient reduce with backward."})
    overlap_param_gather: bool = field(
        default=False, metadata={"help": "Overlap parameter all-gather with forward (distributed optimizer)."}
    )
    accumulate_allreduce_grads_in_fp32: bool = field(
        default=True, metadata={"help": "Keep the main gradient buffer in fp32 under bf16/fp16."}
    )
    # --- fusions and kernels ----------------------------------------------------------------------------------
    bias_activation_fusion: bool = field(
        default=True, metadata={"help": "Fused bias + SwiGLU/GeLU (GPU; needs no TE). Off on CPU."}
    )
    apply_rope_fusion: bool = field(default=False, metadata={"help": "Fused rotary embedding kernel."})
    bias_dropout_fusion: bool = field(default=False, metadata={"help": "Fused bias + dropout + residual add."})
    masked_softmax_fusion: bool = field(default=False, metadata={"help": "Fused masked softmax (local attention)."})
    gradient_accumulation_fusion: bool = field(
        default=True,
        metadata={"help": "Accumulate weight gradients into the fp32 main_grad inside the GEMM (TE, Apex, or torch's "
                          "addmm with out_dtype on CUDA; off on CPU)."},
    )
    cross_entropy_loss_fusion: bool = field(default=False, metadata={"help": "Fused vocab-parallel cross entropy."})
    attention_backend: Literal["auto", "sdpa", "local", "te"] = field(
        default="auto",
        metadata={"help": "Core attention: 'auto' (TE if importable, else sdpa), 'sdpa', 'local' or 'te'."},
    )
    transformer_impl: Literal["auto", "transformer_engine", "local"] = field(
        default="auto", metadata={"help": "Layer modules: Transformer Engine if importable ('auto'), or 'local'."}
    )
    # --- run ---------------------------------------------------------------------------------------------------
    save_hf_model: bool = field(
        default=True, metadata={"help": "Write a Hugging Face model into output_dir when training ends."}
    )
    distributed_timeout_minutes: int = field(default=30, metadata={"help": "Timeout of collective operations."})

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size


def field_names(*dataclass_types: type) -> set[str]:
    return {f.name for dc in dataclass_types for f in fields(dc)}


def global_batch_size(mca_args: MegatronArguments, world_size: int, per_device: int, grad_accum: int) -> int:
    """Samples per optimizer step: (world_size // (tp*pp*cp)) * per_device_train_batch_size * grad_accum."""
    return mca_args.data_parallel_size(world_size) * per_device * grad_accum


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise McaArgumentError(f"`{key}`: {problem}. Fix: {fix}.")


def _local_config(model_path: Optional[str]) -> Optional[dict]:
    """A local HF config.json (None for hub ids), so layout errors show up before any model is built."""
    if not model_path:
        return None
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _num_layers(model_path: Optional[str]) -> Optional[int]:
    """Layer count from a local HF config.json."""
    config = _local_config(model_path)
    if config is None:
        return None
    config = config.get("text_config", config)
    return config.get("num_hidden_layers")


def _model_type(model_path: Optional[str]) -> Optional[str]:
    config = _local_config(model_path)
    return config.get("model_type") if config else None


from llamafactory_mca.models.model_state import MULTIMODAL_MODEL_TYPES  # noqa: E402  (the one list)


def validate_megatron_args(m: MegatronArguments, world_size: int, model_path: Optional[str] = None) -> None:
    """Raise McaArgumentError for the first setting that cannot run; see the class for each key."""
    for key in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "context_parallel_size",
    ):
        _require(getattr(m, key) >= 1, key, f"must be >= 1, got {getattr(m, key)}", f"set {key}: 1 or more")
    tp, pp, cp, ep = (
        m.tensor_model_parallel_size,
        m.pipeline_model_parallel_size,
        m.context_parallel_size,
        m.expert_model_parallel_size,
    )
    _require(
        world_size % (tp * pp * cp) == 0,
        "tensor_model_parallel_size",
        f"tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp} does not divide the world size {world_size}",
        "choose tensor/pipeline/context_parallel_size whose product divides the number of processes "
        "(NPROC_PER_NODE * NNODES)",
    )
    etp = m.expert_tensor_parallel_size or tp
    _require(
        world_size % (etp * ep * pp) == 0,
        "expert_model_parallel_size",
        f"expert_tensor_parallel_size*expert_model_parallel_size*pp = {etp}*{ep}*{pp} does not divide the "
        f"world size {world_size}",
        "choose expert_model_parallel_size so that experts fit inside the data-parallel ranks of each stage",
    )
    _require(
        not m.sequence_parallel or tp > 1,
        "sequence_parallel",
        "needs tensor_model_parallel_size > 1",
        "set sequence_parallel: false, or tensor_model_parallel_size >= 2",
    )
    _require(
        cp == 1 or m.attention_backend != "local",
        "attention_backend",
        "'local' (megatron's DotProductAttention) does not support context parallelism",
        "set attention_backend: auto (or sdpa / te), or context_parallel_size: 1",
    )
    model_type = _model_type(model_path)
    _require(
        cp == 1 or model_type not in MULTIMODAL_MODEL_TYPES,
        "context_parallel_size",
        f"context parallelism is not supported for {model_type} models yet (image tokens are merged into the "
        "sequence before it could be split)",
        "set context_parallel_size: 1 (use tensor/pipeline parallelism for long multimodal sequences)",
    )
    vpp = m.virtual_pipeline_model_parallel_size
    if vpp is not None:
        _require(vpp >= 1, "virtual_pipeline_model_parallel_size", f"must be >= 1, got {vpp}", "remove it or set 2+")
        _require(
            pp > 1 or vpp == 1,
            "virtual_pipeline_model_parallel_size",
            "needs pipeline_model_parallel_size > 1",
            "remove virtual_pipeline_model_parallel_size, or set pipeline_model_parallel_size >= 2",
        )
    layers = _num_layers(model_path)
    if layers is not None and m.num_layers_in_first_pipeline_stage is None and m.num_layers_in_last_pipeline_stage is None:
        chunks = pp * (vpp or 1)
        _require(
            layers % chunks == 0,
            "virtual_pipeline_model_parallel_size" if vpp else "pipeline_model_parallel_size",
            f"the model's {layers} layers do not split evenly into pp*vpp = {chunks} chunks",
            "choose pipeline/virtual_pipeline_model_parallel_size whose product divides the layer count, or set "
            "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage",
        )
    _require(
        not m.overlap_param_gather or m.use_distributed_optimizer,
        "overlap_param_gather",
        "needs the distributed optimizer",
        "set use_distributed_optimizer: true, or overlap_param_gather: false",
    )
    _require(
        not m.overlap_param_gather or m.overlap_grad_reduce,
        "overlap_param_gather",
        "needs overlap_grad_reduce",
        "set overlap_grad_reduce: true as well",
    )
    _require(
        m.recompute_granularity is not None or (m.recompute_method is None and m.recompute_num_layers is None),
        "recompute_method",
        "has no effect without recompute_granularity",
        "set recompute_granularity: full, or remove recompute_method / recompute_num_layers",
    )
    _require(
        m.recompute_granularity != "selective" or m.recompute_method is None,
        "recompute_method",
        "only applies to recompute_granularity: full",
        "remove recompute_method, or use recompute_granularity: full",
    )
    _require(
        m.moe_token_dispatcher_type != "flex",
        "moe_token_dispatcher_type",
        "'flex' needs DeepEP, which this backend does not support",
        "use moe_token_dispatcher_type: alltoall",
    )
    _require(
        m.distributed_timeout_minutes > 0,
        "distributed_timeout_minutes",
        "must be positive",
        "set it to the number of minutes a collective may wait, e.g. 30",
    )


# --------------------------------------------------------------------------------------------- hooks


@hookimpl
def mca_argument_dataclasses() -> list[type]:
    return [MegatronArguments]


@hookimpl
def mca_validate_args(mca_args: dict[type, Any], lf_args: tuple, world_size: int) -> None:
    """What needs LLaMA-Factory's parsed arguments; the Megatron keys were checked before that parse."""
    _model_args, _data_args, training_args, finetuning_args, _generating_args = lf_args
    ftype = finetuning_args.finetuning_type
    _require(
        ftype in ("full", "freeze", "lora"),
        "finetuning_type",
        f"'{ftype}' is not supported by the Megatron backend (supported: full, freeze, lora)",
        "set finetuning_type: full, freeze or lora, or run without USE_MCA",
    )
    if ftype == "lora":
        for key, bad in (("use_dora", finetuning_args.use_dora), ("pissa_init", finetuning_args.pissa_init),
                         ("use_llama_pro", finetuning_args.use_llama_pro),
                         ("additional_target", finetuning_args.additional_target),
                         ("quantization_bit", getattr(_model_args, "quantization_bit", None))):
            _require(not bad, key, "is not supported with LoRA by the Megatron backend",
                     f"remove {key}, or run without USE_MCA")
        _require(not finetuning_args.create_new_adapter, "create_new_adapter",
                 "is not supported by the Megatron backend", "remove create_new_adapter")
        adapters = getattr(_model_args, "adapter_name_or_path", None) or []
        _require(len(adapters) <= 1, "adapter_name_or_path",
                 "the Megatron backend resumes one LoRA adapter and merges none",
                 "merge the other adapters first (llamafactory-cli export) and pass one adapter")
    data_args = _data_args
    model_type = _model_type(getattr(_model_args, "model_name_or_path", None))
    if model_type in MULTIMODAL_MODEL_TYPES:
        _require(not (data_args.packing or data_args.neat_packing), "packing",
                 f"packing is not supported for {model_type} by the Megatron backend yet",
                 "set packing: false and neat_packing: false")
        _require(ftype == "full", "finetuning_type",
                 f"only full fine-tuning is supported for {model_type} by the Megatron backend yet",
                 "set finetuning_type: full (freeze_vision_tower / freeze_multi_modal_projector / "
                 "freeze_language_model select what trains)")
    if ftype == "freeze":
        _require(not finetuning_args.use_llama_pro, "use_llama_pro",
                 "is not supported by the Megatron backend", "remove use_llama_pro")
    if finetuning_args.stage == "dpo":
        _require(finetuning_args.pref_loss in ("sigmoid", "ipo", "orpo", "simpo"), "pref_loss",
                 f"'{finetuning_args.pref_loss}' is not supported by the Megatron backend",
                 "use pref_loss: sigmoid, ipo, orpo or simpo")
        _require(finetuning_args.pref_bco_weight < 1e-6, "pref_bco_weight",
                 "BCO is not supported by the Megatron backend", "set pref_bco_weight: 0")
        _require(finetuning_args.ld_alpha is None, "ld_alpha",
                 "LD-DPO is not supported by the Megatron backend", "remove ld_alpha")
        _require(not (ftype == "lora" and finetuning_args.ref_model), "ref_model",
                 "with LoRA the reference model is the base model with the adapter disabled",
                 "remove ref_model, or use finetuning_type: full/freeze")
        _require(not finetuning_args.ref_model_adapters, "ref_model_adapters",
                 "is not supported by the Megatron backend", "merge the adapters into ref_model first")
    _require(
        not getattr(training_args, "deepspeed", None),
        "deepspeed",
        "DeepSpeed and Megatron parallelism cannot be combined",
        "remove the deepspeed key (use use_distributed_optimizer for ZeRO-1-like sharding)",
    )
    _require(
        not getattr(training_args, "fsdp", None),
        "fsdp",
        "FSDP and Megatron parallelism cannot be combined",
        "remove the fsdp key",
    )
    _check_resume(training_args)


def _check_resume(training_args: Any) -> None:
    """Refuse a save_only_model checkpoint as resume_from_checkpoint (given in the recipe, or picked from output_dir
    by LLaMA-Factory's automatic resume) now, before any model is built; the trainer's load refuses it too."""
    path = getattr(training_args, "resume_from_checkpoint", None)
    if not (getattr(training_args, "do_train", False) and isinstance(path, str) and path):
        return
    from llamafactory_mca.checkpoint import check_resumable, is_megatron_checkpoint

    if is_megatron_checkpoint(path):  # anything else gets load_checkpoint's own error, naming its fix
        check_resumable(path)


# --------------------------------------------------------------------------------------------- parsing


def _lf_train_dataclasses() -> list[type]:
    from llamafactory.hparams import parser as lf_parser

    return list(lf_parser._TRAIN_ARGS)


def mca_dataclasses() -> list[type]:
    """Our argument dataclasses and those of every plugin, checked for clashes with LLaMA-Factory's keys."""
    from llamafactory_mca.plugins import flat, hook

    types = flat(hook().mca_argument_dataclasses())
    clash = field_names(*types) & field_names(*_lf_train_dataclasses())
    if clash:
        raise McaArgumentError(
            f"argument dataclasses of llamafactory-mca plugins redefine LLaMA-Factory keys: {sorted(clash)}. "
            "Fix: rename those fields in the plugin."
        )
    return types


def print_help_and_exit() -> None:
    """`llamafactory-cli train -h` under USE_MCA: LLaMA-Factory's options followed by ours."""
    from transformers import HfArgumentParser

    HfArgumentParser(_lf_train_dataclasses() + mca_dataclasses()).parse_args_into_dataclasses(["-h"])


def _split(args: dict[str, Any] | list[str], types: list[type]) -> tuple[dict[type, Any], Any]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(types)
    if isinstance(args, dict):
        ours = field_names(*types)
        known = ours | field_names(*_lf_train_dataclasses())
        unknown = [k for k in args if k not in known]
        if unknown and os.environ.get("ALLOW_EXTRA_ARGS", "").lower() not in ("1", "true"):
            import difflib

            hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
            detail = "; ".join(f"`{k}`" + (f" (did you mean `{h[0]}`?)" if h else "") for k, h in hints.items())
            raise McaArgumentError(
                f"unknown key(s) in the training recipe: {detail}. Fix: correct or remove them; "
                "`llamafactory-cli train -h` lists every key."
            )
        parsed = parser.parse_dict({k: v for k, v in args.items() if k in ours})
        rest = {k: v for k, v in args.items() if k not in ours}
    else:
        *parsed, rest = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    return {type(p): p for p in parsed}, rest


def parse_train_args(args: dict[str, Any] | list[str] | None = None) -> tuple[dict[type, Any], tuple]:
    """Parse a recipe into (our dataclasses by type, LLaMA-Factory's 5-tuple) and validate both.

    Our keys are split off first, the rest goes through LLaMA-Factory's own `get_train_args` untouched.
    """
    from llamafactory.hparams import get_train_args, read_args

    from llamafactory_mca.plugins import flat, hook

    args = read_args(args)
    if isinstance(args, list) and ("-h" in args or "--help" in args):
        print_help_and_exit()
    if isinstance(args, dict):
        args = dict(args)
    mca_args, rest = _split(args, mca_dataclasses())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Checked on the raw recipe, before LLaMA-Factory's parse (which already sets up torch.distributed and
    # raises its own stage-specific errors, e.g. for PPO).
    stage = _raw_value(rest, "stage", "sft")
    stages = flat(hook().mca_supported_stages())
    _require(
        stage in stages,
        "stage",
        f"'{stage}' is not supported by the Megatron backend (supported: {', '.join(stages)})",
        "choose a supported stage, or run without USE_MCA to use LLaMA-Factory's own trainer",
    )
    if MegatronArguments in mca_args:
        validate_megatron_args(mca_args[MegatronArguments], world_size, _raw_value(rest, "model_name_or_path"))
    lf_args = get_train_args(rest)
    hook().mca_validate_args(mca_args=mca_args, lf_args=lf_args, world_size=world_size)
    return mca_args, lf_args


def _raw_value(args: dict[str, Any] | list[str], key: str, default: Any = None) -> Any:
    """A key's value from a recipe dict or a `--key value` / `--key=value` list, before any parsing."""
    if isinstance(args, dict):
        return args.get(key, default)
    flag = f"--{key}"
    for i, item in enumerate(args):
        if item == flag and i + 1 < len(args):
            return args[i + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return default
