"""Checkpoints of LLaMA-Factory's own USE_MCA mode (ROLL's mcore_adapter): merged bit-exactly to the Hugging Face
weights they were converted from, converted to ours, and refused (with the way out) as a training start or resume.

The fixtures in tests/data/upstream were written by mcore_adapter itself (tests/data/upstream/make_fixtures.py):
legacy tp=2 x pp=2 (dense) and ep=2 (MoE, grouped GEMM) from upstream's merge script, torch_dist tp=2 from a
2-process model save."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import REPO, run_checked

DATA = os.path.join(REPO, "tests", "data", "upstream")
CASES = {  # fixture -> the Hugging Face model it was converted from
    "qwen3_legacy_tp2_pp2": "hf_qwen3",
    "qwen3_moe_legacy_ep2": "hf_qwen3_moe",
    "qwen3_dist_tp2": "hf_qwen3",
}


def weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def assert_same_weights(expected_dir: str, got_dir: str) -> None:
    expected, got = weights(expected_dir), weights(got_dir)
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), f"{name} differs"


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_upstream_checkpoint_merges_to_the_weights_it_was_converted_from(tmp_path, fixture):
    from transformers import AutoConfig, AutoTokenizer

    from llamafactory_mca.merge_cli import main

    out = str(tmp_path / "hf")
    assert main([os.path.join(DATA, fixture), "--output_path", out]) == 0  # upstream's positional form
    source = os.path.join(DATA, CASES[fixture])
    assert_same_weights(source, out)
    got, want = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(source)
    for key in ("model_type", "vocab_size", "num_hidden_layers", "hidden_size", "num_key_value_heads", "head_dim",
                "tie_word_embeddings"):
        assert getattr(got, key) == getattr(want, key), key
    assert got.dtype == torch.bfloat16
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(source))


def test_merge_script_on_an_upstream_checkpoint_with_upstream_flags(tmp_path):
    out = tmp_path / "hf"
    run_checked([sys.executable, os.path.join(REPO, "scripts", "megatron_merge.py"), "--checkpoint_path",
                 os.path.join(DATA, "qwen3_legacy_tp2_pp2"), "--output_path", str(out), "--bf16", "True",
                 "--convert_model_max_length", "77"])
    assert_same_weights(os.path.join(DATA, "hf_qwen3"), str(out))
    assert json.loads((out / "config.json").read_text())["model_max_length"] == 77


def test_fp32_merge_is_the_exact_upcast(tmp_path):
    from llamafactory_mca.upstream_checkpoint import merge_upstream_checkpoint

    out = merge_upstream_checkpoint(os.path.join(DATA, "qwen3_moe_legacy_ep2"), str(tmp_path / "hf"), torch.float32)
    got = weights(out)
    for name, t in weights(os.path.join(DATA, "hf_qwen3_moe")).items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float()), name


def test_convert_an_upstream_checkpoint_into_ours(tmp_path):
    from llamafactory_mca.checkpoint import checkpoint_info
    from llamafactory_mca.merge_cli import main

    ours = str(tmp_path / "ours")
    assert main(["--model_name_or_path", os.path.join(DATA, "qwen3_dist_tp2"), "--output_path", ours], convert=True) == 0
    assert checkpoint_info(ours)["model_type"] == "qwen3"
    assert main(["--checkpoint_path", ours, "--output_path", str(tmp_path / "hf")]) == 0
    assert_same_weights(os.path.join(DATA, "hf_qwen3"), str(tmp_path / "hf"))


def test_local_names_of_legacy_rank_files():
    """Names mcore_adapter's legacy files use besides those in the fixtures (dist_converter.py): TE grouped
    experts `linear_fc1.weight{j}`, SequentialMLP `local_experts.{j}`, and local layer numbers under pp x vpp."""
    from llamafactory_mca.upstream_checkpoint import canonical_tensors, global_layer_index

    mca = {"num_layers": 8, "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
           "num_moe_experts": 8, "expert_model_parallel_size": 2, "hidden_size": 4}
    assert [global_layer_index(mca, 1, pp, vp) for pp in (0, 1) for vp in (0, 1)] == [1, 5, 3, 7]
    t = torch.zeros(6, 4)
    assert canonical_tensors("decoder.layers.1.mlp.experts.linear_fc1.weight3", t, mca, 1, 1, 1) == [
        ("decoder.layers.7.mlp.experts.7.linear_fc1.weight", t)]
    assert canonical_tensors("decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight", t, mca, 0, 0, 1) == [
        ("decoder.layers.0.mlp.experts.6.linear_fc2.weight", t)]
    [(name, _)] = canonical_tensors("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", t, mca, 1, 0, 0)
    assert name == "decoder.layers.2.input_layernorm.weight"
    assert canonical_tensors("embedding.word_embeddings.weight", t, mca, 0, 0, 0) == [
        ("embedding.word_embeddings.weight", t)]


def test_broken_or_lora_upstream_checkpoints_are_refused_with_a_fix(tmp_path):
    from llamafactory_mca.upstream_checkpoint import UpstreamCheckpointError, merge_upstream_checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(DATA, "qwen3_legacy_tp2_pp2"), broken)
    os.remove(broken / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt")
    with pytest.raises(UpstreamCheckpointError, match="mp_rank_01_001.*missing.*Fix"):
        merge_upstream_checkpoint(str(broken), str(tmp_path / "out1"))
    assert not os.path.exists(tmp_path / "out1")

    lora = tmp_path / "lora"
    shutil.copytree(os.path.join(DATA, "qwen3_legacy_tp2_pp2"), lora)
    (lora / "default").mkdir()
    (lora / "default" / "adapter_config.json").write_text("{}")
    with pytest.raises(UpstreamCheckpointError, match="LoRA checkpoint.*Fix"):
        merge_upstream_checkpoint(str(lora), str(tmp_path / "out2"))


def test_training_from_or_resuming_an_upstream_checkpoint_is_refused_with_the_way_out(tmp_path):
    from llamafactory_mca.args import McaArgumentError
    from llamafactory_mca.upstream_checkpoint import check_training_paths

    ckpt = os.path.join(DATA, "qwen3_dist_tp2")
    with pytest.raises(McaArgumentError, match=r"`model_name_or_path`.*llamafactory-mca merge .*model_name_or_path: DIR"):
        check_training_paths(ckpt, None)
    out = tmp_path / "run"
    shutil.copytree(ckpt, out / "checkpoint-1")
    with pytest.raises(McaArgumentError, match=r"`resume_from_checkpoint`.*automatic resume.*llamafactory-mca merge"):
        check_training_paths(os.path.join(DATA, "hf_qwen3"), str(out / "checkpoint-1"), str(out))
    # an upstream final output_dir saved with save_hf_model also holds a Hugging Face model: that one trains
    both = tmp_path / "both"
    shutil.copytree(ckpt, both)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(DATA, "hf_qwen3", name), both / name)
    check_training_paths(str(both), None)


@pytest.mark.slow
def test_llamafactory_auto_resume_from_an_upstream_output_dir_stops_before_building(tmp_path):
    """LLaMA-Factory's automatic resume picks an upstream checkpoint-N from output_dir: a clear refusal."""
    from lf_runs import make_recipe, train_fails

    out = tmp_path / "run"
    shutil.copytree(os.path.join(DATA, "qwen3_dist_tp2"), out / "checkpoint-1")
    recipe = make_recipe(os.path.join(DATA, "hf_qwen3"), str(out), overwrite_output_dir=False)
    log = train_fails(tmp_path, "auto_resume", recipe)
    assert "`resume_from_checkpoint`" in log and "llamafactory-mca merge" in log, log[-3000:]
    assert "Running training" not in log

    recipe = make_recipe(os.path.join(DATA, "qwen3_legacy_tp2_pp2"), str(tmp_path / "run2"))
    log = train_fails(tmp_path, "from_upstream", recipe)
    assert "`model_name_or_path`" in log and "llamafactory-mca merge" in log, log[-3000:]
