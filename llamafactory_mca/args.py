"""Megatron arguments: the extra keys of a training recipe as plain data, their types and their validation.

Nothing here imports torch, megatron-core or LLaMA-Factory, so the launching process checks a recipe in a
fraction of a second, before torchrun starts. Every error names the key and the fix.
Host-side parsing lives in `parsing.py`, the checks against the model's config.json in `model_config.py`, the
hook implementations in `arg_hooks.py`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from llamafactory_mca import model_config


class McaArgumentError(ValueError):
    """A recipe key has a value our backend cannot run with; the message names the key and the fix."""


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    """Raise McaArgumentError "`key`: problem. Fix: fix." unless `ok`."""
    if not ok:
        raise McaArgumentError(f"`{key}`: {problem}. Fix: {fix}.")


# FP8 training (kernels/fp8.py): the formats of `fp8` / `fp8_format` and the scaling recipes
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "rowwise", "blockwise")

# megatron-core 0.16's TransformerConfig.recompute_modules choices
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")




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
        default=None,
        metadata={"help": "For selective recompute: modules as a comma-separated string or a YAML list, e.g. "
                          "'core_attn,mlp' (choices: " + ", ".join(RECOMPUTE_MODULES) + ")."},
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
    ddp_bucket_size: Optional[int] = field(
        default=None,
        metadata={"help": "Parameters per gradient-reduce bucket; default: megatron's max(40M, 1M * dp_size)."},
    )
    check_for_nan_in_loss_and_grad: bool = field(
        default=False,
        metadata={"help": "Stop at the first step whose loss or gradients are NaN/Inf, naming the step (no checkpoint "
                          "is written from that state)."},
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
    apply_rope_fusion: bool = field(
        default=True,
        metadata={"help": "Rotary embedding in one kernel forward and one backward: Transformer Engine's with its "
                          "layer spec, otherwise ours (torch.compile, checked on the GPU; off on CPU)."},
    )
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
        metadata={"help": "Core attention: 'auto' (sdpa; TE's with transformer_impl: transformer_engine), 'sdpa', "
                          "'local' or 'te' (experimental: the Transformer Engine layer spec)."},
    )
    transformer_impl: Literal["auto", "transformer_engine", "local"] = field(
        default="auto",
        metadata={"help": "Layer modules: 'auto' and 'local' use megatron's local modules with our kernels (the tested "
                          "path); 'transformer_engine' (experimental, opt-in) uses the Transformer Engine layer spec."},
    )
    cuda_graph_impl: Literal["none", "local"] = field(
        default="none",
        metadata={"help": "'local': CUDA graphs of each transformer layer's forward and backward (megatron-core's "
                          "local implementation, no Transformer Engine needed), captured after the first step and "
                          "replayed for every micro-batch: fewer kernel launches from the host. GPU only; stage pt "
                          "(micro-batches of one shape), one model-parallel rank (tp = pp = cp = 1), dense models, "
                          "no recompute, no LoRA, no FP8, no evaluation. 'none' (default): no graphs."},
    )
    # --- FP8 ---------------------------------------------------------------------------------------------------
    fp8_format: Optional[str] = field(
        default=None,
        metadata={"help": "FP8 GEMMs in the transformer layers (Hopper GPUs, no Transformer Engine needed): 'e4m3', or "
                          "'hybrid' (e5m2 output gradients; tensorwise only). Usually written `fp8: true | e4m3 | "
                          "hybrid` (true: e4m3). Weights, optimizer and checkpoints stay bf16/fp32."},
    )
    fp8_recipe: Optional[str] = field(
        default=None,
        metadata={"help": "FP8 scaling: 'tensorwise' (default), 'rowwise' or 'blockwise' (1x128 / 128x128 blocks); "
                          "dynamic per-rank scales."},
    )
    # --- run ---------------------------------------------------------------------------------------------------
    save_hf_model: bool = field(
        default=True, metadata={"help": "Write a Hugging Face model into output_dir when training ends."}
    )
    distributed_timeout_minutes: int = field(default=30, metadata={"help": "Timeout of collective operations."})
    save_on_signal: str = field(
        default="SIGTERM,SIGUSR1",
        metadata={"help": "Signals (a comma-separated string or a YAML list; 'none': off) on which every rank finishes "
                          "the step, saves a checkpoint and exits 0."},
    )
    loss_weighting: Literal["auto", "token", "micro_batch", "sample"] = field(
        default="auto",
        metadata={"help": "How the token losses of a global batch are weighted: 'auto' (as LLaMA-Factory's HF path "
                          "for this model), 'token', 'micro_batch' or 'sample'."},
    )

    @property
    def model_parallel_size(self) -> int:
        """tp * pp * cp: the ranks that hold one model replica."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size of `world_size` ranks under this layout."""
        return world_size // self.model_parallel_size


