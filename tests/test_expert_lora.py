"""LoRA on MoE experts (qwen3_moe) under Megatron against LLaMA-Factory's HF path + PEFT.

LLaMA-Factory's HF path creates no expert adapter from `lora_target` (its `all` finds nn.Linear modules only,
and transformers 5 keeps the experts as fused 3D parameters), but it trains one it resumes: the reference adapter
is built with PEFT directly (attention `target_modules` + `target_parameters` mlp.experts.gate_up_proj /
mlp.experts.down_proj, random A and B) and both backends start from it through `adapter_name_or_path`. Per-step
losses agree to 1e-4 relative in one process, with EP=2 and with TP=2 + expert TP=2, and the adapters we write
match the HF-trained one. A torchrun worker (tests/expert_lora_worker.py) checks logits, the PEFT export and the
merged model against PEFT on a model whose expert sizes all differ, and that a checkpoint of expert adapters
written under EP=2 loads bit-exactly under EP=1 and under TP=2 + expert TP=2; training resumes from it across
EP=2 -> EP=1 -> EP=2 (optimizer state included).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from lf_runs import assert_parity, losses, make_models, make_recipe, train
from workers import launch_worker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from expert_lora_worker import ATTENTION, EXPERTS, make_adapter, make_model  # noqa: E402


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_models(tmp_path_factory)["moe"]


@pytest.fixture(scope="module")
def init_adapter(moe, tmp_path_factory):
    return make_adapter(moe, str(tmp_path_factory.mktemp("adapter") / "init"), seed=11)


def _lora(recipe: dict, adapter: str) -> dict:
    return {**recipe, "finetuning_type": "lora", "adapter_name_or_path": adapter, "lora_target": "all",
            "lora_dropout": 0.0}


def _recipe(moe: str, out: str, **overrides) -> dict:
    return make_recipe(moe, out, moe_router_load_balancing_type="none", **overrides)


@pytest.fixture(scope="module")
def hf_run(moe, init_adapter, tmp_path_factory):
    """The one HF + PEFT reference run every layout compares with."""
    tmp = tmp_path_factory.mktemp("hf_expert_lora")
    recipe = _lora(make_recipe(moe, str(tmp / "out")), init_adapter)
    return train(tmp, "hf_expert_lora", recipe, mca=False)


def _assert_same_adapter(hf_dir: str, ours_dir: str) -> None:
    from safetensors.torch import load_file

    theirs = load_file(os.path.join(hf_dir, "adapter_model.safetensors"))
    ours = load_file(os.path.join(ours_dir, "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    assert any(".experts.base_layer.lora_A." in k for k in ours)  # gate_up_proj's (nested) and down_proj's
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=2e-5, msg=k)
    with open(os.path.join(ours_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert sorted(cfg["target_modules"]) == sorted(ATTENTION) and cfg["target_parameters"] == EXPERTS


@pytest.mark.slow
@pytest.mark.parametrize("layout", [pytest.param("1proc", marks=pytest.mark.extended), "ep2", "tp2etp"])
def test_expert_lora_parity(moe, init_adapter, hf_run, tmp_path, layout):
    out = str(tmp_path / "out")
    if layout == "1proc":
        recipe, nproc = _recipe(moe, out), 1
    elif layout == "ep2":  # 2 data-parallel ranks of 1 sample x 2 micro-batches = HF's batch
        recipe, nproc = _recipe(moe, out, per_device_train_batch_size=1, expert_model_parallel_size=2), 2
    else:
        recipe, nproc = _recipe(moe, out, tensor_model_parallel_size=2, sequence_parallel=True,
                                expert_tensor_parallel_size=2), 2
    ours = train(tmp_path, f"mca_expert_lora_{layout}", _lora(recipe, init_adapter), nproc=nproc)
    assert_parity(hf_run, ours)
    _assert_same_adapter(hf_run, ours)


@pytest.mark.slow
@pytest.mark.extended
def test_expert_lora_resume_after_changing_ep(moe, init_adapter, hf_run, tmp_path):
    """A checkpoint written under EP=2 (adapter tensors and their optimizer state: megatron chains a second
    optimizer for the expert adapters) resumes in one process (EP=1, one optimizer), whose checkpoint resumes
    under EP=2 again; both continue with the HF run's losses (the tensors themselves: test_checkpoint_resume's
    test_resume_after_changing_ep)."""
    recipe = _recipe(moe, str(tmp_path / "out"), per_device_train_batch_size=1, expert_model_parallel_size=2,
                     save_strategy="steps", save_steps=3)
    out = train(tmp_path, "mca_expert_lora_ckpt", _lora(recipe, init_adapter), nproc=2)
    assert_parity(hf_run, out)
    hf = losses(hf_run)
    resumed = _recipe(moe, str(tmp_path / "resumed"), resume_from_checkpoint=os.path.join(out, "checkpoint-3"),
                      save_strategy="steps", save_steps=4)
    out2 = train(tmp_path, "mca_expert_lora_resume_ep1", _lora(resumed, init_adapter))
    ours = losses(out2)
    assert len(ours) == 2, ours
    for a, b in zip(hf[3:], ours):
        assert abs(a - b) <= 1e-4 * abs(a), (hf, ours)
    back = _recipe(moe, str(tmp_path / "back"), per_device_train_batch_size=1, expert_model_parallel_size=2,
                   resume_from_checkpoint=os.path.join(out2, "checkpoint-4"))
    out3 = train(tmp_path, "mca_expert_lora_resume_ep2", _lora(back, init_adapter), nproc=2)
    last = losses(out3)
    assert len(last) == 1 and abs(hf[4] - last[0]) <= 1e-4 * abs(hf[4]), (hf, last)
    assert abs(last[0] - ours[1]) <= 1e-6 * abs(ours[1]), (ours, last)  # the same step 5, up to reduction order


@pytest.mark.slow
def test_expert_lora_logits_exports_and_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_lora_worker")
    model = make_model(str(root / "model"))
    adapter = make_adapter(model, str(root / "adapter"), seed=7)
    per_rank = launch_worker("expert_lora_worker.py", ["--model", model, "--adapter", adapter,
                                                       "--layouts", "ep2,tp2etp,dp2"], root, key=("layout",))
    for rank, results in enumerate(per_rank):
        assert set(results) == {"ep2", "tp2etp", "dp2"}
        for layout, r in results.items():
            assert "error" not in r, r["error"]
            assert r["ep_etp"] == {"ep2": [2, 1], "tp2etp": [1, 2], "dp2": [1, 1]}[layout], r
            assert r["target_parameters"] == ["gate_up_proj", "down_proj"] and r["non_adapter_trainable"] == []
            keys = ("logits_vs_peft", "merged_logits_vs_peft") + (
                ("exported_adapter_logits_diff", "merged_hf_logits_diff") if rank == 0 else ())
            for key in keys:
                assert r[key] <= 1e-5, (key, r)
            if rank == 0:
                if layout != "ep2":  # the EP=2 checkpoint loads bit-exactly here
                    assert r["ckpt_differs_before"] and r["ckpt_loaded_equal"], r
                assert r["adapter_effect"] > 0.1, r
                if layout == "dp2":  # llamafactory-mca merge of the EP=2 checkpoint (single process)
                    assert r["cli_adapter_equal"], r
                    assert r["cli_adapter_logits_diff"] <= 1e-5 and r["cli_merged_logits_diff"] <= 1e-5, r
                assert r["export_keys_equal"] and r["export_not_equal"] == [], r


@pytest.mark.parametrize("keys, key", [
    (dict(lora_dropout=0.1), "lora_dropout"),  # expert adapters have no dropout (PEFT refuses it too)
    (dict(use_dora=True), "use_dora"),  # PEFT has no DoRA for target_parameters
    (dict(use_dora=True, lora_dropout=0.1, lora_target=["q_proj"]), "lora_dropout"),  # DoRA: no dropout
])
def test_lora_options_refused_before_anything_is_built(tmp_path, keys, key):
    from types import SimpleNamespace

    from llamafactory_mca.arg_hooks import check_lora
    from llamafactory_mca.args import McaArgumentError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 4,
                                                       "num_hidden_layers": 2}))
    ft = SimpleNamespace(**{**dict(use_dora=False, pissa_init=False, use_llama_pro=False, additional_target=None,
                                   create_new_adapter=False, lora_dropout=0.0, lora_target=["all"]), **keys})
    model = SimpleNamespace(model_name_or_path=str(tmp_path), adapter_name_or_path=None, quantization_bit=None)
    with pytest.raises(McaArgumentError, match=key):
        check_lora(model, ft)
    check_lora(model, SimpleNamespace(**{**vars(ft), "lora_dropout": 0.0, "use_dora": False}))  # fine
