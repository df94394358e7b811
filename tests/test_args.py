"""Megatron arguments: every validation error names the key and the fix, before any model is built."""

from __future__ import annotations

import json

import pytest

from llamafactory_mca.args import McaArgumentError, MegatronArguments, global_batch_size, validate_megatron_args

BAD = [
    # (settings, world size, key named in the error)
    (dict(tensor_model_parallel_size=3), 4, "tensor_model_parallel_size"),
    (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, context_parallel_size=2), 4,
     "tensor_model_parallel_size"),
    (dict(expert_model_parallel_size=4, pipeline_model_parallel_size=2), 4, "expert_model_parallel_size"),
    (dict(sequence_parallel=True), 2, "sequence_parallel"),
    (dict(virtual_pipeline_model_parallel_size=2), 2, "virtual_pipeline_model_parallel_size"),
    (dict(overlap_param_gather=True, overlap_grad_reduce=True), 2, "overlap_param_gather"),
    (dict(overlap_param_gather=True, use_distributed_optimizer=True), 2, "overlap_param_gather"),
    (dict(recompute_method="uniform"), 1, "recompute_method"),
    (dict(recompute_granularity="selective", recompute_method="block"), 1, "recompute_method"),
    (dict(moe_token_dispatcher_type="flex"), 1, "moe_token_dispatcher_type"),
    (dict(tensor_model_parallel_size=0), 1, "tensor_model_parallel_size"),
]


@pytest.mark.parametrize("settings,world,key", BAD)
def test_invalid_layouts_name_key_and_fix(settings, world, key):
    with pytest.raises(McaArgumentError) as err:
        validate_megatron_args(MegatronArguments(**settings), world)
    assert f"`{key}`" in str(err.value) and "Fix:" in str(err.value)


def test_layer_split_checked_against_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))
    m = MegatronArguments(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(McaArgumentError, match="`virtual_pipeline_model_parallel_size`.*6 layers"):
        validate_megatron_args(m, 2, str(tmp_path))
    validate_megatron_args(MegatronArguments(pipeline_model_parallel_size=2), 2, str(tmp_path))


@pytest.mark.parametrize(
    "settings,world",
    [
        (dict(), 1),
        (dict(tensor_model_parallel_size=2, sequence_parallel=True), 2),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), 4),
        (dict(expert_model_parallel_size=2), 2),
        (dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True), 2),
        (dict(recompute_granularity="full"), 1),
    ],
)
def test_valid_layouts_pass(settings, world):
    validate_megatron_args(MegatronArguments(**settings), world)


