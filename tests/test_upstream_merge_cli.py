"""Every invocation form of LLaMA-Factory's own (fire-based) scripts/megatron_merge.py works with
`llamafactory-mca merge` / `convert` and our scripts/megatron_merge.py: positional or flag checkpoint_path,
--output_path default ./output, --bf16 / --fp16 with or without a value, --convert_model_max_length, and the
HF -> Megatron direction (with the layout flags) when the path holds no Megatron checkpoint."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO, run_checked
from test_upstream_checkpoint import DATA, assert_same_weights

HF = os.path.join(DATA, "hf_qwen3")
HF_MOE = os.path.join(DATA, "hf_qwen3_moe")


def test_fire_forms_are_rewritten_to_flags():
    from llamafactory_mca.merge_cli import MergeUsageError, normalize_fire_argv

    assert normalize_fire_argv(["ckpt", "--output-path", "out", "--bf16", "True"]) == ["ckpt", "--output_path", "out",
                                                                                     "--bf16"]
    assert normalize_fire_argv(["--bf16=false", "--fp16", "1", "--checkpoint_path=c"]) == ["--fp16",
                                                                                         "--checkpoint_path=c"]
    assert normalize_fire_argv(["--nobf16", "--bf16", "ckpt", "--moe-grouped-gemm", "False"]) == ["--bf16", "ckpt"]
    with pytest.raises(MergeUsageError, match="--bf16.*not a boolean.*Fix"):
        normalize_fire_argv(["--bf16=maybe"])


def test_bad_command_lines_name_the_flag_and_the_fix(tmp_path, capsys):
    from llamafactory_mca.merge_cli import main

    assert main([HF, "--bf16", "--fp16", "True", "--output_path", str(tmp_path / "a")]) == 1
    assert "choose one of --bf16/--fp16/--fp32" in capsys.readouterr().err
    assert main([HF, "--checkpoint_path", os.path.join(DATA, "hf_qwen3_moe")]) == 1
    assert "two different inputs" in capsys.readouterr().err
    assert main(["--output_path", str(tmp_path / "b")]) == 1
    assert "no input" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--output_path", str(tmp_path / "c")]) == 1
    assert "does not exist" in capsys.readouterr().err
    # vpp needs a layer count that splits over pp x vpp: refused before anything is built
    assert main([HF, "--pipeline_model_parallel_size", "2", "--virtual_pipeline_model_parallel_size", "2",
                 "--output_path", str(tmp_path / "d")]) == 1
    assert "virtual_pipeline_model_parallel_size" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


def test_hf_path_is_converted_then_merged_back_with_upstream_forms(tmp_path, monkeypatch):
    """Upstream's script converts a path without a Megatron checkpoint HF -> Megatron; merging it back with the
    positional form, `--bf16 True`, `--convert_model_max_length` and the default ./output gives the same weights."""
    from llamafactory_mca.checkpoint import checkpoint_info, read_mca_args
    from llamafactory_mca.merge_cli import main

    ckpt = str(tmp_path / "mca")
    assert main([HF, "--output_path", ckpt, "--bf16", "--tensor_model_parallel_size", "2",
                 "--pipeline_model_parallel_size", "2"]) == 0
    checkpoint_info(ckpt)
    recorded = read_mca_args(ckpt)
    assert (recorded["tensor_model_parallel_size"], recorded["pipeline_model_parallel_size"]) == (2, 2)

    monkeypatch.chdir(tmp_path)
    assert main([ckpt, "--bf16", "True", "--convert_model_max_length", "64"]) == 0
    assert_same_weights(HF, str(tmp_path / "output"))
    with open(tmp_path / "output" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["model_max_length"] == 64


def test_moe_conversion_with_expert_parallel_and_grouped_gemm_flags(tmp_path):
    from llamafactory_mca.checkpoint import read_mca_args
    from llamafactory_mca.merge_cli import main

    ckpt = str(tmp_path / "mca")
    assert main(["--checkpoint_path", HF_MOE, "--output_path", ckpt, "--expert_model_parallel_size", "2",
                 "--moe_grouped_gemm", "True"], convert=True) == 0
    recorded = read_mca_args(ckpt)
    assert recorded["expert_model_parallel_size"] == 2 and recorded["moe_grouped_gemm"] is True
    assert main(["--checkpoint_path", ckpt, "--output_path", str(tmp_path / "hf")]) == 0
    assert_same_weights(HF_MOE, str(tmp_path / "hf"))


def test_virtual_pipeline_conversion(tmp_path):
    from tiny_models import make_tiny_model

    from llamafactory_mca.checkpoint import read_mca_args
    from llamafactory_mca.merge_cli import main

    hf = make_tiny_model("qwen3", str(tmp_path / "hf4"))  # 4 layers: pp=2 x vpp=2
    ckpt = str(tmp_path / "mca")
    assert main([hf, "--output_path", ckpt, "--pipeline_model_parallel_size", "2",
                 "--virtual_pipeline_model_parallel_size", "2"]) == 0
    assert read_mca_args(ckpt)["virtual_pipeline_model_parallel_size"] == 2
    assert main([ckpt, "--output_path", str(tmp_path / "back"), "--fp32"]) == 0
    assert_same_weights(hf, str(tmp_path / "back"))


def test_merge_script_positional_and_hyphen_forms(tmp_path):
    out = tmp_path / "hf"
    run_checked([sys.executable, os.path.join(REPO, "scripts", "megatron_merge.py"),
                 os.path.join(DATA, "qwen3_moe_legacy_ep2"), "--output-path", str(out), "--fp16", "False"])
    assert_same_weights(HF_MOE, str(out))


def test_output_path_as_second_positional(tmp_path, capsys):
    """fire passes upstream's `convert(checkpoint_path, output_path, ...)` positionally too."""
    from llamafactory_mca.merge_cli import main

    assert main([os.path.join(DATA, "qwen3_legacy_tp2_pp2"), str(tmp_path / "hf"), "--bf16"]) == 0
    assert_same_weights(HF, str(tmp_path / "hf"))
    assert main([HF, str(tmp_path / "x"), "--output_path", str(tmp_path / "y")]) == 1
    assert "two different outputs" in capsys.readouterr().err
    assert main([HF, str(tmp_path / "x"), "extra"]) == 1
    assert "too many positional arguments" in capsys.readouterr().err
