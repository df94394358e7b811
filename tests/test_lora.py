"""finetuning_type: lora under Megatron against LLaMA-Factory's HF + PEFT path.

Both sides start from the same PEFT adapter on disk (`adapter_name_or_path`, LLaMA-Factory's resume path), with
random A *and* B so that the adapter already changes the forward pass at step 1. Per-step losses must agree to
a relative 1e-4 with TP=2 (+ sequence parallel) and with PP=2; the adapter we write at the end is a PEFT adapter
whose tensors match the HF-trained one. A torchrun worker (tests/lora_worker.py) checks logits against PEFT for
tp2sp / pp2 / vpp2, the PEFT export (bit-identical round trip, same logits) and the merged HF export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from lf_runs import LORA_TARGETS, assert_parity, make_lora_adapter, make_models, make_recipe, train

from conftest import REPO
from lora_worker import assert_results as assert_lora_results

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory)


@pytest.fixture(scope="module")
def init_adapter(models, tmp_path_factory):
    """A PEFT adapter (r=4, alpha=8, all linear modules) with random A and B, saved to disk."""
    return make_lora_adapter(models["dense"], str(tmp_path_factory.mktemp("adapter") / "init"), seed=7)


def _lora(recipe: dict, adapter: str) -> dict:
    return {**recipe, "finetuning_type": "lora", "adapter_name_or_path": adapter, "lora_target": "all"}


@pytest.fixture(scope="module")
def hf_lora(models, init_adapter, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_lora")
    return train(tmp, "hf_lora", _lora(make_recipe(models["dense"], str(tmp / "out")), init_adapter), mca=False)


def _assert_same_adapter(hf_dir: str, ours_dir: str) -> None:
    from safetensors.torch import load_file

    theirs = load_file(os.path.join(hf_dir, "adapter_model.safetensors"))
    ours = load_file(os.path.join(ours_dir, "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=2e-5, msg=k)
    with open(os.path.join(ours_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(LORA_TARGETS)


def test_lora_tp2_sequence_parallel(models, init_adapter, hf_lora, tmp_path):
    recipe = _lora(make_recipe(models["dense"], str(tmp_path / "out"), tensor_model_parallel_size=2,
                               sequence_parallel=True), init_adapter)
    out = train(tmp_path, "mca_lora_tp2", recipe, nproc=2)
    assert_parity(hf_lora, out)
    _assert_same_adapter(hf_lora, out)


@pytest.mark.extended  # LoRA under PP=2 also in test_dpo.py::test_dpo_lora_pp2
def test_lora_pp2(models, init_adapter, hf_lora, tmp_path):
    recipe = _lora(make_recipe(models["dense"], str(tmp_path / "out"), pipeline_model_parallel_size=2,
                               per_device_train_batch_size=1, gradient_accumulation_steps=4), init_adapter)
    out = train(tmp_path, "mca_lora_pp2", recipe, nproc=2)
    assert_parity(hf_lora, out)
    _assert_same_adapter(hf_lora, out)


def test_lora_logits_and_exports_against_peft(models, init_adapter, tmp_path):
    out = str(tmp_path / "res")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "lora_worker.py"), "--model", models["dense"], "--adapter", init_adapter,
           "--out", out, "--layouts", "tp2sp,pp2,vpp2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert_lora_results(out)


def test_lora_checkpoint_holds_only_the_adapter_and_resumes(models, init_adapter, hf_lora, tmp_path):
    """save_steps under LoRA: the torch_dist checkpoint holds adapter tensors (and their optimizer state) only;
    resuming from it (PP=2) continues with the HF run's losses."""
    from torch.distributed.checkpoint import FileSystemReader

    recipe = _lora(make_recipe(models["dense"], str(tmp_path / "out"), save_strategy="steps", save_steps=3,
                               save_hf_model=False), init_adapter)
    out = train(tmp_path, "mca_lora_ckpt", recipe)
    assert_parity(hf_lora, out)
    ckpt = os.path.join(out, "checkpoint-3")
    keys = list(FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if not k.startswith("optimizer")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys[:10]
    assert os.path.isfile(os.path.join(ckpt, "adapter_model.safetensors"))  # a PEFT adapter beside, as HF's
    from llamafactory_mca.checkpoint import checkpoint_info

    info = checkpoint_info(ckpt)  # the adapter was part of the checkpoint when it was published
    assert info["adapter_only"] and info["base_model_name_or_path"] == models["dense"]
    resumed = _lora(make_recipe(models["dense"], str(tmp_path / "resumed"), pipeline_model_parallel_size=2,
                                per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                resume_from_checkpoint=ckpt), init_adapter)
    out2 = train(tmp_path, "mca_lora_resume", resumed, nproc=2)
    from lf_runs import losses

    hf, ours = losses(hf_lora), losses(out2)
    assert len(ours) == 2, ours
    for a, b in zip(hf[3:], ours):
        assert abs(a - b) <= 1e-4 * abs(a), (hf, ours)
