"""use_dora on the dense TP linears against PEFT's DoRA (and LLaMA-Factory's HF path, which resumes a DoRA adapter).

Both backends start from the same PEFT DoRA adapter (random A, B and magnitude, so it changes the model from step
1). Per-step losses agree to 1e-4 relative in one process and with TP=2 (the row-parallel layers' magnitude needs
the full-row norm: a TP all-reduce); the adapter we write is a PEFT DoRA adapter matching the HF-trained one. The
torchrun worker of test_lora (tests/lora_worker.py) checks logits, the PEFT export and the merged model for TP=2
(+ sequence parallel) and PP=2; merging a DoRA adapter into the base weights (`llamafactory-mca merge
--merge_lora`) equals PEFT's merge_and_unload.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from lf_runs import assert_parity, make_lora_adapter, make_models, make_recipe, train
from workers import launch_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_models(tmp_path_factory)["dense"]


@pytest.fixture(scope="module")
def init_adapter(dense, tmp_path_factory):
    """A PEFT DoRA adapter (every linear) with random B and perturbed magnitudes."""
    return make_lora_adapter(dense, str(tmp_path_factory.mktemp("dora") / "init"), seed=5, use_dora=True)


def _dora(recipe: dict, adapter: str) -> dict:
    return {**recipe, "finetuning_type": "lora", "adapter_name_or_path": adapter, "lora_target": "all",
            "lora_dropout": 0.0, "use_dora": True}


@pytest.fixture(scope="module")
def hf_run(dense, init_adapter, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_dora")
    return train(tmp, "hf_dora", _dora(make_recipe(dense, str(tmp / "out")), init_adapter), mca=False)


@pytest.mark.parametrize("layout", [pytest.param("1proc", marks=pytest.mark.extended), "tp2"])
def test_dora_parity(dense, init_adapter, hf_run, tmp_path, layout):
    from safetensors.torch import load_file

    extra, nproc = ({}, 1) if layout == "1proc" else ({"tensor_model_parallel_size": 2}, 2)
    recipe = _dora(make_recipe(dense, str(tmp_path / "out"), **extra), init_adapter)
    ours = train(tmp_path, f"mca_dora_{layout}", recipe, nproc=nproc)
    assert_parity(hf_run, ours)
    theirs, mine = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (hf_run, ours))
    assert sorted(theirs) == sorted(mine) and any(k.endswith("lora_magnitude_vector") for k in mine)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-3, atol=2e-5, msg=k)
    with open(os.path.join(ours, "adapter_config.json")) as f:
        assert json.load(f)["use_dora"] is True


def test_dora_logits_and_exports_against_peft(dense, init_adapter, tmp_path):
    per_rank = launch_worker("lora_worker.py", ["--model", dense, "--adapter", init_adapter,
                                                "--layouts", "tp2sp,pp2"], tmp_path, key=("layout",))
    for rank, results in enumerate(per_rank):
        assert set(results) == {"tp2sp", "pp2"}
        for r in results.values():
            assert "error" not in r, r["error"]
            assert r["non_adapter_trainable"] == [], r
            for key in ("logits_vs_peft", "merged_logits_vs_peft", "exported_adapter_logits_diff",
                        "merged_hf_logits_diff"):
                if key in r:  # logits on the last pipeline stage, the exports on rank 0
                    assert r[key] <= 1e-5, (key, r)
            if rank == 0:
                assert r["export_keys_equal"] and r["export_not_equal"] == [], r
    assert "logits_vs_peft" in per_rank[0]["tp2sp"] and "logits_vs_peft" in per_rank[1]["pp2"]


def test_dora_merge_equals_peft_merge_and_unload(dense, init_adapter):
    """`merge --merge_lora`'s per-tensor update of a DoRA adapter (m / |W + s B A| (W + s B A)) equals PEFT's."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamafactory_mca.export.lora_merge import merge_updates
    from llamafactory_mca.models import get_bridge
    from llamafactory_mca.models.lora import lora_scaling

    with open(os.path.join(init_adapter, "adapter_config.json")) as f:
        config = json.load(f)
    adapter = load_file(os.path.join(init_adapter, "adapter_model.safetensors"))
    hf_config = AutoConfig.from_pretrained(dense)
    updates = merge_updates(adapter, config, lora_scaling(4, 8, False), get_bridge(hf_config), hf_config)
    base = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).state_dict()
    with torch.no_grad():
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32),
                                           init_adapter).merge_and_unload().state_dict()
    assert len(updates) == 7 * 4  # every linear of the 4 layers
    for name, update in updates.items():
        torch.testing.assert_close(update(base[name].float()), merged[name], rtol=1e-6, atol=1e-6, msg=name)
