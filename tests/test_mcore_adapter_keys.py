"""Every field of ROLL's mcore_adapter training arguments has a fate here; the README's table is the code's."""

from __future__ import annotations

import os

import pytest

from llamafactory_mca.args import McaArgumentError
from llamafactory_mca.mcore_adapter_keys import (
    UPSTREAM_KEYS,
    check_table_consistency,
    readme_table,
    translate_upstream_keys,
)

# The fields of mcore_adapter's DistributingParallelArguments and MegatronArguments dataclasses
# (alibaba/ROLL mcore_adapter/src/mcore_adapter/training_args.py, commit 8eb27cc2), in their order.
MCORE_ADAPTER_FIELDS = [
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
    "virtual_pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
    "pipeline_model_parallel_layout", "overlap_p2p_comm", "variable_seq_lengths", "recompute_granularity",
    "recompute_method", "recompute_modules", "recompute_num_layers", "bias_activation_fusion", "apply_rope_fusion",
    "cross_entropy_loss_fusion", "moe_layer_recompute", "moe_token_dispatcher_type", "moe_aux_loss_coeff",
    "moe_grouped_gemm", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity", "moe_token_drop_policy",
    "moe_shared_expert_overlap", "moe_enable_routing_replay", "moe_router_dtype", "mtp_num_layers",
    "calculate_per_token_loss", "transformer_impl", "cuda_graph_impl", "cuda_graph_scope", "fp8_recipe", "fp8_param",
    "fp8", "additional_configs",
    "accumulate_allreduce_grads_in_fp32", "use_distributed_optimizer", "distrib_optim_fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient", "overlap_grad_reduce", "delay_grad_reduce",
    "overlap_param_gather", "check_for_nan_in_loss_and_grad", "ddp_average_in_collective", "ddp_bucket_size",
    "optimizer", "optimizer_cpu_offload", "optimizer_offload_fraction", "save_hf_model", "save_merged_model",
    "ckpt_format", "ckpt_d2h_non_blocking", "sequence_packing", "compile_warmup",
]
REFUSED_VALUES = {
    "account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True,
    "pipeline_model_parallel_layout": "E,t*2|t*2,L", "overlap_p2p_comm": True, "moe_pad_expert_input_to_capacity": True,
    "moe_token_drop_policy": "position", "moe_enable_routing_replay": True, "mtp_num_layers": 1,
    "calculate_per_token_loss": False, "fp8_param": True,
    "additional_configs": {"foo": 1}, "distrib_optim_fully_reshardable": False,
    "distrib_optim_fully_reshardable_mem_efficient": True, "delay_grad_reduce": False,
    "ddp_average_in_collective": True, "optimizer": "sgd", "optimizer_cpu_offload": True,
    "optimizer_offload_fraction": 0.5, "save_merged_model": True, "ckpt_format": "legacy",
    "ckpt_d2h_non_blocking": True, "compile_warmup": True, "sequence_packing": "sometimes",
    "variable_seq_lengths": "sometimes",
}


def test_every_mcore_adapter_field_has_a_fate():
    assert list(UPSTREAM_KEYS) == MCORE_ADAPTER_FIELDS
    assert len(MCORE_ADAPTER_FIELDS) == 57
    assert check_table_consistency() is None


def test_readme_table_is_the_code_table():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert readme_table() in readme


@pytest.mark.parametrize("key", [k for k, s in UPSTREAM_KEYS.items() if s.fate == "agree" and k != "fp8"])
def test_agreeing_values_pass_and_others_are_refused_naming_the_key(key):
    spec = UPSTREAM_KEYS[key]
    for value in spec.accepted:
        if value != "*":
            assert key not in translate_upstream_keys({key: value})
    if key in REFUSED_VALUES:
        with pytest.raises(McaArgumentError) as err:
            translate_upstream_keys({key: REFUSED_VALUES[key]})
        assert f"`{key}`" in str(err.value) and "Fix:" in str(err.value)
    else:
        assert "*" in spec.accepted  # accepts any value (cuda_graph_scope without cuda_graph_impl)


def test_every_agree_key_with_a_refusable_value_is_tested():
    agree = {k for k, s in UPSTREAM_KEYS.items() if s.fate in ("agree", "alias") and "*" not in s.accepted}
    assert agree - {"fp8"} == set(REFUSED_VALUES)


def test_sequence_packing_is_neat_packing():
    assert translate_upstream_keys({"sequence_packing": True}) == {"neat_packing": True, "packing": True}
    assert translate_upstream_keys({"sequence_packing": "false"}) == {}
