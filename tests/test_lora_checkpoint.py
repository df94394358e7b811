"""LoRA checkpoints: the PEFT adapter is part of the atomic checkpoint, the resume load is strict about the
adapter, and `llamafactory-mca merge` / `llamafactory-cli export` turn a LoRA checkpoint into the PEFT adapter
or the merged Hugging Face model (logits equal PEFT's base + adapter)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO, run_checked

WORKER = os.path.join(REPO, "tests", "lora_checkpoint_worker.py")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("lora_ckpt")
    model = make_tiny_model("qwen3", str(root / "qwen3"))  # odd vocab (1001), untied
    out = str(root / "out")
    proc = run_checked([sys.executable, WORKER, "--model", model, "--out", out])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"model": model, "out": out, "ckpt": os.path.join(out, "run", "checkpoint-1"),
            "res": json.loads(line[len("RESULT "):])}


def test_adapter_is_written_before_publishing(worker):
    res = worker["res"]
    assert res["marker"]["adapter_only"] is True and res["marker"]["finetuning_type"] == "lora"
    assert res["marker"]["base_model_name_or_path"] == worker["model"]
    assert os.path.samefile(res["marker"]["base_model_path"], worker["model"])
    assert {"adapter_model.safetensors", "adapter_config.json", "mca_checkpoint.json"} <= set(res["files"])
    assert res["hidden_left"] == []
    assert res["published_adapter_unchanged"] is True  # a published checkpoint is never written again
    assert res["failed_save"] == [1]  # the save that failed while writing extra files published nothing
    assert res["failed_save_reported"] and res["failed_save_leftovers"] == []  # said why, removed its files
    assert res["dict_files"] == {"notes/readme.txt": "hello", "raw.bin": "\x00\x01", "made_by_callable.txt": "made",
                                 "extra.json": {"a": 1}}


def test_save_only_model_checkpoint_holds_the_adapter_and_refuses_to_resume(worker, tmp_path):
    import torch
    from safetensors.torch import load_file

    res = worker["res"]
    assert res["model_only_marker"] == {"save_only_model": True, "adapter_only": True, "has_optimizer": False,
                                        "has_scheduler": False, "has_rng": False}
    # the normal checkpoint of the same weights has the RNG state; this one has everything else, adapter included
    assert set(res["files"]) - set(res["model_only_files"]) == {"rng_state_0.pth"}
    assert set(res["model_only_files"]) <= set(res["files"])
    assert res["model_only_tensor_keys_equal"] and res["model_only_adapter_equal"]
    assert res["model_only_resume"] == "ok", res["model_only_resume"]
    assert res["model_only_weights_load"]  # without an optimizer (no resume) its weights load
    # merge gives its PEFT adapter
    from llamafactory_mca.export import merge_checkpoint

    only = os.path.join(worker["out"], "model_only", "checkpoint-1")
    out = merge_checkpoint(only, str(tmp_path / "adapter"))
    ours, saved = load_file(os.path.join(out, "adapter_model.safetensors")), load_file(
        os.path.join(only, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(saved) and all(torch.equal(ours[k], saved[k]) for k in saved)


def test_resume_is_strict_about_the_adapter(worker):
    res = worker["res"]
    assert res["resume_step"] == 1 and res["resume_differs_before"] and res["resume_equal"]
    for key in ("lora_rank_mismatch", "missing_adapter", "lora_ckpt_into_full_run", "full_ckpt_into_lora_run"):
        assert res[key] == "ok", (key, res[key])


def test_merge_writes_the_peft_adapter(worker, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = str(tmp_path / "adapter")
    run_checked([sys.executable, "-m", "llamafactory_mca.cli", "merge", "--checkpoint_path", worker["ckpt"],
          "--output_path", out])
    ours = load_file(os.path.join(out, "adapter_model.safetensors"))
    # read back from the torch_dist tensors, it equals the adapter written into the checkpoint bit for bit
    saved = load_file(os.path.join(worker["ckpt"], "adapter_model.safetensors"))
    assert sorted(ours) == sorted(saved) and all(torch.equal(ours[k], saved[k]) for k in saved)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_merge_lora_equals_peft_base_plus_adapter(worker, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = str(tmp_path / "merged")
    run_checked([sys.executable, os.path.join(REPO, "scripts", "megatron_merge.py"), "--checkpoint_path", worker["ckpt"],
          "--output_path", merged, "--merge_lora", "--max_shard_size", "100KB"])
    tokens = torch.randint(0, 1001, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(worker["model"], dtype=torch.float32)
        ref = PeftModel.from_pretrained(base, worker["ckpt"]).eval()(input_ids=tokens).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=tokens).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(os.path.join(merged, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(merged, "adapter_config.json"))

    # llamafactory-cli export of the LoRA checkpoint (key=value form) merges the adapter too, into the same bytes
    exported = str(tmp_path / "exported")
    run_checked(["llamafactory-cli", "export", f"model_name_or_path={worker['ckpt']}", f"export_dir={exported}",
          "export_size=1"], USE_MCA="1")
    from test_merge_layouts import safetensors_of

    a, b = safetensors_of(merged), safetensors_of(exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the base can be given explicitly; a missing one is an error that names the fix
    from llamafactory_mca.checkpoint import CheckpointError
    from llamafactory_mca.export import merge_checkpoint

    with pytest.raises(CheckpointError, match="--base_model"):
        merge_checkpoint(worker["ckpt"], str(tmp_path / "x"), merge_lora=True, base_model=str(tmp_path / "nowhere"))
    explicit = merge_checkpoint(worker["ckpt"], str(tmp_path / "explicit"), merge_lora=True,
                                base_model=worker["model"])
    c = safetensors_of(explicit)
    assert all(torch.equal(a[k], c[k]) for k in a)