def field_names(*dataclass_types: type) -> set[str]:
    """Every field name of the given dataclass types."""
    return {f.name for dc in dataclass_types for f in fields(dc)}


def global_batch_size(mca_args: MegatronArguments, world_size: int, per_device: int, grad_accum: int) -> int:
    """Samples per optimizer step: (world_size // (tp*pp*cp)) * per_device_train_batch_size * grad_accum."""
    return mca_args.data_parallel_size(world_size) * per_device * grad_accum


# --------------------------------------------------------------------------------------------- value types

_TRUE = ("true", "yes", "y", "on", "1")
_FALSE = ("false", "no", "n", "off", "0")


def _type_word(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    return "a string"


def coerce_value(key: str, value: Any, annotation: Any) -> Any:
    """`value` of recipe key `key` as the type `annotation` (int, float, bool, str, Literal, Optional of these;
    other types pass the value through), or McaArgumentError naming the key, the expected type and the value."""
    origin, targs = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        if value is None and type(None) in targs:
            return None
        inner = [a for a in targs if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
        origin, targs = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        text = value.value if hasattr(value, "value") else value
        require(text in targs, key, f"{value!r} is not one of {', '.join(repr(c) for c in targs)}",
                f"set {key}: " + " | ".join(str(c) for c in targs))
        return text
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise McaArgumentError(f"`{key}`: expects {_type_word(annotation)}, got {value!r}. Fix: set {key}: "
                           f"<{_type_word(annotation)}>.")


# keys given in YAML as a list or as a comma-separated string (kept comma-separated), with an example of each
LIST_TEXT_FIELDS = {"recompute_modules": "[core_attn, mlp]", "save_on_signal": "[SIGTERM, SIGUSR1]"}


def _list_text(key: str, value: Any) -> Any:
    """A LIST_TEXT_FIELDS value as given in YAML: a list, or a comma-separated string; returned comma-separated."""
    if isinstance(value, (list, tuple)):
        require(all(isinstance(v, str) for v in value), key, f"expects names, got {value!r}",
                f"list names, e.g. {key}: {LIST_TEXT_FIELDS[key]}")
        return ",".join(value)
    return value


def recompute_module_list(mca_args: MegatronArguments) -> list[str]:
    """The modules of `recompute_modules` as a list (empty when unset)."""
    return [s.strip() for s in (mca_args.recompute_modules or "").split(",") if s.strip()]


def dataclass_from_dict(dataclass_type: type, values: dict[str, Any]) -> Any:
    """An instance of `dataclass_type` from recipe values, every value checked against its field's type.

    `None` for a field that is not Optional means "the default" (mcore_adapter recipes write `null` for sizes)."""
    try:
        hints = typing.get_type_hints(dataclass_type)
    except Exception:  # noqa: BLE001 - a plugin's annotations that do not resolve: values are passed as given
        hints = {}
    kwargs: dict[str, Any] = {}
    for f in fields(dataclass_type):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.name in LIST_TEXT_FIELDS:
            value = _list_text(f.name, value)
        annotation = hints.get(f.name)
        if annotation is not None and value is None and type(None) not in typing.get_args(annotation):
            continue
        kwargs[f.name] = value if annotation is None else coerce_value(f.name, value, annotation)
    return dataclass_type(**kwargs)


def signals_ok(value: Any) -> bool:
    """Whether `save_on_signal` names only signals that can trigger a save (training/preemption.py)."""
    from llamafactory_mca.training.preemption import signal_names

    try:
        signal_names(value)
    except ValueError:
        return False
    return True


def megatron_args_from_dict(values: dict[str, Any]) -> MegatronArguments:
    """MegatronArguments from the recipe's Megatron keys, each value type-checked (`two` is an error naming the key)."""
    return dataclass_from_dict(MegatronArguments, values)


# --------------------------------------------------------------------------------------------- validation


def validate_megatron_args(m: MegatronArguments, world_size: Optional[int], model_path: Optional[str] = None,
                           config: Optional[dict] = None) -> None:
    """Raise McaArgumentError for the first setting that cannot run; see the class for each key.

    `world_size` None (not known yet, e.g. GPUs counted by the launcher): the divisibility checks are skipped.
    The layout is also checked against the model's config.json (given, or read from a local `model_path`)."""
    for key in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "context_parallel_size",
    ):
        require(getattr(m, key) >= 1, key, f"must be >= 1, got {getattr(m, key)}", f"set {key}: 1 or more")
    tp, pp, cp, ep = (
        m.tensor_model_parallel_size,
        m.pipeline_model_parallel_size,
        m.context_parallel_size,
        m.expert_model_parallel_size,
    )
    require(
        world_size is None or world_size % (tp * pp * cp) == 0,
        "tensor_model_parallel_size",
        f"tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp} does not divide the world size {world_size}",
        "choose tensor/pipeline/context_parallel_size whose product divides the number of processes "
        "(NPROC_PER_NODE * NNODES)",
    )
    if m.expert_tensor_parallel_size is not None:
        require(m.expert_tensor_parallel_size >= 1, "expert_tensor_parallel_size",
                f"must be >= 1, got {m.expert_tensor_parallel_size}", "remove it, or set 1 or more")
    etp = m.expert_tensor_parallel_size or tp
    require(
        world_size is None or world_size % (etp * ep * pp) == 0,
        "expert_model_parallel_size",
        f"expert_tensor_parallel_size*expert_model_parallel_size*pp = {etp}*{ep}*{pp} does not divide the "
        f"world size {world_size}",
        "choose expert_model_parallel_size so that experts fit inside the data-parallel ranks of each stage",
    )
    require(
        not m.sequence_parallel or tp > 1,
        "sequence_parallel",
        "needs tensor_model_parallel_size > 1",
        "set sequence_parallel: false, or tensor_model_parallel_size >= 2",
    )
    require(
        cp == 1 or m.attention_backend != "local",
        "attention_backend",
        "'local' (megatron's DotProductAttention) does not support context parallelism",
        "set attention_backend: auto (or sdpa / te), or context_parallel_size: 1",
    )
    vpp = m.virtual_pipeline_model_parallel_size
    if vpp is not None:
        require(vpp >= 1, "virtual_pipeline_model_parallel_size", f"must be >= 1, got {vpp}", "remove it or set 2+")
        require(
            pp > 1 or vpp == 1,
            "virtual_pipeline_model_parallel_size",
            "needs pipeline_model_parallel_size > 1",
            "remove virtual_pipeline_model_parallel_size, or set pipeline_model_parallel_size >= 2",
        )
    for key in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
        value = getattr(m, key)
        require(value is None or value >= 1, key, f"must be >= 1, got {value}", f"remove {key}, or set 1 or more")
        require(value is None or pp > 1, key, "needs pipeline_model_parallel_size > 1",
                f"remove {key}, or set pipeline_model_parallel_size >= 2")
    require(
        not m.overlap_param_gather or m.use_distributed_optimizer,
        "overlap_param_gather",
        "needs the distributed optimizer",
        "set use_distributed_optimizer: true, or overlap_param_gather: false",
    )
    require(
        not m.overlap_param_gather or m.overlap_grad_reduce,
        "overlap_param_gather",
        "needs overlap_grad_reduce",
        "set overlap_grad_reduce: true as well",
    )
    require(
        m.recompute_granularity is not None or (m.recompute_method is None and m.recompute_num_layers is None),
        "recompute_method",
        "has no effect without recompute_granularity",
        "set recompute_granularity: full, or remove recompute_method / recompute_num_layers",
    )
    require(
        m.recompute_granularity != "selective" or m.recompute_method is None,
        "recompute_method",
        "only applies to recompute_granularity: full",
        "remove recompute_method, or use recompute_granularity: full",
    )
    require(m.recompute_num_layers is None or m.recompute_num_layers >= 1, "recompute_num_layers",
            f"must be >= 1, got {m.recompute_num_layers}", "remove it, or set 1 or more")
    modules = recompute_module_list(m)
    unknown = [name for name in modules if name not in RECOMPUTE_MODULES]
    require(not unknown, "recompute_modules", f"unknown module(s) {', '.join(unknown)}",
            f"choose from {', '.join(RECOMPUTE_MODULES)} (a YAML list or a comma-separated string)")
    require(not modules or m.recompute_granularity == "selective", "recompute_modules",
            "only applies to recompute_granularity: selective",
            "set recompute_granularity: selective, or remove recompute_modules")
    require(signals_ok(m.save_on_signal), "save_on_signal",
            f"{m.save_on_signal!r} names a signal that cannot trigger a save",
            "list some of SIGTERM, SIGUSR1, SIGUSR2, SIGHUP (comma-separated), or none")
    require(
        m.moe_token_dispatcher_type != "flex",
        "moe_token_dispatcher_type",
        "'flex' needs DeepEP, which this backend does not support",
        "use moe_token_dispatcher_type: alltoall",
    )
    require(m.moe_router_topk is None or m.moe_router_topk >= 1, "moe_router_topk",
            f"must be >= 1, got {m.moe_router_topk}", "remove it (the HF config's value is used) or set 1 or more")
    require(m.moe_expert_capacity_factor is None or m.moe_expert_capacity_factor > 0, "moe_expert_capacity_factor",
            f"must be > 0, got {m.moe_expert_capacity_factor}", "remove it (no token dropping) or set e.g. 1.25")
    require(m.ddp_bucket_size is None or m.ddp_bucket_size >= 1, "ddp_bucket_size",
            f"must be a positive number of parameters, got {m.ddp_bucket_size}",
            "remove it (megatron's default) or set e.g. 40000000")
    require(
        m.distributed_timeout_minutes > 0,
        "distributed_timeout_minutes",
        "must be positive",
        "set it to the number of minutes a collective may wait, e.g. 30",
    )
    check_fp8_args(m)
    check_cuda_graph_args(m)
    if config is None:
        config = model_config.read_local_config(model_path)
    if config is not None:
        check_layout_against_model(m, config)


def check_fp8_args(m: MegatronArguments) -> None:
    """The FP8 keys: known format and recipe, a recipe only with FP8 on, combinations the kernels run."""
    fmt, recipe = m.fp8_format, m.fp8_recipe
    require(fmt is None or fmt in FP8_FORMATS, "fp8", f"{fmt!r} is not an FP8 format",
            "set fp8: true | e4m3 | hybrid, or remove it")
    require(recipe is None or recipe in FP8_RECIPES, "fp8_recipe",
            f"{recipe!r} is not offered (scales are dynamic, per rank: no delayed scaling, no mxfp8)",
            "set fp8_recipe: " + " | ".join(FP8_RECIPES))
    require(recipe is None or fmt is not None, "fp8_recipe", "has no effect without fp8",
            "add fp8: true, or remove fp8_recipe")
    require(fmt != "hybrid" or recipe in (None, "tensorwise"), "fp8",
            f"'hybrid' (e5m2 gradients) runs with fp8_recipe: tensorwise only, not {recipe}",
            "set fp8: e4m3 (or true), or fp8_recipe: tensorwise")
    te = m.transformer_impl == "transformer_engine" or m.attention_backend == "te"
    require(fmt is None or not te, "fp8", "our FP8 GEMMs run on the local layer spec, not Transformer Engine's",
            "remove transformer_impl / attention_backend: te, or remove fp8")


def check_cuda_graph_args(m: MegatronArguments) -> None:
    """`cuda_graph_impl: local`: only with what the captured layers can replay (one model-parallel rank, no
    recompute, no FP8); the GPU, the stage and the model are checked where they are known."""
    if m.cuda_graph_impl == "none":
        return
    key, off = "cuda_graph_impl", "or set cuda_graph_impl: none"
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        require(getattr(m, name) == 1, key, f"'local' graphs run with {name}: 1 only (not yet with "
                f"{getattr(m, name)})", f"set {name}: 1 {off}")
    require(m.virtual_pipeline_model_parallel_size in (None, 1), key, "'local' graphs need no virtual pipeline",
            f"remove virtual_pipeline_model_parallel_size {off}")
    require(m.recompute_granularity is None, key, "'local' graphs do not run with recompute (megatron graphs a "
            "recomputed layer only as part of a whole-iteration graph)", f"remove recompute_granularity {off}")
    require(m.fp8_format is None, key, "'local' graphs do not capture our FP8 GEMMs yet", f"remove fp8 {off}")


def check_layout_against_model(m: MegatronArguments, config: dict) -> None:
    """Cross-check the layout with a Hugging Face config.json (dict): experts, heads, layers."""
    text = model_config.text_config(config)
    model_type = config.get("model_type")
    tp, pp, cp, ep = (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size,
                      m.expert_model_parallel_size)
    from llamafactory_mca.recipe_checks import (  # (imports args)
        check_linear_attention,
        check_mla_tensor_parallel,
        check_sliding_window,
    )

    check_sliding_window(text, cp)
    check_mla_tensor_parallel(text, tp, m.sequence_parallel)
    te = m.transformer_impl != "local" and (m.transformer_impl == "transformer_engine" or m.attention_backend == "te")
    check_linear_attention(text, tp, cp, te)
    experts = model_config.num_experts(text)
    require(not experts or m.cuda_graph_impl == "none", "cuda_graph_impl",
            f"'local' graphs of MoE layers ({model_type}) are not supported yet (the token dispatch reads counts on "
            "the host)", "set cuda_graph_impl: none")
    require(ep == 1 or experts, "expert_model_parallel_size",
            f"the model ({model_type}) is dense: it has no experts to spread over {ep} ranks",
            "set expert_model_parallel_size: 1 (use data/tensor parallelism for dense models)")
    require(not experts or experts % ep == 0, "expert_model_parallel_size",
            f"the model's {experts} experts do not split evenly over {ep} ranks",
            "choose an expert_model_parallel_size that divides the number of experts")
    heads = text.get("num_attention_heads")
    if isinstance(heads, int):
        require(heads % tp == 0, "tensor_model_parallel_size",
                f"the model's {heads} attention heads do not split evenly over {tp} ranks",
                "choose a tensor_model_parallel_size that divides num_attention_heads")
        groups = text.get("num_key_value_heads") or heads
        require(not isinstance(groups, int) or groups % tp == 0, "tensor_model_parallel_size",
                f"the model's {groups} key/value heads do not split evenly over {tp} ranks",
                "choose a tensor_model_parallel_size that divides num_key_value_heads")
    layers = text.get("num_hidden_layers")
    vpp = m.virtual_pipeline_model_parallel_size
    first, last = m.num_layers_in_first_pipeline_stage, m.num_layers_in_last_pipeline_stage
    if isinstance(layers, int):
        require(pp <= layers, "pipeline_model_parallel_size",
                f"{pp} stages for a model of {layers} layers", "choose at most one stage per layer")
        if first is None and last is None:
            chunks = pp * (vpp or 1)
            require(
                layers % chunks == 0,
                "virtual_pipeline_model_parallel_size" if vpp else "pipeline_model_parallel_size",
                f"the model's {layers} layers do not split evenly into pp*vpp = {chunks} chunks",
                "choose pipeline/virtual_pipeline_model_parallel_size whose product divides the layer count, or set "
                "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage",
            )
        else:
            middle = layers - (first or 0) - (last or 0)
            stages = pp - (first is not None) - (last is not None)
            require(middle >= 0 and (stages == 0 and middle == 0 or stages > 0 and middle % (stages * (vpp or 1)) == 0),
                    "num_layers_in_first_pipeline_stage" if first is not None else "num_layers_in_last_pipeline_stage",
                    f"the {layers} layers minus the first/last stage's do not split evenly over the other stages",
                    "choose first/last stage sizes that leave a multiple of the remaining stages (times vpp)")
