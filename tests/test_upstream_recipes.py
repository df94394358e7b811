"""Recipes written for LLaMA-Factory's own USE_MCA mode train through ours with only model, data and layout changed.

The two recipes below hold the keys and values of LLaMA-Factory's published `examples/megatron/qwen3_moe_full.yaml`
and `qwen2_vl_full.yaml` as its users have them (string learning rates such as `3e-6` included: YAML reads them as
text). Each runs in both versions users have: as published, and with `use_mca: true` (LLaMA-Factory's newer key for
the same mode). Only the model (tiny, random weights), the data (tests/data), the steps and the layout (2 CPU
processes, and `bf16: false`, which transformers' TrainingArguments demands on a CPU without bf16) change; `apply_rope_fusion` / `bias_activation_fusion` stay as written (switched off where they cannot
run, without an error).
"""

from __future__ import annotations

import os

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

UPSTREAM_MOE = {
    "model_name_or_path": "Qwen/Qwen3-30B-A3B-Instruct-2507", "do_train": True, "stage": "sft",
    "finetuning_type": "full", "dataset": "alpaca_en_demo", "preprocessing_num_workers": 8, "cutoff_len": 4096,
    "template": "qwen3_nothink", "output_dir": "saves/mca/qwen3_moe_full", "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8, "num_train_epochs": 2, "learning_rate": "3e-6", "logging_steps": 1,
    "save_steps": 100, "lr_scheduler_type": "constant", "bf16": True,
    "tensor_model_parallel_size": 1, "sequence_parallel": False, "pipeline_model_parallel_size": 4,
    "bias_activation_fusion": True, "apply_rope_fusion": True, "use_distributed_optimizer": True,
    "overlap_param_gather": True, "overlap_grad_reduce": True, "moe_grouped_gemm": True,
    "moe_token_dispatcher_type": "alltoall", "expert_model_parallel_size": 2, "recompute_granularity": "full",
}
UPSTREAM_VL = {
    "model_name_or_path": "Qwen/Qwen2-VL-7B-Instruct", "image_max_pixels": 262144, "video_max_pixels": 16384,
    "do_train": True, "stage": "sft", "finetuning_type": "full", "dataset": "llava_1k_en",
    "preprocessing_num_workers": 8, "cutoff_len": 4096, "template": "qwen2_vl", "output_dir": "saves/mca/qwen2_vl_full",
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "num_train_epochs": 2,
    "learning_rate": "2e-5", "logging_steps": 1, "save_steps": 100, "lr_scheduler_type": "cosine", "bf16": True,
    "tensor_model_parallel_size": 4, "sequence_parallel": True, "pipeline_model_parallel_size": 2,
    "bias_activation_fusion": True, "apply_rope_fusion": True, "use_distributed_optimizer": True,
}


def _adapted(recipe: dict, model: str, out: str, dataset: str, template: str, layout: dict, use_mca: bool) -> dict:
    """The recipe with only model, data, steps and layout changed (and `use_mca: true` for the newer version)."""
    adapted = dict(recipe, model_name_or_path=model, dataset=dataset, dataset_dir=os.path.join(REPO, "tests", "data"),
                   template=template, cutoff_len=256, output_dir=out, max_steps=2, overwrite_cache=True,
                   report_to="none", bf16=False, **layout)  # transformers refuses bf16 on CPUs without it
    if use_mca:
        adapted["use_mca"] = True
    return adapted


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from lf_runs import make_models

    return make_models(tmp_path_factory)["moe"]


@pytest.mark.parametrize("use_mca", [pytest.param(False, marks=pytest.mark.extended), True],
                         ids=["as_published", "use_mca"])  # each recipe once, each spelling once
def test_upstream_moe_recipe_trains(tiny_moe, tmp_path, use_mca):
    from lf_runs import losses, train

    layout = dict(pipeline_model_parallel_size=2, expert_model_parallel_size=1, gradient_accumulation_steps=2)
    out = train(tmp_path, "upstream_moe", _adapted(UPSTREAM_MOE, tiny_moe, str(tmp_path / "out"), "tiny_sft", "qwen",
                                                   layout, use_mca), nproc=2)
    assert len(losses(out)) == 2 and all(x == x and x > 0 for x in losses(out))


@pytest.mark.parametrize("use_mca", [False, pytest.param(True, marks=pytest.mark.extended)],
                         ids=["as_published", "use_mca"])
def test_upstream_vl_recipe_trains(tmp_path, use_mca):
    from lf_runs import losses, train
    from test_vl_train import make_tiny_vl_model

    model = make_tiny_vl_model(str(tmp_path / "qwen2_vl"))
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    out = train(tmp_path, "upstream_vl", _adapted(UPSTREAM_VL, model, str(tmp_path / "out"), "tiny_vl", "qwen2_vl",
                                                  layout, use_mca), nproc=2)
    assert len(losses(out)) == 2 and all(x == x and x > 0 for x in losses(out))
    assert os.path.isfile(os.path.join(out, "config.json"))  # the final Hugging Face export
