"""Worker for tests/test_lora_checkpoint.py (no tests here): LoRA checkpoints in one process (gloo, world size 1).

    python tests/lora_checkpoint_worker.py --model HF_DIR --out DIR

Saves LoRA checkpoints through the trainer's own `_save_checkpoint` (the PEFT adapter inside, written before
publishing), checks atomicity and the adapter-aware strict load (`_load_checkpoint`), and prints one line
`RESULT {json}` with what it found. Leaves DIR/run/checkpoint-1 (a LoRA checkpoint) for merge tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(bridge, hf_config, model_dir: str, r: int = 4, targets=None, seed: int = 0, random_b: bool = True):
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models import lora

    models = bridge.build_model(hf_config, MegatronArguments(), torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    ft = SimpleNamespace(lora_rank=r, lora_alpha=2 * r, lora_dropout=0.0, use_rslora=False,
                         lora_target=list(targets or ["all"]))
    state = lora.apply_lora(bridge, models, ft, SimpleNamespace(model_name_or_path=model_dir,
                                                                adapter_name_or_path=None), seed=seed)
    if random_b:
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for n, p in models[0].named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return models, state


def adapters(models) -> dict:
    return {n: p.detach().clone() for n, p in models[0].named_parameters() if ".lora_" in n}


def book(step: int):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step = step
    return SimpleNamespace(state=state)


class Untouchable:
    """An optimizer / scheduler that must not be used: save_only_model leaves them out, and a resume from a
    save_only_model checkpoint is refused before either is touched."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        raise AssertionError(f"{self._name}.{attr} used")


