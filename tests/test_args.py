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


@pytest.mark.parametrize("stage", ["rm", "ppo", "kto"])
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
