"""Keeps benchmarks/run.py working: tiny shapes on CPU through `llamafactory-cli train`, both sides.
No timing assertions: only that each side ran, was measured, and that the JSON / RESULTS.md are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, clean_env


def _trainer_importable() -> str | None:
    r = subprocess.run([sys.executable, "-c", "import llamafactory_mca.trainer"], capture_output=True, text=True,
                       env=clean_env(), cwd=REPO, timeout=300)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("scenario", [pytest.param("s1", marks=pytest.mark.extended), "s3x2",
                                      pytest.param("s4x2", marks=pytest.mark.extended),
                                      pytest.param("r_moe", marks=pytest.mark.extended),
                                      pytest.param("r_vl", marks=pytest.mark.extended),
                                      pytest.param("dsv3", marks=pytest.mark.extended),
                                      pytest.param("q3next", marks=pytest.mark.extended)])
def test_benchmark_script_tiny(tmp_path, scenario):
    """s1: a pre-training scenario; dsv3: DeepSeek-V3's MLA + shared experts + a dense first layer; s3x2 / s4x2: the 2-GPU MoE and long-context scenarios at tiny shapes on one
    process (their layouts dropped); r_moe / r_vl: the example recipes (MoE, Qwen2-VL) run as they are, merged
    to Hugging Face and loaded with transformers (r_moe2 / r_vl2 differ from them only in the layout)."""
    why = _trainer_importable()
    if why:
        pytest.skip(f"llamafactory_mca.trainer is not importable yet: {why}")
    results, md = tmp_path / "results", tmp_path / "RESULTS.md"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--scenario", scenario, "--tiny",
           "--steps", "2", "--warmup", "1", "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
           "--results-md", str(md), "--timeout", "600"]
    r = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((results / f"{scenario}_tiny.json").read_text())
    for side in ("ours", "hf"):
        res = data[side]
        assert res["returncode"] == 0, (side, res.get("error_lines"), res.get("log_tail", "")[-2000:])
        assert res["measured_steps"] == 2 and res["tokens_per_s"] > 0, res
        assert res["recipe"]["cutoff_len"] == 64
        # the probe profiled the step after the measured ones (no GPU here: no kernels, but a wall time)
        assert res["profile"]["step"] == 3 and res["profile"]["step_wall_ms"] > 0, res.get("profile")
        # every side's per-step training losses, warm-up and measured steps (the profiled one left out)
        assert len(res["losses"]) == 3 and all(0 < x < 20 for x in res["losses"]), res["losses"]
    # both sides train the same tiny model on the same data in fp32: the losses agree closely
    assert data["loss_max_rel_diff"]["hf"] < 1e-2, data["loss_max_rel_diff"]
    assert data["baseline"] == "hf"
    # the two recipes differ only in output_dir, launch keys and gradient accumulation
    common = data["recipe_common"]
    for side in ("ours", "hf"):
        for k, v in common.items():
            if k not in ("output_dir",):
                assert data[side]["recipe"][k] == v, (side, k)
    if scenario.startswith("r_"):
        merge = data["merge"]
        assert merge["ok"], merge
        assert merge["loaded_class"] == ("Qwen2VLForConditionalGeneration" if scenario == "r_vl" else
                                         "Qwen3MoeForCausalLM"), merge
        assert merge["vision_tower_unchanged"] is (True if scenario == "r_vl" else None), merge
        assert merge.get("processor_saved", scenario != "r_vl") is True, merge
        recipe = data["ours"]["recipe"]
        assert recipe["stage"] == "sft" and recipe["save_only_model"] is True
        assert recipe["recompute_granularity"] == "full" and recipe["use_distributed_optimizer"] is True
    assert data["ratio_tokens_per_s"] > 0
    text = md.read_text()
    assert "results:begin" in text and f"{scenario}:" in text


def test_recipes_keep_global_batch():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import run as bench

    import recipes

    for name, sc in bench.SCENARIOS.items():
        if sc.get("recipe"):
            common, ours, hf = recipes.recipe_pair(sc, "/w", 8, tiny=False)
            # the example's Megatron keys, with the layout divided down to the scenario's GPUs
            base = recipes.load_recipe(sc)
            for k, v in base.items():
                if k in recipes.megatron_keys() and k not in sc["scale"]:
                    assert ours[k] == v, (name, k)
            assert all(k not in hf for k in recipes.megatron_keys()), name
        else:
            common, ours, hf = bench.recipes(sc, "/m", "/d", "/w", 8, tiny=False)
        n = sc["gpus"]
        mp = ours.get("tensor_model_parallel_size", 1) * ours.get("pipeline_model_parallel_size", 1) * ours.get(
            "context_parallel_size", 1)
        assert (n // mp) * ours["gradient_accumulation_steps"] == sc["global_batch"], name
        assert n * hf["gradient_accumulation_steps"] == sc["global_batch"], name
        assert not any(k.startswith("fsdp") for k in ours), name
        assert not any(k in hf for k in ("tensor_model_parallel_size", "expert_model_parallel_size")), name


def test_sides_and_loss_comparison(tmp_path):
    """The HF sides differ from `hf` only in their one key and output_dir; losses come from trainer_log.jsonl;
    the table reports ours against the faster HF side with the loss difference, and still reads old results."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import run as bench

    common, ours, hf = bench.recipes(bench.SCENARIOS["s3x2"], "/m", "/d", "/w", 8, tiny=False)
    liger, bf16 = bench.side_recipe("hf_liger", ours, hf), bench.side_recipe("hf_bf16", ours, hf)
    assert {k for k in liger if liger[k] != hf.get(k)} == {"enable_liger_kernel", "output_dir"}
    assert {k for k in bf16 if bf16[k] != hf.get(k)} == {"pure_bf16", "output_dir"}
    ag = bench.side_recipe("ours_allgather", ours, hf)
    assert ag["moe_token_dispatcher_type"] == "allgather" and ag["output_dir"] == "/w/out_ours_allgather"
    with pytest.raises(ValueError, match="unknown side"):
        bench.side_recipe("hf_fast", ours, hf)

    log_dir = tmp_path / "out"
    log_dir.mkdir()
    (log_dir / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"current_steps": 2, "loss": 9.5}, {"current_steps": 1, "loss": 10.0}, {"current_steps": 2, "eval_loss": 3.0}]))
    assert bench.logged_losses(str(log_dir)) == [10.0, 9.5]
    assert bench.logged_losses(str(tmp_path / "missing")) == []
    assert bench.max_rel_diff([10.0, 9.5], [10.0, 10.0, 7.0]) == pytest.approx(0.05)
    assert bench.max_rel_diff([], [1.0]) is None

    results = tmp_path / "results"
    results.mkdir()
    side = lambda tps, losses: dict(tokens_per_s=tps, mfu=0.3, peak_mem_gib=10.0, step_time_s=dict(median=1.0),  # noqa: E731
                                    measured_steps=2, warmup_steps=1, losses=losses)
    new = dict(scenario="s3x2", title="t", card="H200", gpus=2, ours=side(300.0, [10.0, 9.0, 8.0]),
               hf=side(100.0, [10.0, 9.0, 8.0]), hf_liger=side(150.0, [10.0, 9.1, 8.0]), target=dict(ratio=2.0))
    bench.compare_sides(new, ["ours", "hf", "hf_liger"], 3)
    assert new["loss_max_rel_diff"]["hf"] == 0.0 and new["loss_max_rel_diff"]["hf_liger"] == pytest.approx(0.1 / 9.1)
    new.update(baseline="hf_liger", ratio_tokens_per_s=2.0, target_met=True)
    (results / "s3x2.json").write_text(json.dumps(new))
    (results / "s1.json").write_text(json.dumps(dict(scenario="s1", title="old", ours=side(2.0, []), hf=side(1.0, []),
                                                     ratio_tokens_per_s=2.0, target_met=True)))
    md = tmp_path / "RESULTS.md"
    bench.write_results_md(str(results), str(md))
    rows = {line.split(":")[0].strip("| "): line for line in md.read_text().splitlines() if line.startswith("| s")}
    assert "| 2.00x (hf_liger) |" in rows["s3x2"] and "| 1.10% (3 steps) |" in rows["s3x2"], rows["s3x2"]
    assert "| 2.00x |" in rows["s1"] and "| - |" in rows["s1"], rows["s1"]


