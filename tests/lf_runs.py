"""Shared helpers of the end-to-end tests: tiny models, recipes, and `llamafactory-cli train` runs."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys

import pytest
from conftest import REPO, clean_env, run_checked

STEPS = 5
REL_TOL = 1e-4


def _pth_installed() -> bool:
    return any(os.path.isfile(os.path.join(d, "llamafactory_mca.pth")) for d in site.getsitepackages())


_MODELS: dict[str, str] = {}


def make_models(tmp_path_factory) -> dict[str, str]:
    """The tiny dense and MoE Qwen3 models (random weights, local tokenizer), built once per test session in one
    process and shared read-only by every module that asks (the script is seeded: same command, same weights)."""
    if not _pth_installed():
        pytest.fail("llamafactory_mca.pth is not in site-packages: install with `pip install . --no-deps` "
                    "(not -e) so that USE_MCA=1 works in every process")
    if not _MODELS:
        root = tmp_path_factory.mktemp("models")
        paths = {kind: str(root / kind) for kind in ("dense", "moe")}
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from make_tiny_model import main; "
                "main([sys.argv[2]]); main([sys.argv[3], '--moe'])")
        proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "scripts"), paths["dense"], paths["moe"]],
                              env=clean_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _MODELS.update(paths)
    return dict(_MODELS)


def make_tiny_model(path: str, *extra: str) -> str:
    """scripts/make_tiny_model.py into `path` (extra: its flags, e.g. --moe); returns `path`. For a model a test
    changes; the unchanged dense / MoE pair is `make_models`."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_tiny_model.py"), path, *extra],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def make_recipe(model: str, output_dir: str, **overrides) -> dict:
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


def train_command(tmp_path, name: str, recipe: dict, nproc: int = 1, mca: bool = True) -> tuple[list[str], dict]:
    """(argv, environment) of `llamafactory-cli train` on `recipe`, written to tmp_path/{name}.yaml."""
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # one OpenMP thread per process on both sides: the tiny models' kernels gain nothing from a second thread, and
    # idle OpenMP threads spin on the 2 cores that several runs share
    env = clean_env(NPROC_PER_NODE=str(nproc), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    if mca:
        env["USE_MCA"] = "1"
    elif nproc > 1:
        env["FORCE_TORCHRUN"] = "1"  # the HF path on CPU: torchrun + gloo
    return ["llamafactory-cli", "train", str(path)], env


def _run_train(tmp_path, name: str, recipe: dict, nproc: int, mca: bool) -> subprocess.CompletedProcess:
    cmd, env = train_command(tmp_path, name, recipe, nproc, mca)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))


def train(tmp_path, name: str, recipe: dict, nproc: int = 1, mca: bool = True) -> str:
    """Run `llamafactory-cli train` on `recipe` (ours with USE_MCA=1) and return its output_dir."""
    proc = _run_train(tmp_path, name, recipe, nproc, mca)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return recipe["output_dir"]


def train_fails(tmp_path, name: str, recipe: dict, nproc: int = 1) -> str:
    """Run `USE_MCA=1 llamafactory-cli train` on a recipe that must fail; returns its stdout + stderr."""
    proc = _run_train(tmp_path, name, recipe, nproc, mca=True)
    assert proc.returncode != 0, f"{name} should have failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def merge(checkpoint: str, output: str, *flags: str, timeout: int = 600) -> str:
    """`llamafactory-mca merge --checkpoint_path CHECKPOINT --output_path OUTPUT FLAGS` (fails the test if it fails);
    returns `output`."""
    run_checked([sys.executable, "-m", "llamafactory_mca.cli", "merge", "--checkpoint_path", checkpoint,
                 "--output_path", output, *flags], timeout=timeout)
    return output


def log_records(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_history(output_dir: str) -> list[dict]:
    """The Trainer state's training log entries (trainer_state.json `log_history` entries with a `loss`): every key
    the stage logged (rewards, kl ...), where trainer_log.jsonl keeps LLaMA-Factory's few."""
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return [h for h in json.load(f)["log_history"] if "loss" in h]


def losses(output_dir: str, key: str = "loss") -> list[float]:
    return [r[key] for r in log_records(output_dir) if key in r]


def assert_parity(hf_dir: str, ours_dir: str, key: str = "loss", expected: int = STEPS,
                  rel_tol: float = REL_TOL) -> None:
    """Every logged `key` of the two runs agrees to `rel_tol` relative, and both logged `expected` steps."""
    hf, ours = losses(hf_dir, key), losses(ours_dir, key)
    assert len(hf) == len(ours) == expected, (hf, ours)
    rel = [abs(a - b) / abs(a) for a, b in zip(hf, ours)]
    print(f"{key} HF {hf}\n{key} MCA {ours}\nmax rel diff {max(rel):.2e}")
    assert max(rel) <= rel_tol, list(zip(hf, ours, rel))


def make_dpo_data(root) -> str:
    """A pairwise data set built from tests/data/tiny_sft.json (rejected = another sample's answer) in `root`."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(REPO, "tests", "data", "tiny_sft.json")) as f:
        rows = json.load(f)
    pairs = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
              "rejected": rows[(i + 7) % len(rows)]["output"]} for i, r in enumerate(rows[:32])]
    with open(os.path.join(root, "tiny_dpo.json"), "w") as f:
        json.dump(pairs, f)
    with open(os.path.join(root, "dataset_info.json"), "w") as f:
        json.dump({"tiny_dpo": {
            "file_name": "tiny_dpo.json", "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}, f)
    return str(root)


def add_seeded_value_head(model_dir: str) -> str:
    """Give `model_dir` a seeded `value_head.safetensors` (LLaMA-Factory's loader reads it from there; hidden size
    from `text_config` for vision-language models) and `summary_dropout_prob: 0.0` in its config.json (TRL's
    value-head dropout draws masks no two backends share), so that rm runs on both backends start alike."""
    import torch
    from safetensors.torch import save_file

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["summary_dropout_prob"] = 0.0
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    hidden = config.get("hidden_size") or config["text_config"]["hidden_size"]
    g = torch.Generator().manual_seed(5)
    save_file({"v_head.summary.weight": torch.randn(1, hidden, generator=g) * 0.5,
               "v_head.summary.bias": torch.randn(1, generator=g)}, os.path.join(model_dir, "value_head.safetensors"))
    return model_dir


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_adapter(model_dir: str, path: str, seed: int, **config) -> str:
    """A PEFT adapter (r=4, alpha=8, every linear module; `config`: other LoraConfig values, e.g. use_dora or
    target_parameters) on `model_dir` whose B matrices are random too (PEFT starts B at zero) and DoRA magnitudes
    perturbed, so the adapter changes the model from step 1; saved to `path`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = {"target_modules": LORA_TARGETS, **config}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path
