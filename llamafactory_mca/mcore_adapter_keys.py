"""The argument surface of LLaMA-Factory's own `USE_MCA` mode (ROLL's mcore_adapter training arguments).

Every field of mcore_adapter's `DistributingParallelArguments` and `MegatronArguments` dataclasses has one fate
here, so a recipe written for upstream either trains with the same meaning or stops with a message naming the
key and what to do instead; nothing is silently ignored. README's "Coming from LLaMA-Factory's USE_MCA" table
is checked against this table by tests/test_mcore_adapter_keys.py.

Fates:
- `ours`: a key of our `MegatronArguments` with the same meaning (same name, same values).
- `alias`: another key of ours (or LLaMA-Factory's) carries the meaning; the value is translated.
- `agree`: what this backend always does; accepted when the value agrees (listed), refused otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llamafactory_mca.args import McaArgumentError, MegatronArguments, field_names


@dataclass(frozen=True)
class UpstreamKey:
    """One mcore_adapter field: its fate, the values accepted (fate `agree`), what it means here, the way out."""

    fate: str
    meaning: str
    accepted: tuple = ()
    fix: str = ""


_NO_PP_LAYOUT = ("use num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage for an uneven "
                 "pipeline split, or remove the key")
_NO_FP8 = "remove the key (FP8 weights are not supported; `fp8: true` alone runs the GEMMs in FP8)"

UPSTREAM_KEYS: dict[str, UpstreamKey] = {
    # --- DistributingParallelArguments ------------------------------------------------------------------
    "tensor_model_parallel_size": UpstreamKey("ours", "same key"),
    "pipeline_model_parallel_size": UpstreamKey("ours", "same key"),
    "sequence_parallel": UpstreamKey("ours", "same key"),
    "virtual_pipeline_model_parallel_size": UpstreamKey("ours", "same key"),
    "context_parallel_size": UpstreamKey("ours", "same key"),
    "expert_model_parallel_size": UpstreamKey("ours", "same key"),
    "expert_tensor_parallel_size": UpstreamKey("ours", "same key (default: tensor_model_parallel_size)"),
    "account_for_embedding_in_pipeline_split": UpstreamKey(
        "agree", "not supported yet: the embedding is not counted as a layer in the pipeline split",
        (None, False), _NO_PP_LAYOUT),
    "account_for_loss_in_pipeline_split": UpstreamKey(
        "agree", "not supported yet: the loss is not counted as a layer in the pipeline split",
        (None, False), _NO_PP_LAYOUT),
    "pipeline_model_parallel_layout": UpstreamKey(
        "agree", "not supported yet: layers split evenly, or by the first/last stage sizes", (None, ""),
        _NO_PP_LAYOUT),
    "overlap_p2p_comm": UpstreamKey(
        "agree", "pipeline send/receive does not overlap compute", (False,),
        "remove the key (overlapped pipeline communication is not supported yet)"),
    "variable_seq_lengths": UpstreamKey(
        "agree", "always: lengths vary from step to step; the micro-batches of one step are padded to one shape "
        "under pipeline parallelism (padding carries no loss), so both values train the same", (True, False)),
    "recompute_granularity": UpstreamKey("ours", "same key"),
    "recompute_method": UpstreamKey("ours", "same key; upstream's 'recompute' choice is megatron's 'block'"),
    "recompute_modules": UpstreamKey("ours", "same key (a YAML list or a comma-separated string)"),
    "recompute_num_layers": UpstreamKey("ours", "same key"),
    "bias_activation_fusion": UpstreamKey("ours", "same key (switched off where no GPU)"),
    "apply_rope_fusion": UpstreamKey(
        "ours", "same key (default true here: TE's kernel with its layer spec, ours on a GPU otherwise)"),
    "cross_entropy_loss_fusion": UpstreamKey("ours", "same key (our vocab-parallel cross entropy in every case)"),
    "moe_layer_recompute": UpstreamKey("ours", "same key"),
    "moe_token_dispatcher_type": UpstreamKey("ours", "same key (our default: alltoall)"),
    "moe_aux_loss_coeff": UpstreamKey("ours", "same key (no aux loss unless set, as on LLaMA-Factory's HF path)"),
    "moe_grouped_gemm": UpstreamKey("ours", "same key"),
    "moe_expert_capacity_factor": UpstreamKey("ours", "same key"),
    "moe_pad_expert_input_to_capacity": UpstreamKey(
        "agree", "expert inputs are not padded to capacity", (None, False),
        "remove the key (padding expert inputs to capacity is not supported yet)"),
    "moe_token_drop_policy": UpstreamKey(
        "agree", "with moe_expert_capacity_factor, the lowest-probability tokens are dropped (megatron's 'probs')",
        (None, "probs"), "use moe_token_drop_policy: probs, or remove the key"),
    "moe_shared_expert_overlap": UpstreamKey("ours", "same key"),
    "moe_enable_routing_replay": UpstreamKey(
        "agree", "routing is not recorded or replayed", (False,), "remove the key (routing replay is for RL rollouts)"),
    "moe_router_dtype": UpstreamKey("ours", "same key (our default: fp32)"),
    "mtp_num_layers": UpstreamKey(
        "agree", "no multi-token-prediction layers", (None, 0),
        "set mtp_num_layers: 0 or remove it (multi-token prediction is not supported yet)"),
    "calculate_per_token_loss": UpstreamKey(
        "agree", "always: the loss is token-weighted over all micro-batches and data-parallel ranks, as the "
        "Hugging Face Trainer computes it", (True,),
        "remove the key (the loss is always averaged over the label tokens of the global batch)"),
    "transformer_impl": UpstreamKey("ours", "same key (default: our local modules; transformer_engine is opt-in)"),
    "cuda_graph_impl": UpstreamKey("ours", "same key: none, or local (megatron's graphs of whole transformer "
                                   "layers; stage pt, one GPU per model replica, dense models)"),
    "cuda_graph_scope": UpstreamKey(
        "agree", "no effect (with cuda_graph_impl: local the whole layer is graphed)", ("*",)),
    "fp8_recipe": UpstreamKey("ours", "same key: tensorwise (default), rowwise or blockwise, dynamic per-rank "
                              "scales without Transformer Engine (upstream's delayed / mxfp8 are refused)"),
    "fp8_param": UpstreamKey("agree", "weights stay bf16 (FP8 is used inside the GEMMs only)", (False,), _NO_FP8),
    "fp8": UpstreamKey("alias", "our `fp8_format`: e4m3 or hybrid; LLaMA-Factory's `fp8: true` means e4m3 "
                       "(Hopper GPUs; no Transformer Engine needed)"),
    "additional_configs": UpstreamKey(
        "agree", "no free-form TransformerConfig overrides", (None, {}, ""),
        "remove the key and give each setting as a recipe key (`llamafactory-cli train -h` lists them)"),
    # --- MegatronArguments --------------------------------------------------------------------------------
    "accumulate_allreduce_grads_in_fp32": UpstreamKey("ours", "same key (our default: true)"),
    "use_distributed_optimizer": UpstreamKey("ours", "same key"),
    "distrib_optim_fully_reshardable": UpstreamKey(
        "agree", "always: distributed-optimizer checkpoints are fully reshardable (any layout resumes)", (True,),
        "remove the key (the fully reshardable format is always used)"),
    "distrib_optim_fully_reshardable_mem_efficient": UpstreamKey(
        "agree", "the reshardable save gathers through the default path", (False,),
        "remove the key (the memory-efficient reshardable save is not supported yet)"),
    "overlap_grad_reduce": UpstreamKey("ours", "same key"),
    "delay_grad_reduce": UpstreamKey(
        "agree", "always: with overlap_grad_reduce, gradient reduction is launched by the pipeline schedule "
        "(megatron's grad_sync_func)", (True,), "remove the key"),
    "overlap_param_gather": UpstreamKey("ours", "same key"),
    "check_for_nan_in_loss_and_grad": UpstreamKey(
        "ours", "same key (our default: false): stop at the first NaN/Inf loss or gradient, no checkpoint from it"),
    "ddp_average_in_collective": UpstreamKey(
        "agree", "gradients are summed and divided by the global label tokens (per-token loss)", (False,),
        "remove the key (averaging in the collective contradicts the token-weighted loss)"),
    "ddp_bucket_size": UpstreamKey("ours", "same key (passed to megatron's DDP config)"),
    "optimizer": UpstreamKey(
        "agree", "megatron's Adam with decoupled weight decay (AdamW), with LLaMA-Factory's adam_beta1/2, "
        "adam_epsilon and weight_decay", ("adam",), "remove the key (only AdamW is supported)"),
    "optimizer_cpu_offload": UpstreamKey(
        "agree", "optimizer state stays on the device", (False,),
        "remove the key (use use_distributed_optimizer: true to shard optimizer state instead)"),
    "optimizer_offload_fraction": UpstreamKey(
        "agree", "optimizer state stays on the device", (0, 0.0),
        "remove the key (use use_distributed_optimizer: true to shard optimizer state instead)"),
    "save_hf_model": UpstreamKey("ours", "same key (our default: true)"),
    "save_merged_model": UpstreamKey(
        "agree", "LoRA runs write the PEFT adapter into output_dir", (False,),
        "remove the key and merge afterwards: llamafactory-mca merge --checkpoint_path CKPT --merge_lora "
        "--output_path DIR"),
    "ckpt_format": UpstreamKey(
        "agree", "always torch_dist (megatron's distributed format)", ("torch_dist",),
        "remove the key (checkpoints are always written as torch_dist)"),
    "ckpt_d2h_non_blocking": UpstreamKey(
        "agree", "checkpoints are saved synchronously", (False,), "remove the key (asynchronous saving is not "
        "supported yet)"),
    "sequence_packing": UpstreamKey(
        "alias", "LLaMA-Factory's `neat_packing: true` (packed samples attend only to themselves)"),
    "compile_warmup": UpstreamKey(
        "agree", "no torch.compile warm-up", (False,), "remove the key (compile warm-up is not supported)"),
}


def _agrees(value: Any, accepted: tuple) -> bool:
    if "*" in accepted:
        return True
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        value = None
    for ok in accepted:
        if type(ok) is bool or type(value) is bool:  # 1 == True: compare bools as bools only
            if type(ok) is type(value) and ok == value:
                return True
        elif value == ok:
            return True
    return False


def translate_upstream_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """`recipe` with mcore_adapter's keys resolved: keys of ours are kept, aliases translated, keys whose value
    agrees with what this backend always does removed; any other value raises McaArgumentError naming key and fix.

    (`fp8` is also LLaMA-Factory's own key; `recipe_checks` refuses it under USE_MCA.)"""
    out = dict(recipe)
    for key, spec in UPSTREAM_KEYS.items():
        if key not in out or spec.fate == "ours" or key == "fp8":
            continue
        value = out.pop(key)
        if spec.fate == "alias":  # sequence_packing
            if _agrees(value, (True,)):
                out["neat_packing"] = True
                out["packing"] = True
            elif not _agrees(value, (False, None)):
                raise McaArgumentError(f"`{key}`: expects true or false, got {value!r}. Fix: use neat_packing: "
                                       "true (or sequence_packing: true).")
            continue
        if not _agrees(value, spec.accepted):
            shown = ", ".join("null" if v is None else repr(v) for v in spec.accepted if v not in ("", {}))
            raise McaArgumentError(
                f"`{key}` (from LLaMA-Factory's mcore_adapter mode): {value!r} is not supported here ({spec.meaning}; "
                f"accepted: {shown}). Fix: {spec.fix}."
            )
    return out


def upstream_keys_not_ours() -> set[str]:
    """The mcore_adapter keys that are not fields of our MegatronArguments (split off before LLaMA-Factory's parse)."""
    return {k for k, spec in UPSTREAM_KEYS.items() if spec.fate != "ours" and k != "fp8"}


def check_table_consistency() -> Optional[str]:
    """A description of the first inconsistency between the table and MegatronArguments, or None."""
    ours = field_names(MegatronArguments)
    for key, spec in UPSTREAM_KEYS.items():
        if (spec.fate == "ours") != (key in ours):
            return f"{key}: fate {spec.fate!r} but {'' if key in ours else 'not '}a MegatronArguments field"
    return None


def readme_table() -> str:
    """The README's table of mcore_adapter keys (checked against README.md by the tests)."""
    rows = ["| mcore_adapter key | here | meaning, or what to do instead |", "|---|---|---|"]
    for key, spec in UPSTREAM_KEYS.items():
        if spec.fate == "agree":
            values = ", ".join("*any*" if v == "*" else "null" if v is None else json_value(v)
                               for v in spec.accepted if v not in ("", {}))
            fate = f"accepted: {values}"
            meaning = spec.meaning + (f"; otherwise: {spec.fix}" if spec.fix else "")
        else:
            fate = "accepted" if spec.fate == "ours" else "alias"
            meaning = spec.meaning
        rows.append(f"| `{key}` | {fate} | {meaning} |")
    return "\n".join(rows)


def json_value(value: Any) -> str:
    """A value as a recipe writes it (true, 0, torch_dist)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
