"""`llamafactory-mca plan`: per-rank parameter counts against real builds on 2 gloo ranks, the static memory
against the CPU accounting of the same tensors (DDP gradient buffers, optimizer state after a step), the
derived counts of `--search` against meta builds, the memory estimate against the measured peaks in
benchmarks/results, and the command itself."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch
import yaml

from tests.tiny_models import make_tiny_model
from tests.workers import launch_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("tp2", "llama"), ("pp2", "llama"), ("vpp2", "llama"), ("dp2opt", "llama"), ("ep2opt", "qwen3_moe")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan_models")
    for kind in ("llama", "qwen3_moe", "qwen3"):
        make_tiny_model(kind, str(d / kind))
    return d


def _plan_inputs(model_dir: str, layout: dict, world: int):
    from transformers import AutoConfig

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for
    from llamafactory_mca.plan.meta import layer_template

    hf_config = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(hf_config.model_type)
    return hf_config, bridge, MegatronArguments(**layout), layer_template(bridge, hf_config, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_census_and_static_memory_match_real_builds(models, tmp_path):
    from llamafactory_mca.plan.memory import Workload, rank_memory
    from llamafactory_mca.plan.meta import build_census, derive_census
    from tests.plan_worker import LAYOUTS

    per_rank = launch_worker("plan_worker.py", ["--models", str(models), "--cases",
                                                ",".join(f"{lay}:{kind}" for lay, kind in CASES)],
                             tmp_path, key=("layout", "kind"))
    for layout, kind in CASES:
        hf_config, bridge, m, template = _plan_inputs(str(models / kind), LAYOUTS[layout], 2)
        census = build_census(bridge, hf_config, m, 2, torch.bfloat16)
        derived = derive_census(template, bridge, hf_config, hf_config.num_hidden_layers, m)
        workload = Workload(world_size=2, dtype_bytes=2)
        for rank, results in enumerate(per_rank):
            real = results[(layout, kind)]
            assert "error" not in real, real["error"]
            stage = census[real["pp_rank"]]
            case = (layout, kind, rank)
            assert (stage.sum("dense"), stage.sum("expert"), stage.layers, len(stage.chunks)) == (
                real["dense"], real["expert"], real["layers"], real["chunks"]), case
            assert stage.sum("total") == real["numel"], case
            d = derived[real["pp_rank"]]
            assert (d.sum("dense"), d.sum("expert"), [c.layers for c in d.chunks]) == (
                stage.sum("dense"), stage.sum("expert"), [c.layers for c in stage.chunks]), case
            mem = rank_memory(stage, template.dims, workload, m)
            # megatron pads its buffers (to multiples of the DP size x 128 elements): within 1%
            assert mem.parts["main grads"] == pytest.approx(real["grad_buffer_bytes"], rel=0.01), case
            assert mem.parts["master + optimizer"] == pytest.approx(real["optimizer_bytes"], rel=0.01), case
            assert mem.parts["weights"] == 2 * real["numel"], case


@pytest.mark.parametrize("kind,layout,world", [
    ("llama", dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                   virtual_pipeline_model_parallel_size=2), 8),
    ("qwen3_moe", dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                       sequence_parallel=True), 8),
    ("qwen3_moe", dict(pipeline_model_parallel_size=2, expert_model_parallel_size=4, expert_tensor_parallel_size=1,
                       tensor_model_parallel_size=2, sequence_parallel=True), 16),
    ("qwen3", dict(pipeline_model_parallel_size=4, context_parallel_size=2), 8),
])
def test_derived_counts_match_meta_builds(models, kind, layout, world):
    from llamafactory_mca.plan.meta import build_census, derive_census

    hf_config, bridge, m, template = _plan_inputs(str(models / kind), layout, world)
    built = build_census(bridge, hf_config, m, world, torch.bfloat16)
    derived = derive_census(template, bridge, hf_config, hf_config.num_hidden_layers, m)
    assert len(built) == m.pipeline_model_parallel_size
    for b, d in zip(built, derived):
        for cb, cd in zip(b.chunks, d.chunks, strict=True):
            assert (cb.layers, cb.dense, cb.expert, cb.frozen, cb.vocab, cb.pre_process, cb.post_process) == (
                cd.layers, cd.dense, cd.expert, cd.frozen, cd.vocab, cd.pre_process, cd.post_process), (kind, layout)


def _recipe(tmp_path, model_dir, **keys) -> str:
    recipe = dict(model_name_or_path=str(model_dir), stage="sft", finetuning_type="full", cutoff_len=256,
                  per_device_train_batch_size=2, gradient_accumulation_steps=4, bf16=True, **keys)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_plan_command_reports_batch_and_fit(models, tmp_path):
    from llamafactory_mca.plan.command import plan_command

    recipe = _recipe(tmp_path, models / "qwen3_moe", pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    out = io.StringIO()
    assert plan_command([recipe, "--gpus", "8", "--gpu-memory", "80GiB", "--search", "--top", "2",
                         "--plot", str(tmp_path / "mem.png")], out=out) == 0
    text = out.getvalue()
    # DP = 8 / PP 2 = 4; global batch 4 x 2 x 4 = 32 sequences of 256 tokens
    assert "global batch: 32 sequences = DP 4 x micro-batch 2 x 4 micro-batches per step; 8192 tokens" in text
    assert "fits" in text and "layouts fit" in text and "tensor_model_parallel_size:" in text
    assert (tmp_path / "mem.png").stat().st_size > 1000


def test_plan_command_names_the_fix_when_it_does_not_fit(models, tmp_path):
    from llamafactory_mca.plan.command import plan_command

    recipe = _recipe(tmp_path, models / "llama")
    out = io.StringIO()
    assert plan_command([recipe, "--gpus", "2", "--gpu-memory", "2.004GiB"], out=out) == 1
    text = out.getvalue()
    assert "DOES NOT FIT" in text and "smallest change that fits:" in text


def test_plan_command_bad_layout_names_key(models, tmp_path, capsys):
    from llamafactory_mca.plan.command import plan_command

    recipe = _recipe(tmp_path, models / "llama", tensor_model_parallel_size=2)
    assert plan_command([recipe, "--gpus", "3"]) == 1
    err = capsys.readouterr().err
    assert "tensor_model_parallel_size" in err and "Fix" in err


def test_plan_only_through_llamafactory_cli_launches_nothing(models, tmp_path):
    """`USE_MCA=1 llamafactory-cli train recipe.yaml plan_only=true`: the plan for the launch's GPUs (NPROC_PER_NODE),
    exit code 0 when it fits, 1 when it does not, and no training process, no output directory."""
    import subprocess

    from conftest import clean_env

    out_dir = tmp_path / "never_written"
    recipe = _recipe(tmp_path, models / "qwen3_moe", expert_model_parallel_size=2, do_train=True,
                     dataset="tiny_sft", template="qwen", output_dir=str(out_dir))
    env = clean_env(USE_MCA="1", NPROC_PER_NODE="2", PYTHONPATH=ROOT)
    fits = subprocess.run(["llamafactory-cli", "train", recipe, "plan_only=true", "plan_gpu_memory=141GiB"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert fits.returncode == 0, fits.stdout[-2000:] + fits.stderr[-3000:]
    assert "plan_only: 2 GPUs on 1 node(s), 141GiB each" in fits.stdout and "fits" in fits.stdout
    assert "Initializing" not in fits.stdout + fits.stderr  # LLaMA-Factory's torchrun launch never started
    tight = subprocess.run(["llamafactory-cli", "train", recipe, "plan_only=true", "plan_gpu_memory=0.01GiB"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert tight.returncode == 1 and "DOES NOT FIT" in tight.stdout, tight.stdout[-2000:] + tight.stderr[-3000:]
    assert not out_dir.exists()


def test_cost_constants_come_from_the_benchmark_results():
    from llamafactory_mca.plan import cost

    def mfu(name):
        with open(os.path.join(ROOT, "benchmarks", "results", f"{name}.json")) as f:
            return json.load(f)["ours"]["mfu"]

    assert cost.DENSE_MFU == pytest.approx(mfu("s2"), abs=5e-4)
    assert cost.MOE_MFU == pytest.approx(mfu("s3"), abs=5e-4)
    assert cost.EP_FACTOR == pytest.approx(mfu("s3x4") / mfu("s3"), abs=5e-4)
    with open(os.path.join(ROOT, "benchmarks", "RESULTS.md")) as f:
        text = f.read()
    tp2 = float(text.split("| TP=2 + SP, dist. opt. over DP=2 |")[1].split("\n")[0].split("|")[-2].strip(" %"))
    tp1 = float(text.split("| TP=1, dist. opt. (ZeRO-1) over DP=4, both overlaps |")[1].split("\n")[0]
                .split("|")[-2].strip(" %"))
    assert cost.TP_FACTOR == pytest.approx(tp2 / tp1, abs=5e-4)


@pytest.mark.timeout(600)
def test_memory_estimate_within_10_percent_of_measured_peaks():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import plan_check

    from llamafactory_mca.plan.memory import GIB

    for path in sorted(os.listdir(os.path.join(ROOT, "benchmarks", "results"))):
        if not path.endswith(".json"):
            continue
        with open(os.path.join(ROOT, "benchmarks", "results", path)) as f:
            result = json.load(f)
        plan = plan_check.predict(result)
        predicted = max(r.train_peak for r in plan.ranks) / GIB
        measured = result["ours"]["peak_mem_gib"]
        assert abs(predicted - measured) <= 0.10 * measured, (result["scenario"], predicted, measured)