def test_flops_per_token_sane():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from shapes import flops_per_token, hf_config_for, total_params

    s1 = hf_config_for("s1")
    assert 1.0e9 < total_params(s1) < 1.3e9
    s2 = hf_config_for("s2")
    assert 7.9e9 < total_params(s2) < 8.2e9  # Llama-3-8B: 8.03B
    s3 = hf_config_for("s3")
    # dense 6N rule of thumb within the attention term
    assert 6 * 4.0e8 < flops_per_token(s3, 4096) < 6 * 8.0e8


def test_profile_summary_splits_exposed_communication():
    """The probe's profile summary: communication time that no compute kernel overlaps is "exposed"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_probe", os.path.join(REPO, "benchmarks", "_hook",
                                                                              "sitecustomize.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    kernels = [  # (name, start us, end us)
        ("sm90_xmma_gemm_bf16", 0.0, 100.0),
        ("ncclDevKernel_ReduceScatter", 50.0, 150.0),  # 50 us hidden under the GEMM, 50 us exposed
        ("flash_fwd_kernel", 200.0, 260.0),
        ("vectorized_elementwise_kernel", 260.0, 280.0),
    ]
    s = probe.summarize_profile(kernels, wall_us=400.0)
    assert s["communication_ms"] == 0.1 and s["communication_exposed_ms"] == 0.05
    assert s["gpu_compute_busy_ms"] == 0.18
    assert s["gpu_idle_ms"] == 0.17  # busy: [0, 150) + [200, 280)
    assert s["by_category_ms"] == {"communication": 0.1, "matmul": 0.1, "attention": 0.06, "elementwise/other": 0.02}
