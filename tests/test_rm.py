"""stage: rm under Megatron against LLaMA-Factory's HF reward-model path (PairwiseTrainer on TRL's
AutoModelForCausalLMWithValueHead), fp32, CPU.

Both sides start from the same value head: the model directory holds a `value_head.safetensors` (LLaMA-Factory's
loader reads it from there) and `summary_dropout_prob: 0.0` in its config.json (TRL's value-head dropout, 0.1 by
default, draws random masks that no two backends share). One HF run (full fine-tuning, with a final evaluation)
is the reference of the 1-process, TP=2 (+ sequence parallel) and PP=2 runs: the loss of every step, eval_loss and
eval_accuracy agree to a relative 1e-4. The 1-process export is loaded as LLaMA-Factory loads a reward model
(`load_model(add_valuehead=True)`): its value head and weights equal the HF run's, and so does what
`llamafactory-mca merge` makes of the run's last checkpoint (value_head.safetensors included).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from conftest import run_checked
from lf_runs import add_seeded_value_head, make_recipe, make_tiny_model, train, training_history


STEPS = 4
RM = dict(stage="rm", dataset="tiny_pairwise", max_steps=STEPS, learning_rate=1.0e-3, warmup_steps=0,
          do_eval=True, val_size=0.25, per_device_eval_batch_size=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny dense model with a seeded value head file and no value-head dropout."""
    return add_seeded_value_head(make_tiny_model(str(tmp_path_factory.mktemp("models") / "dense_rm")))


@pytest.fixture(scope="module")
def hf_rm(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_rm")
    return train(tmp, "hf_rm", make_recipe(model, str(tmp / "out"), **RM), mca=False)


def assert_rm_parity(hf_dir: str, ours_dir: str) -> None:
    hf, ours = ([h["loss"] for h in training_history(d)] for d in (hf_dir, ours_dir))
    assert len(hf) == len(ours) == STEPS, (hf, ours)
    rel = [abs(a - b) / abs(a) for a, b in zip(hf, ours)]
    assert max(rel) <= 1e-4, list(zip(hf, ours))
    assert len(set(round(x, 6) for x in hf)) > 1  # the loss moves: the steps are not all alike
    with open(os.path.join(hf_dir, "eval_results.json")) as f:
        hf_eval = json.load(f)
    with open(os.path.join(ours_dir, "eval_results.json")) as f:
        our_eval = json.load(f)
    for key in ("eval_loss", "eval_accuracy"):
        assert abs(hf_eval[key] - our_eval[key]) <= 1e-4 * abs(hf_eval[key]) + 1e-6, (key, hf_eval, our_eval)
    print(f"RM parity {ours_dir}: losses HF {hf} MCA {ours}, max rel {max(rel):.2e}; eval HF {hf_eval['eval_loss']} "
          f"/ {hf_eval['eval_accuracy']}, MCA {our_eval['eval_loss']} / {our_eval['eval_accuracy']}")


def _load_reward_model(path: str):
    """The reward model as LLaMA-Factory loads one (its chat / PPO paths): load_model(add_valuehead=True)."""
    from llamafactory.hparams import FinetuningArguments, ModelArguments
    from llamafactory.model import load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=path)
    finetuning_args = FinetuningArguments(stage="rm", finetuning_type="full")
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    return load_model(tokenizer, model_args, finetuning_args, is_trainable=False, add_valuehead=True)


@pytest.mark.slow
def test_rm_single_process_and_export(model, hf_rm, tmp_path):
    out = train(tmp_path, "mca_rm", make_recipe(model, str(tmp_path / "out"), save_strategy="steps",
                                                save_steps=STEPS, **RM))
    assert_rm_parity(hf_rm, out)
    assert os.path.isfile(os.path.join(out, "value_head.safetensors"))
    ours, theirs = _load_reward_model(out), _load_reward_model(hf_rm)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for key in theirs_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=1e-3, atol=1e-5, msg=key)
    start = _load_reward_model(model).state_dict()
    assert not torch.equal(ours_sd["v_head.summary.weight"], start["v_head.summary.weight"])  # it trained
    # the output layer gets no gradient on either path: it is exported unchanged
    lm = [k for k in theirs_sd if k.endswith("lm_head.weight")]
    assert lm and torch.equal(ours_sd[lm[0]], start[lm[0]])
    # `llamafactory-mca merge` of the last checkpoint writes the same reward model, value head included
    merged = str(tmp_path / "merged")
    run_checked([sys.executable, "-m", "llamafactory_mca.cli", "merge", "--checkpoint_path",
                 os.path.join(out, f"checkpoint-{STEPS}"), "--output_path", merged, "--fp32"])
    assert os.path.isfile(os.path.join(merged, "value_head.safetensors"))
    merged_sd = _load_reward_model(merged).state_dict()
    assert set(merged_sd) == set(ours_sd) and all(torch.equal(merged_sd[k], ours_sd[k]) for k in ours_sd)
    shutil.rmtree(out)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(pipeline_model_parallel_size=2),
                                    pytest.param(dict(tensor_model_parallel_size=2, sequence_parallel=True),
                                                 marks=pytest.mark.extended)], ids=["pp2", "tp2sp"])
def test_rm_parallel(model, hf_rm, tmp_path, layout):
    out = train(tmp_path, "mca_rm_par", make_recipe(model, str(tmp_path / "out"), save_hf_model=False, **RM,
                                                    **layout), nproc=2)
    assert_rm_parity(hf_rm, out)


@pytest.mark.parametrize("recipe, key", [
    (dict(stage="rm", finetuning_type="lora"), "finetuning_type"),
    (dict(stage="rm"), "finetuning_type"),  # LLaMA-Factory's default finetuning_type is lora
    (dict(stage="rm", finetuning_type="full", context_parallel_size=2), "context_parallel_size"),
    (dict(stage="kto", finetuning_type="full", neat_packing=True), "neat_packing"),
    (dict(stage="kto", finetuning_type="lora", loss_weighting="sample"), "loss_weighting"),
    (dict(stage="rm", finetuning_type="full", loss_weighting="token"), "loss_weighting"),
])
def test_stage_refusals(recipe, key):
    """What rm / kto do not run is refused by the whole-recipe check (before torchrun), naming the key."""
    from llamafactory_mca.args import McaArgumentError
    from llamafactory_mca.recipe import check_recipe

    with pytest.raises(McaArgumentError, match=key):
        check_recipe(dict(model_name_or_path="Qwen/Qwen3-8B", **recipe), 2)


def test_stages_accepted():
    from llamafactory_mca.recipe import check_recipe

    for recipe in (dict(stage="rm", finetuning_type="freeze"), dict(stage="kto", finetuning_type="lora"),
                   dict(stage="rm", finetuning_type="full", loss_weighting="sample")):
        check_recipe(dict(model_name_or_path="Qwen/Qwen3-8B", **recipe), 2)
