"""Loss parity with LLaMA-Factory's Hugging Face path, through the real command lines.

The same tiny model (random weights, local tokenizer) is trained on the same data for a few steps with
`llamafactory-cli train` (HF Trainer) and `USE_MCA=1 llamafactory-cli train` (ours), fp32 on CPU; the per-step
losses in trainer_log.jsonl must agree to a relative 1e-4. Sequences have unequal lengths, so the loss is only
equal if it is token-weighted across microbatches and data-parallel ranks as the HF Trainer weights it, and the
batches only match if each step draws the HF Trainer's samples.

One HF run serves several layouts: with the same global batch (4 samples per step) the HF Trainer's step k
holds the same 4 samples whether they come as 2 batches of 2 on one process or 4 batches of 1 on 2 ranks, and
the token-weighted loss of a step does not depend on how its samples are grouped.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

pytestmark = pytest.mark.slow

STEPS = 5
REL_TOL = 1e-4


def _pth_installed() -> bool:
    return any(os.path.isfile(os.path.join(d, "llamafactory_mca.pth")) for d in site.getsitepackages())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not _pth_installed():
        pytest.fail("llamafactory_mca.pth is not in site-packages: install with `pip install . --no-deps` "
                    "(not -e) so that USE_MCA=1 works in every process")
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind, extra in (("dense", []), ("moe", ["--moe"])):
        path = str(root / kind)
        proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_tiny_model.py"), path, *extra],
                              env=clean_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = path
    return out


def _recipe(model: str, output_dir: str, **overrides) -> dict:
    recipe = dict(
        model_name_or_path=model,
        stage="sft",
        do_train=True,
        finetuning_type="full",
        dataset="tiny_sft",
        dataset_dir=os.path.join(REPO, "tests", "data"),
        template="qwen",
        cutoff_len=128,
        overwrite_cache=True,
        preprocessing_num_workers=1,
        output_dir=output_dir,
        overwrite_output_dir=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1.0e-3,
        max_steps=STEPS,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    recipe.update(overrides)
    return recipe


def train(tmp_path, name: str, recipe: dict, nproc: int = 1, mca: bool = True) -> str:
    """Run `llamafactory-cli train` on `recipe` (ours with USE_MCA=1) and return its output_dir."""
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = clean_env(NPROC_PER_NODE=str(nproc), PYTHONPATH=REPO)
    if mca:
        env["USE_MCA"] = "1"
    elif nproc > 1:
        env["FORCE_TORCHRUN"] = "1"  # the HF path on CPU: torchrun + gloo
    proc = subprocess.run(["llamafactory-cli", "train", str(path)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return recipe["output_dir"]


def log_records(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(output_dir: str, key: str = "loss") -> list[float]:
    return [r[key] for r in log_records(output_dir) if key in r]


def assert_parity(hf_dir: str, ours_dir: str, key: str = "loss", expected: int = STEPS) -> None:
    hf, ours = losses(hf_dir, key), losses(ours_dir, key)
    assert len(hf) == len(ours) == expected, (hf, ours)
    rel = [abs(a - b) / abs(a) for a, b in zip(hf, ours)]
    print(f"{key} HF {hf}\n{key} MCA {ours}\nmax rel diff {max(rel):.2e}")
    assert max(rel) <= REL_TOL, list(zip(hf, ours, rel))


@pytest.fixture(scope="module")
def hf_dense(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_dense")
    return train(tmp, "hf_dense", _recipe(models["dense"], str(tmp / "out")), mca=False)


def test_single_process_parity_and_hf_export(models, hf_dense, tmp_path):
    out = train(tmp_path, "mca_1p", _recipe(models["dense"], str(tmp_path / "out"), save_strategy="steps",
                                            save_steps=1000))
    assert_parity(hf_dense, out)
    for name in ("trainer_state.json", "train_results.json", "all_results.json", "config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "train_results.json")) as f:
        results = json.load(f)
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch"):
        assert key in results, key
    with open(os.path.join(hf_dense, "train_results.json")) as f:
        assert abs(results["train_loss"] - json.load(f)["train_loss"]) <= 1e-4 * results["train_loss"]
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["global_step"] == STEPS and all("grad_norm" in h for h in state["log_history"][:STEPS])
    # same updates: the exported model equals the HF-trained one
    import torch
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(out).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(hf_dense).state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


def test_tp2_parity(models, hf_dense, tmp_path):
    # Sequence parallel on top of TP: norm-weight gradients must then be reduced over the TP group too.
    recipe = _recipe(models["dense"], str(tmp_path / "out"), tensor_model_parallel_size=2, sequence_parallel=True,
                     save_hf_model=False)
    assert_parity(hf_dense, train(tmp_path, "mca_tp2", recipe, nproc=2))


def test_pp2_ga4_parity(models, hf_dense, tmp_path):
    recipe = _recipe(models["dense"], str(tmp_path / "out"), pipeline_model_parallel_size=2,
                     per_device_train_batch_size=1, gradient_accumulation_steps=4, save_hf_model=False)
    assert_parity(hf_dense, train(tmp_path, "mca_pp2", recipe, nproc=2))


def test_pp2_interleaved_parity(models, hf_dense, tmp_path):
    recipe = _recipe(models["dense"], str(tmp_path / "out"), pipeline_model_parallel_size=2,
                     virtual_pipeline_model_parallel_size=2, per_device_train_batch_size=1,
                     gradient_accumulation_steps=4, save_hf_model=False)
    assert_parity(hf_dense, train(tmp_path, "mca_vpp2", recipe, nproc=2))


def test_dp2_distributed_optimizer_parity(models, hf_dense, tmp_path):
    """2 data-parallel ranks against the HF path on 2 processes (and the 1-process run: same global batches)."""
    hf2 = train(tmp_path, "hf_dp2", _recipe(models["dense"], str(tmp_path / "hf"), per_device_train_batch_size=1),
                nproc=2, mca=False)
    recipe = _recipe(models["dense"], str(tmp_path / "out"), per_device_train_batch_size=1,
                     use_distributed_optimizer=True, save_hf_model=False)
    ours = train(tmp_path, "mca_dp2", recipe, nproc=2)
    assert_parity(hf2, ours)
    assert_parity(hf_dense, ours)


def test_moe_ep2_parity(models, tmp_path):
    """Qwen3-MoE with 2 expert-parallel ranks. LLaMA-Factory adds no router aux loss unless moe_aux_loss_coef is
    set, so ours runs without load balancing loss as well."""
    hf = train(tmp_path, "hf_moe", _recipe(models["moe"], str(tmp_path / "hf")), mca=False)
    recipe = _recipe(models["moe"], str(tmp_path / "out"), per_device_train_batch_size=1,
                     expert_model_parallel_size=2, moe_router_load_balancing_type="none")
    ours = train(tmp_path, "mca_moe", recipe, nproc=2)
    assert_parity(hf, ours)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ours)  # the exported MoE model loads


def test_pt_with_eval_parity(models, tmp_path):
    """Stage pt (packed blocks), cosine schedule with warmup ratio, eval during training and at the end."""
    common = dict(stage="pt", dataset="tiny_pt", cutoff_len=64, max_steps=4, lr_scheduler_type="cosine",
                  warmup_steps=0.25, val_size=0.2, per_device_eval_batch_size=2, eval_strategy="steps",
                  eval_steps=2, do_eval=True, plot_loss=True)
    common.pop("template", None)
    hf = train(tmp_path, "hf_pt", {**_recipe(models["dense"], str(tmp_path / "hf")), **common}, mca=False)
    ours = train(tmp_path, "mca_pt", {**_recipe(models["dense"], str(tmp_path / "out")), **common,
                                      "save_hf_model": False})
    assert_parity(hf, ours, expected=4)
    assert_parity(hf, ours, key="eval_loss", expected=2)  # steps 2 and 4 (the final evaluate() is not in the log)
    assert os.path.isfile(os.path.join(ours, "training_loss.png"))
    with open(os.path.join(ours, "eval_results.json")) as f:
        final = json.load(f)
    with open(os.path.join(hf, "eval_results.json")) as f:
        final_hf = json.load(f)
    assert abs(final["eval_loss"] - final_hf["eval_loss"]) <= REL_TOL * final_hf["eval_loss"]
    assert "eval_perplexity" in final
