"""Megatron's TransformerConfig from a Hugging Face config, a family bridge and our Megatron arguments, with the
platform checks (fusions only where TE / Apex / CUDA are present)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def build_transformer_config(bridge: Any, hf_config: Any, mca_args: Any, params_dtype: torch.dtype = torch.float32):
    """The megatron TransformerConfig of `bridge`'s family for `hf_config` under the layout and options of
    `mca_args`: the bridge's hooks give the architecture, `mca_args` the layout, recompute and MoE options;
    fusions that need Transformer Engine, Apex or CUDA are switched off where those are absent."""
    from llamafactory_mca.args import recompute_module_list
    from llamafactory_mca.models.spec import use_transformer_engine
    from llamafactory_mca.platform import on_gpu, rope_fusion_available, wgrad_fusion_available

    bridge.check_config(hf_config)
    te = use_transformer_engine(mca_args)  # TE kernels only with the (opt-in) TE layer spec
    m = mca_args
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported by the Megatron bridge yet")
    if m.apply_rope_fusion and not te:
        rope_fusion_available()  # megatron's unfused RoPE on our kernel (kernels/rope.py), on a GPU where it checks out
    recompute_modules = recompute_module_list(m) or None
    if m.moe_layer_recompute:
        recompute_modules = sorted(set((recompute_modules or []) + ["moe"]))
    kw: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        kv_channels=bridge.head_dim(hf_config),
        # MoE-only configs without a dense size (Qwen3.5-MoE): the expert size (no dense MLP uses it)
        ffn_hidden_size=getattr(hf_config, "intermediate_size", None) or bridge.moe_ffn_hidden_size(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bridge.add_qkv_bias(hf_config),
        qk_layernorm=bridge.qk_layernorm(hf_config),
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        # layout
        tensor_model_parallel_size=m.tensor_model_parallel_size,
        pipeline_model_parallel_size=m.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=m.virtual_pipeline_model_parallel_size,
        context_parallel_size=m.context_parallel_size,
        expert_model_parallel_size=m.expert_model_parallel_size,
        expert_tensor_parallel_size=m.expert_tensor_parallel_size or m.tensor_model_parallel_size,
        sequence_parallel=m.sequence_parallel,
        num_layers_in_first_pipeline_stage=m.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=m.num_layers_in_last_pipeline_stage,
        # dtypes
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # memory
        recompute_granularity=m.recompute_granularity,
        recompute_method=(m.recompute_method or "uniform") if m.recompute_granularity == "full" else None,
        recompute_num_layers=(m.recompute_num_layers or 1) if m.recompute_granularity == "full" else None,
        # fusions: off where they need TE/apex/CUDA and those are absent
        bias_activation_fusion=m.bias_activation_fusion and on_gpu(),
        bias_dropout_fusion=m.bias_dropout_fusion and on_gpu(),
        # TE's fused RoPE with the TE spec; otherwise megatron's unfused path, which runs our kernel where installed
        apply_rope_fusion=m.apply_rope_fusion and te,
        masked_softmax_fusion=m.masked_softmax_fusion and on_gpu(),
        gradient_accumulation_fusion=m.gradient_accumulation_fusion and (te or wgrad_fusion_available()),
        cross_entropy_loss_fusion=m.cross_entropy_loss_fusion and on_gpu(),
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu(),
        calculate_per_token_loss=True,
        # p2p shapes are exchanged per microbatch (LLaMA-Factory batches vary in length)
        variable_seq_lengths=m.moe_token_dispatcher_type != "allgather",
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
    )
    if recompute_modules is not None:
        kw["recompute_modules"] = recompute_modules
    kw.update(cuda_graph_fields(m.cuda_graph_impl, on_gpu()))
    num_experts = bridge.num_experts(hf_config)
    if num_experts:
        # As LLaMA-Factory's HF path: no load-balancing loss unless a coefficient is asked for (the trainer
        # passes LLaMA-Factory's own `moe_aux_loss_coef` here when ours is unset).
        aux = m.moe_aux_loss_coeff or 0.0
        balancing = m.moe_router_load_balancing_type
        if aux == 0.0 and balancing in ("aux_loss", "seq_aux_loss", "global_aux_loss"):
            balancing = "none"
        pre_softmax = m.moe_router_pre_softmax
        if pre_softmax is None:
            pre_softmax = bridge.moe_router_pre_softmax(hf_config)
        kw.update(
            num_moe_experts=num_experts,
            moe_ffn_hidden_size=bridge.moe_ffn_hidden_size(hf_config),
            moe_router_topk=m.moe_router_topk or bridge.moe_topk(hf_config),
            moe_router_pre_softmax=pre_softmax,
            moe_router_load_balancing_type=balancing,
            moe_aux_loss_coeff=aux,
            moe_z_loss_coeff=m.moe_z_loss_coeff,
            moe_router_dtype=m.moe_router_dtype,
            moe_grouped_gemm=m.moe_grouped_gemm,
            moe_expert_capacity_factor=m.moe_expert_capacity_factor,
            moe_shared_expert_overlap=m.moe_shared_expert_overlap,
            moe_permute_fusion=m.moe_permute_fusion and te,
        )
        kw.update(moe_structure_fields(bridge, hf_config))
        kw.update(moe_router_fields(bridge, hf_config))
    kw.update(bridge.config_overrides(hf_config))
    return config_class(kw)(**kw)


def cuda_graph_fields(impl: str, gpu: bool) -> dict[str, Any]:
    """TransformerConfig fields of `cuda_graph_impl`: megatron's local graphs of whole transformer layers
    (`cuda_graph_scope` empty: the whole layer), or none. The scope is always given as megatron's current spelling
    (its default "full" warns that it is deprecated in every config). Graphs need a GPU: on a CPU the key is
    refused rather than dropped, so a recipe never trains other than it says."""
    if impl == "none":
        return {"cuda_graph_scope": []}
    if not gpu:
        from llamafactory_mca.args import McaArgumentError

        raise McaArgumentError(f"`cuda_graph_impl`: '{impl}' captures CUDA graphs, and this run has no GPU. "
                               "Fix: set cuda_graph_impl: none (or run on a GPU).")
    return {"cuda_graph_impl": impl, "cuda_graph_scope": []}


def moe_structure_fields(bridge: Any, hf_config: Any) -> dict[str, Any]:
    """TransformerConfig fields of the MoE layout of `bridge`'s family: which layers are MoE (`moe_layer_freq`,
    the others keep a dense MLP of `intermediate_size`) and the shared expert (`SharedExpertMLP`, its size and
    optional sigmoid gate)."""
    kw: dict[str, Any] = {"moe_layer_freq": bridge.moe_layer_freq(hf_config)}
    shared = bridge.moe_shared_expert_intermediate_size(hf_config)
    if shared:
        kw.update(moe_shared_expert_intermediate_size=int(shared),
                  moe_shared_expert_gate=bool(bridge.moe_shared_expert_gate(hf_config)))
    return kw


def moe_router_fields(bridge: Any, hf_config: Any) -> dict[str, Any]:
    """TransformerConfig fields of the router variant of `bridge`'s family: score function, expert-choice bias,
    group-limited top-k and the scaling of the routing weights.

    The expert bias (HF `e_score_correction_bias`) is a fixed buffer on the Hugging Face path (nothing updates it
    during training), so megatron's aux-loss-free bias update is off (`moe_router_bias_update_rate` 0): both
    backends route with the bias the model came with."""
    groups, group_topk = bridge.moe_router_groups(hf_config)
    kw: dict[str, Any] = {
        "moe_router_score_function": bridge.moe_router_score_function(hf_config),
        "moe_router_topk_scaling_factor": bridge.moe_router_topk_scaling_factor(hf_config),
    }
    if groups and groups > 1:
        kw.update(moe_router_num_groups=int(groups), moe_router_group_topk=int(group_topk))
    if bridge.moe_router_expert_bias(hf_config):
        kw.update(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0)
    return kw


def config_class(fields: dict) -> type:
    """megatron's MLATransformerConfig where the fields ask for multi-latent attention, else TransformerConfig."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    return MLATransformerConfig if fields.get("multi_latent_attention") else TransformerConfig