def expect_error(fn, *words) -> str:
    from llamafactory_mca.checkpoint import CheckpointError

    try:
        fn()
    except CheckpointError as err:
        msg = str(err)
        missing = [w for w in words if w not in msg]
        return "ok" if not missing else f"message lacks {missing}: {msg}"
    return "no error"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    from transformers import AutoConfig

    from llamafactory_mca import checkpoint
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.export import single_process_parallel
    from llamafactory_mca.models import get_bridge, lora
    from llamafactory_mca.training.loop import _load_checkpoint, _save_checkpoint

    res: dict = {}
    hf_config = AutoConfig.from_pretrained(a.model)
    bridge = get_bridge(hf_config)
    run_dir = os.path.join(a.out, "run")
    targs = SimpleNamespace(output_dir=run_dir, save_total_limit=None)
    m = MegatronArguments()
    with single_process_parallel():
        models, state = lora_model(bridge, hf_config, a.model, seed=0)
        saved = adapters(models)
        _save_checkpoint(book(1), models, None, None, targs, m, None, hf_config)
        ckpt = os.path.join(run_dir, "checkpoint-1")
        info = checkpoint.checkpoint_info(ckpt)
        res["marker"] = {k: info.get(k) for k in ("adapter_only", "finetuning_type", "base_model_name_or_path",
                                                    "base_model_path")}
        res["files"] = sorted(os.listdir(ckpt))
        res["hidden_left"] = [n for n in os.listdir(run_dir) if n.startswith(".")]

        # save_only_model (HF's key) through the same call: the adapter without optimizer, scheduler or RNG state
        only_dir = os.path.join(a.out, "model_only")
        _save_checkpoint(book(1), models, Untouchable("optimizer"), Untouchable("scheduler"),
                         SimpleNamespace(output_dir=only_dir, save_total_limit=None, save_only_model=True), m, None,
                         hf_config)
        only = os.path.join(only_dir, "checkpoint-1")
        info = checkpoint.checkpoint_info(only)
        res["model_only_marker"] = {k: info.get(k) for k in ("save_only_model", "adapter_only", "has_optimizer",
                                                             "has_scheduler", "has_rng")}
        res["model_only_files"] = sorted(os.listdir(only))
        res["model_only_tensor_keys_equal"] = checkpoint.checkpoint_tensor_meta(only) == \
            checkpoint.checkpoint_tensor_meta(ckpt)
        with open(os.path.join(only, lora.ADAPTER_WEIGHTS), "rb") as f1, \
                open(os.path.join(ckpt, lora.ADAPTER_WEIGHTS), "rb") as f2:
            res["model_only_adapter_equal"] = f1.read() == f2.read()
        models_r, _ = lora_model(bridge, hf_config, a.model, seed=3)
        res["model_only_resume"] = expect_error(
            lambda: _load_checkpoint(only, models_r, Untouchable("optimizer"), Untouchable("scheduler"), book(0)),
            only, "save_only_model", f"adapter_name_or_path: {only}", "Fix:")
        res["model_only_weights_load"] = _load_checkpoint(only, models_r, None, None, book(0)) == 1 and all(
            torch.equal(p, saved[n]) for n, p in adapters(models_r).items())

        # a published checkpoint is immutable: a later save_peft_adapter into it writes nothing
        with open(os.path.join(ckpt, lora.ADAPTER_WEIGHTS), "rb") as f:
            before = f.read()
        with torch.no_grad():
            for module in state.modules:
                for prm in module.lora_B.values():
                    prm.add_(1.0)
        lora.save_peft_adapter(models, state, ckpt, base_model_name_or_path=a.model)
        with open(os.path.join(ckpt, lora.ADAPTER_WEIGHTS), "rb") as f:
            res["published_adapter_unchanged"] = f.read() == before

        # a failure while the extra files are written publishes nothing
        def broken(tmp_dir: str) -> None:
            with open(os.path.join(tmp_dir, "partial.bin"), "wb") as f:
                f.write(b"x")
            raise RuntimeError("disk full")

        try:
            checkpoint.save_checkpoint(run_dir, 2, models, extra_files=broken)
            res["failed_save"] = "no error"
        except checkpoint.CheckpointError as e:  # every rank raises it, naming the failed rank's error
            res["failed_save"] = sorted(s for s, _ in checkpoint.list_checkpoints(run_dir))
            res["failed_save_reported"] = "rank 0: RuntimeError: disk full" in str(e)
            res["failed_save_leftovers"] = sorted(n for n in os.listdir(run_dir) if n.startswith("."))
        # dict form of extra_files
        dict_dir = checkpoint.save_checkpoint(os.path.join(a.out, "dict"), 3, models, extra_files={
            "notes/readme.txt": "hello", "extra.json": {"a": 1}, "raw.bin": b"\x00\x01",
            "made_by_callable.txt": lambda path: open(path, "w").write("made")})
        res["dict_files"] = {n: open(os.path.join(dict_dir, n), "rb").read().decode("latin-1")
                             for n in ("notes/readme.txt", "raw.bin", "made_by_callable.txt")}
        with open(os.path.join(dict_dir, "extra.json")) as f:
            res["dict_files"]["extra.json"] = json.load(f)

        # resume: every adapter tensor comes back (another seed initialised the adapters differently)
        models2, _ = lora_model(bridge, hf_config, a.model, seed=5)
        before2 = adapters(models2)
        res["resume_differs_before"] = any(not torch.equal(before2[k], saved[k]) for k in saved)
        step = _load_checkpoint(ckpt, models2, None, None, book(0))
        got = adapters(models2)
        res["resume_step"] = step
        res["resume_equal"] = sorted(got) == sorted(saved) and all(torch.equal(got[k], saved[k]) for k in saved)

        # adapter-aware strictness
        res["lora_rank_mismatch"] = expect_error(
            lambda: _load_checkpoint(ckpt, lora_model(bridge, hf_config, a.model, r=2)[0], None, None, book(0)),
            ckpt, "lora_rank", "Fix:")
        res["missing_adapter"] = expect_error(lambda: _load_checkpoint(
            os.path.join(a.out, "q_only", "checkpoint-1"), models2, None, None, book(0)), "missing", "Fix:") \
            if _save_q_only(bridge, hf_config, a, m) else "setup failed"
        full = bridge.build_model(hf_config, m, torch.float32, init_weights=False)
        bridge.load_hf_weights(full, a.model)
        res["lora_ckpt_into_full_run"] = expect_error(
            lambda: checkpoint.load_checkpoint(ckpt, full), "LoRA checkpoint", "finetuning_type: lora")
        full_ckpt = checkpoint.save_checkpoint(os.path.join(a.out, "full"), 1, full, hf_config=hf_config)
        res["full_ckpt_into_lora_run"] = expect_error(
            lambda: _load_checkpoint(full_ckpt, models2, None, None, book(0)), "full model weights", "Fix:")
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _save_q_only(bridge, hf_config, a, m) -> bool:
    """A LoRA checkpoint with q_proj adapters only: a run adapting every module lacks most of its tensors."""
    from llamafactory_mca.training.loop import _save_checkpoint

    models, _ = lora_model(bridge, hf_config, a.model, targets=["q_proj"])
    _save_checkpoint(book(1), models, None, None, SimpleNamespace(output_dir=os.path.join(a.out, "q_only"),
                                                                   save_total_limit=None), m, None, hf_config)
    return True


if __name__ == "__main__":
    sys.exit(main())
