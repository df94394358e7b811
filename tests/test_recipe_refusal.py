"""A broken recipe is refused by `llamafactory-cli train` itself, before torchrun starts: one message naming the key
and the fix, printed once, no traceback, non-zero exit, in seconds (the training processes are never started)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import REPO, worktree_env

DENSE = {"model_type": "qwen3", "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "hidden_size": 32, "intermediate_size": 64, "vocab_size": 480}

# (name, recipe keys, processes, key named, words of the problem)
BROKEN = [
    ("type", dict(tensor_model_parallel_size="two"), 1, "tensor_model_parallel_size", "expects an integer"),
    ("ep_on_dense", dict(expert_model_parallel_size=2), 2, "expert_model_parallel_size", "dense"),
    ("recompute_granularity", dict(recompute_granularity="everything"), 1, "recompute_granularity", "not one of"),
    ("recompute_modules", dict(recompute_granularity="selective", recompute_modules=["core_attn", "attention"]), 1,
     "recompute_modules", "unknown module(s) attention"),
    ("fp8", dict(fp8="e5m2"), 1, "fp8", "not an FP8 format"),
    ("negative_lr", dict(learning_rate=-1.0), 1, "learning_rate", "-1.0 cannot be right"),
    ("cutoff_len", dict(cutoff_len=0), 1, "cutoff_len", "0 cannot be right"),
    ("heads_vs_tp", dict(tensor_model_parallel_size=3), 3, "tensor_model_parallel_size", "4 attention heads"),
    ("layers_vs_vpp", dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3), 2,
     "virtual_pipeline_model_parallel_size", "4 layers do not split evenly"),
    ("upstream_ckpt_format", dict(ckpt_format="legacy"), 1, "ckpt_format", "mcore_adapter"),
    ("metric_schedule", dict(lr_scheduler_type="reduce_lr_on_plateau"), 1, "lr_scheduler_type", "cannot be used"),
    ("typo", dict(tensor_parallel_size=2), 1, "tensor_parallel_size", "did you mean `tensor_model_parallel_size`"),
    ("finetuning_type", dict(finetuning_type="oft"), 1, "finetuning_type", "not supported"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    (path / "config.json").write_text(json.dumps(DENSE))
    return path


def _recipe(path, model_dir, **keys) -> str:
    recipe = dict(model_name_or_path=str(model_dir), stage="sft", do_train=True, finetuning_type="full",
                  dataset="tiny_sft", dataset_dir="tests/data", template="qwen", output_dir=str(path.parent / "out"))
    recipe.update(keys)
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return str(path)


@pytest.mark.parametrize("name,keys,procs,key,problem", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipe_is_refused_before_torchrun(tmp_path, model_dir, name, keys, procs, key, problem):
    recipe = _recipe(tmp_path / "bad.yaml", model_dir, **keys)
    start = time.monotonic()
    proc = subprocess.run(["llamafactory-cli", "train", recipe], env=worktree_env(USE_MCA="1", NPROC_PER_NODE=str(procs)),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert out.count("llamafactory-mca: error:") == 1, out
    error = next(line for line in out.splitlines() if "llamafactory-mca: error:" in line)
    assert f"`{key}`" in error and problem in error and "Fix:" in error, error
    assert "Traceback" not in out and "torchrun" not in out.lower() and "ChildFailedError" not in out, out
    assert elapsed < 10, f"refused after {elapsed:.1f} s"


def test_deepspeed_note_and_recompute_list_pass_the_launcher_check(tmp_path, model_dir):
    """`deepspeed` is accepted with one note naming its replacement (and dropped, as upstream's USE_MCA mode does),
    `recompute_modules` may be a YAML list, a missing finetuning_type is announced."""
    from llamafactory_mca.prelaunch import check_recipe_before_launch

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {model_dir}\nstage: sft\ndo_train: true\ndataset: tiny_sft\n"
                      f"output_dir: {tmp_path / 'out'}\ndeepspeed: examples/deepspeed/ds_z3_config.json\n"
                      "recompute_granularity: selective\nrecompute_modules: [core_attn, mlp]\n")
    notes = check_recipe_before_launch([str(recipe)])
    assert len(notes) == 2 and "'lora' runs" in notes[0]
    assert "use_distributed_optimizer: true replaces DeepSpeed" in notes[1]