def test_global_batch_size_rule():
    # The example of LLaMA-Factory's guide: 16 GPUs, tp=2, pp=2, cp=1, bs=4, ga=2 -> dp=4 (ep lives inside dp).
    m = MegatronArguments(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    assert global_batch_size(m, 16, 4, 2) == 32
    m.context_parallel_size = 2
    assert global_batch_size(m, 16, 4, 2) == 16


RECIPE = dict(model_name_or_path="none", stage="sft", do_train=True, finetuning_type="full", dataset="identity",
              template="default",
              overwrite_output_dir=True)


def _parse(tmp_path, **extra):
    from llamafactory_mca.parsing import parse_train_args

    return parse_train_args({**RECIPE, "output_dir": str(tmp_path), **extra})


def test_recipe_keys_are_split_between_megatron_and_llamafactory(tmp_path):
    mca, lf = _parse(tmp_path, tensor_model_parallel_size=1, sequence_parallel=False, learning_rate=3e-6)
    assert mca[MegatronArguments].tensor_model_parallel_size == 1
    assert lf[2].learning_rate == 3e-6


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(McaArgumentError, match=r"`tensor_parallel_size` \(did you mean `tensor_model_parallel_size`"):
        _parse(tmp_path, tensor_parallel_size=2)


@pytest.mark.parametrize("stage", ["ppo"])  # rm and kto are stages of ours now (test_rm, test_kto)
def test_unsupported_stage_is_refused(tmp_path, stage):
    with pytest.raises(McaArgumentError, match=rf"`stage`: '{stage}' is not supported"):
        _parse(tmp_path, stage=stage)


def test_unsupported_finetuning_type_is_refused(tmp_path):
    with pytest.raises(McaArgumentError, match="`finetuning_type`"):
        _parse(tmp_path, finetuning_type="oft")


def test_world_size_is_checked_at_parse_time(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(McaArgumentError, match="world size 3"):
        _parse(tmp_path, tensor_model_parallel_size=2)


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "megatron", "llamafactory", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import llamafactory_mca.args, llamafactory_mca.recipe, llamafactory_mca.prelaunch, llamafactory_mca.mcore_adapter_keys
from llamafactory_mca.recipe import check_recipe
recipe, notes = check_recipe({"stage": "sft", "finetuning_type": "full", "tensor_model_parallel_size": 2}, 2)
print("OK", recipe["tensor_model_parallel_size"])
"""


def test_argument_modules_import_without_torch_megatron_or_llamafactory():
    """The launcher checks recipes before torch is imported: these modules must not need it (a meta-path blocker
    fails any import of torch, megatron, llamafactory or transformers)."""
    from conftest import run_py, worktree_env

    proc = run_py(BLOCKER, PYTHONPATH=worktree_env()["PYTHONPATH"])
    assert proc.returncode == 0, proc.stderr
    assert "OK 2" in proc.stdout


@pytest.mark.parametrize("values,key,words", [
    (dict(tensor_model_parallel_size="two"), "tensor_model_parallel_size", "expects an integer, got 'two'"),
    (dict(sequence_parallel="maybe"), "sequence_parallel", "expects true or false"),
    (dict(moe_aux_loss_coeff="lots"), "moe_aux_loss_coeff", "expects a number"),
    (dict(recompute_granularity="everything"), "recompute_granularity", "'everything' is not one of 'full', 'selective'"),
    (dict(recompute_method="recompute", recompute_granularity="full"), "recompute_method", "is not one of"),
])
def test_every_value_is_type_checked(values, key, words):
    from llamafactory_mca.args import megatron_args_from_dict

    with pytest.raises(McaArgumentError) as err:
        megatron_args_from_dict(values)
    assert f"`{key}`" in str(err.value) and words in str(err.value) and "Fix:" in str(err.value)


def test_values_are_coerced_and_recompute_modules_accepts_a_list():
    from llamafactory_mca.args import megatron_args_from_dict, recompute_module_list

    m = megatron_args_from_dict(dict(tensor_model_parallel_size="2", sequence_parallel="true", moe_aux_loss_coeff=1,
                                     recompute_granularity="selective", recompute_modules=["core_attn", "mlp"],
                                     pipeline_model_parallel_size=None))
    assert (m.tensor_model_parallel_size, m.sequence_parallel, m.moe_aux_loss_coeff) == (2, True, 1.0)
    assert m.pipeline_model_parallel_size == 1  # null (as mcore_adapter recipes write it) is the default
    assert m.recompute_modules == "core_attn,mlp" and recompute_module_list(m) == ["core_attn", "mlp"]
    validate_megatron_args(m, 2)
    assert recompute_module_list(megatron_args_from_dict(dict(recompute_modules="core_attn, mlp"))) == ["core_attn",
                                                                                                       "mlp"]


@pytest.mark.parametrize("config,settings,world,key,words", [
    (dict(num_hidden_layers=4, num_attention_heads=4), dict(expert_model_parallel_size=2), 2,
     "expert_model_parallel_size", "dense"),
    (dict(num_hidden_layers=4, num_attention_heads=4, num_experts=6), dict(expert_model_parallel_size=4), 4,
     "expert_model_parallel_size", "6 experts"),
    (dict(num_hidden_layers=4, num_attention_heads=6), dict(tensor_model_parallel_size=4), 4,
     "tensor_model_parallel_size", "6 attention heads"),
    (dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2), dict(tensor_model_parallel_size=4), 4,
     "tensor_model_parallel_size", "2 key/value heads"),
    (dict(num_hidden_layers=6, num_attention_heads=4), dict(pipeline_model_parallel_size=4), 4,
     "pipeline_model_parallel_size", "6 layers"),
    # VL models: their text_config is checked (context parallelism runs for them: tests/test_vl_packing_cp.py)
    (dict(text_config=dict(num_hidden_layers=6, num_attention_heads=6), model_type="qwen2_vl"),
     dict(tensor_model_parallel_size=4, context_parallel_size=2), 8, "tensor_model_parallel_size",
     "6 attention heads"),
    (dict(num_hidden_layers=5, num_attention_heads=4),
     dict(pipeline_model_parallel_size=3, num_layers_in_first_pipeline_stage=2), 3,
     "num_layers_in_first_pipeline_stage", "do not split evenly"),
])
def test_layout_is_cross_checked_with_config_json(tmp_path, config, settings, world, key, words):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    with pytest.raises(McaArgumentError) as err:
        validate_megatron_args(MegatronArguments(**settings), world, str(tmp_path))
    assert f"`{key}`" in str(err.value) and words in str(err.value), str(err.value)


def test_uneven_pipeline_split_that_fits_passes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 5,
                                                      "num_attention_heads": 4, "num_experts": 4}))
    validate_megatron_args(MegatronArguments(pipeline_model_parallel_size=3, num_layers_in_first_pipeline_stage=1,
                                             expert_model_parallel_size=2), 6, str(tmp_path))


def test_upstream_and_llamafactory_keys_reach_the_parsed_arguments(tmp_path, monkeypatch):
    """mcore_adapter's `sequence_packing` is neat_packing, keys that agree are accepted, `deepspeed` is dropped,
    `recompute_modules` may be a list; ALLOW_EXTRA_ARGS accepts 'y' like LLaMA-Factory."""
    mca, lf = _parse(tmp_path, sequence_packing=True, ckpt_format="torch_dist", mtp_num_layers=0,
                     calculate_per_token_loss=True, deepspeed="examples/deepspeed/ds_z3_config.json",
                     recompute_granularity="selective", recompute_modules=["core_attn", "mlp"], ddp_bucket_size=1000)
    assert lf[1].neat_packing and lf[1].packing
    assert not lf[2].deepspeed
    assert mca[MegatronArguments].recompute_modules == "core_attn,mlp"
    assert mca[MegatronArguments].ddp_bucket_size == 1000
    with pytest.raises(McaArgumentError, match="`optimizer_cpu_offload` .*Fix: remove the key"):
        _parse(tmp_path, optimizer_cpu_offload=True)
    with pytest.raises(McaArgumentError, match="`fp8`: 'e5m2' is not an FP8 format"):
        _parse(tmp_path, fp8="e5m2")
    mca, lf = _parse(tmp_path, fp8=True, fp8_recipe="rowwise")  # issue 18: our FP8 GEMMs, not accelerate's
    assert (mca[MegatronArguments].fp8_format, mca[MegatronArguments].fp8_recipe) == ("e4m3", "rowwise")
    assert not lf[2].fp8
    monkeypatch.setenv("ALLOW_EXTRA_ARGS", "y")
    _parse(tmp_path, some_extra_key=1)


def test_non_finite_step_names_step_and_value():
    from llamafactory_mca.training.logging import NonFiniteError, check_finite

    check_finite(1, 2.5, 0.3)
    with pytest.raises(NonFiniteError, match=r"step 7: grad_norm = inf \(check_for_nan_in_loss_and_grad\)"):
        check_finite(7, 2.5, float("inf"))
    with pytest.raises(NonFiniteError, match=r"step 2: loss = nan\b"):
        check_finite(2, float("nan"), None)


CUDA_GRAPH_BAD = [
    # (settings, a word of the refusal): `cuda_graph_impl: local` is refused where the captured layers cannot replay
    (dict(tensor_model_parallel_size=2), "tensor_model_parallel_size: 1"),
    (dict(pipeline_model_parallel_size=2), "pipeline_model_parallel_size: 1"),
    (dict(context_parallel_size=2), "context_parallel_size: 1"),
    (dict(recompute_granularity="full"), "recompute"),
    (dict(fp8_format="e4m3"), "FP8"),
]


@pytest.mark.parametrize("settings,words", CUDA_GRAPH_BAD)
def test_cuda_graphs_refuse_what_they_cannot_replay(settings, words):
    with pytest.raises(McaArgumentError) as err:
        validate_megatron_args(MegatronArguments(cuda_graph_impl="local", **settings), None)
    text = str(err.value)
    assert "`cuda_graph_impl`" in text and words in text and "Fix:" in text and "cuda_graph_impl: none" in text
    validate_megatron_args(MegatronArguments(**settings), None)  # the same settings without graphs run


def test_cuda_graphs_refuse_moe_models_and_accept_dense_ones():
    m = MegatronArguments(cuda_graph_impl="local")
    moe = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4}
    with pytest.raises(McaArgumentError, match="`cuda_graph_impl`.*MoE"):
        validate_megatron_args(m, 1, config=moe)
    validate_megatron_args(m, 1, config={"model_type": "qwen3", "num_hidden_layers": 2, "num_attention_heads": 4})


@pytest.mark.parametrize("recipe,words", [
    (dict(stage="sft"), "stage pt"),
    (dict(stage="pt", finetuning_type="lora"), "LoRA"),
    (dict(stage="pt", finetuning_type="full", val_size=0.1), "val_size"),
    (dict(stage="pt", finetuning_type="full", do_eval=True), "do_eval"),
])
def test_cuda_graphs_refuse_recipes_whose_batches_they_cannot_replay(recipe, words):
    from llamafactory_mca.recipe_checks import check_llamafactory_keys

    with pytest.raises(McaArgumentError) as err:
        check_llamafactory_keys(dict(recipe, cuda_graph_impl="local"))
    assert "`cuda_graph_impl`" in str(err.value) and words in str(err.value) and "Fix:" in str(err.value)
    check_llamafactory_keys(dict(recipe))  # accepted without graphs
    check_llamafactory_keys(dict(stage="pt", finetuning_type="full", cuda_graph_impl="local"))
