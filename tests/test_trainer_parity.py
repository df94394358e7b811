"""Loss parity with LLaMA-Factory's Hugging Face path, through the real command lines.

The same tiny model (random weights, local tokenizer) is trained on the same data for a few steps with
`llamafactory-cli train` (HF Trainer) and `USE_MCA=1 llamafactory-cli train` (ours), fp32 on CPU; the per-step
losses in trainer_log.jsonl must agree to a relative 1e-4. Sequences have unequal lengths, so the loss is only
equal if it is token-weighted across microbatches and data-parallel ranks as the HF Trainer weights it, and the
batches only match if each step draws the HF Trainer's samples.

One HF run serves several layouts: with the same global batch (4 samples per step) the HF Trainer's step k
holds the same 4 samples whether they come as 2 batches of 2 on one process or 4 batches of 1 on 2 ranks, and
the token-weighted loss of a step does not depend on how its samples are grouped.
"""

from __future__ import annotations

import json
import os

import pytest
from lf_runs import (
    REL_TOL,
    STEPS,
    assert_parity,
    make_models,
    make_recipe,
    train,
    training_history,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_dense(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_dense")
    return train(tmp, "hf_dense", make_recipe(models["dense"], str(tmp / "out")), mca=False)


def test_single_process_parity_and_hf_export(models, hf_dense, tmp_path):
    out = train(tmp_path, "mca_1p", make_recipe(models["dense"], str(tmp_path / "out"), save_strategy="steps",
                                            save_steps=1000))
    assert_parity(hf_dense, out)
    for name in ("trainer_state.json", "train_results.json", "all_results.json", "config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "train_results.json")) as f:
        results = json.load(f)
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch"):
        assert key in results, key
    with open(os.path.join(hf_dense, "train_results.json")) as f:
        assert abs(results["train_loss"] - json.load(f)["train_loss"]) <= 1e-4 * results["train_loss"]
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["global_step"] == STEPS and all("grad_norm" in h for h in state["log_history"][:STEPS])
    # same updates: the exported model equals the HF-trained one
    import torch
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(out).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(hf_dense).state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


def test_tp2_parity(models, hf_dense, tmp_path):
    # Sequence parallel on top of TP: norm-weight gradients must then be reduced over the TP group too.
    recipe = make_recipe(models["dense"], str(tmp_path / "out"), tensor_model_parallel_size=2, sequence_parallel=True,
                     save_hf_model=False)
    assert_parity(hf_dense, train(tmp_path, "mca_tp2", recipe, nproc=2))


@pytest.mark.extended  # PP=2 also runs interleaved (VPP) below
def test_pp2_ga4_parity(models, hf_dense, tmp_path):
    recipe = make_recipe(models["dense"], str(tmp_path / "out"), pipeline_model_parallel_size=2,
                     per_device_train_batch_size=1, gradient_accumulation_steps=4, save_hf_model=False)
    assert_parity(hf_dense, train(tmp_path, "mca_pp2", recipe, nproc=2))


def test_pp2_interleaved_parity(models, hf_dense, tmp_path):
    recipe = make_recipe(models["dense"], str(tmp_path / "out"), pipeline_model_parallel_size=2,
                     virtual_pipeline_model_parallel_size=2, per_device_train_batch_size=1,
                     gradient_accumulation_steps=4, save_hf_model=False)
    assert_parity(hf_dense, train(tmp_path, "mca_vpp2", recipe, nproc=2))


def test_dp2_distributed_optimizer_parity(models, hf_dense, tmp_path):
    """2 data-parallel ranks against the HF path on 2 processes (and the 1-process run: same global batches)."""
    hf2 = train(tmp_path, "hf_dp2", make_recipe(models["dense"], str(tmp_path / "hf"), per_device_train_batch_size=1),
                nproc=2, mca=False)
    recipe = make_recipe(models["dense"], str(tmp_path / "out"), per_device_train_batch_size=1,
                     use_distributed_optimizer=True, save_hf_model=False)
    ours = train(tmp_path, "mca_dp2", recipe, nproc=2)
    assert_parity(hf2, ours)
    assert_parity(hf_dense, ours)


def test_moe_ep2_parity(models, tmp_path):
    """Qwen3-MoE with 2 expert-parallel ranks and `moe_aux_loss_coef`: the HF path's pooled router aux loss of each
    micro-batch (2 rows each on both sides: the loss depends on the grouping) is in the logged loss; with
    LLaMA-Factory's default reentrant gradient checkpointing the HF path back-propagates none of it, nor do we
    (models/router_aux_loss.py; the family test of qwen2_moe trains on it)."""
    hf = train(tmp_path, "hf_moe", make_recipe(models["moe"], str(tmp_path / "hf"), moe_aux_loss_coef=0.1),
               mca=False)
    recipe = make_recipe(models["moe"], str(tmp_path / "out"), gradient_accumulation_steps=1,
                         expert_model_parallel_size=2, moe_aux_loss_coef=0.1)
    ours = train(tmp_path, "mca_moe", recipe, nproc=2)
    assert_parity(hf, ours)
    aux = [h["load_balancing_loss"] for h in training_history(ours)]
    assert len(aux) == STEPS and all(a > 1.0 for a in aux), aux  # 2 micro-batches per step, each >= 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ours)  # the exported MoE model loads


def test_pt_with_eval_parity(models, tmp_path):
    """Stage pt (packed blocks), cosine schedule with warmup ratio, eval during training and at the end."""
    common = dict(stage="pt", dataset="tiny_pt", cutoff_len=64, max_steps=4, lr_scheduler_type="cosine",
                  warmup_steps=0.25, val_size=0.2, per_device_eval_batch_size=2, eval_strategy="steps",
                  eval_steps=2, do_eval=True, plot_loss=True)
    common.pop("template", None)
    hf = train(tmp_path, "hf_pt", {**make_recipe(models["dense"], str(tmp_path / "hf")), **common}, mca=False)
    ours = train(tmp_path, "mca_pt", {**make_recipe(models["dense"], str(tmp_path / "out")), **common,
                                      "save_hf_model": False})
    assert_parity(hf, ours, expected=4)
    assert_parity(hf, ours, key="eval_loss", expected=2)  # steps 2 and 4 (the final evaluate() is not in the log)
    assert os.path.isfile(os.path.join(ours, "training_loss.png"))
    with open(os.path.join(ours, "eval_results.json")) as f:
        final = json.load(f)
    with open(os.path.join(hf, "eval_results.json")) as f:
        final_hf = json.load(f)
    assert abs(final["eval_loss"] - final_hf["eval_loss"]) <= REL_TOL * final_hf["eval_loss"]
    assert "eval_perplexity" in final
