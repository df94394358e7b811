"""End to end through `USE_MCA=1 llamafactory-cli train`: save_steps, kill, resume_from_checkpoint, merge,
save_only_model (weights-only checkpoints that merge but refuse to resume), and preemption (a signal saves a
checkpoint and exits 0; the restarted recipe resumes from output_dir by itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from lf_runs import log_records, make_models, make_recipe, merge, train, train_command, train_fails

# 4 steps, a checkpoint after each, dp=2 with the distributed optimizer (its state is what save_only_model drops)
COMMON = dict(max_steps=4, save_strategy="steps", save_steps=1, use_distributed_optimizer=True,
              lr_scheduler_type="cosine", warmup_steps=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(models, tmp_path_factory) -> str:
    """The normal run: full checkpoints (optimizer, scheduler, RNG), save_total_limit=3."""
    tmp = tmp_path_factory.mktemp("full")
    return train(tmp, "full", make_recipe(models["dense"], str(tmp / "full"), save_total_limit=3, **COMMON), nproc=2)


def _losses(output_dir: str) -> dict[int, float]:
    return {r["current_steps"]: r["loss"] for r in log_records(output_dir) if "loss" in r}


@pytest.mark.slow
def test_resume_through_llamafactory_cli_is_bit_exact(models, full_run, tmp_path):
    from llamafactory_mca.checkpoint import checkpoint_info, list_checkpoints

    full = full_run
    # save_total_limit=3 deleted checkpoint-1; no temporary directory is left behind
    assert [s for s, _ in list_checkpoints(full)] == [2, 3, 4]
    assert not [n for n in os.listdir(full) if n.startswith(".")]
    ckpt2 = os.path.join(full, "checkpoint-2")
    info = checkpoint_info(ckpt2)
    assert info["step"] == 2 and info["has_optimizer"] and info["model_type"] == "qwen3"
    assert info["save_only_model"] is False
    # as if the run had been killed after step 2: resume from its checkpoint
    resumed = train(tmp_path, "resumed", make_recipe(models["dense"], str(tmp_path / "resumed"),
                                                     resume_from_checkpoint=ckpt2, **COMMON), nproc=2)
    a, b = _losses(full), _losses(resumed)
    assert set(b) == {3, 4}, b
    assert [b[3], b[4]] == [a[3], a[4]], (a, b)  # bit for bit


def _workers(pid: int) -> list:
    """The torchrun workers (LLaMA-Factory's launcher.py) under the `llamafactory-cli` process `pid`: the processes
    torchrun gave a LOCAL_RANK, not their own children (the data-prefetch worker inherits the variable)."""
    import psutil

    ranked = [p for p in psutil.Process(pid).children(recursive=True) if "LOCAL_RANK" in p.environ()]
    pids = {p.pid for p in ranked}
    return [p for p in ranked if p.ppid() not in pids]


@pytest.mark.slow
def test_preemption_signal_saves_and_the_restart_resumes_bit_exactly(models, full_run, tmp_path):
    from llamafactory_mca.checkpoint import list_checkpoints

    out = str(tmp_path / "preempted")
    recipe = make_recipe(models["dense"], out, **{**COMMON, "save_steps": 100})  # no checkpoint but the signal's
    cmd, env = train_command(tmp_path, "preempted", recipe, nproc=2)
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = os.path.join(out, "trainer_log.jsonl")
    deadline = time.time() + 600
    workers: list = []
    while len(workers) < 2 and proc.poll() is None and time.time() < deadline:  # found early: the signal must
        time.sleep(0.05)  # reach a worker within a step of the first log record on a loaded CI machine
        workers = _workers(proc.pid)
    assert len(workers) == 2, proc.communicate()[0][-3000:] if proc.poll() is not None else workers
    while not (os.path.isfile(log) and log_records(out)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers[-1].send_signal(signal.SIGUSR1)  # one rank only: the ranks agree on the step to stop after
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-5000:]  # workers, torchrun and llamafactory-cli exit 0
    saved = [s for s, _ in list_checkpoints(out)]
    assert len(saved) == 1 and saved[0] < COMMON["max_steps"], (saved, output[-3000:])
    assert set(_losses(out)) == set(range(1, saved[0] + 1))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # no final export: the run is not over

    # the same recipe again (a scheduler's restart): LLaMA-Factory resumes from output_dir by itself
    train(tmp_path, "restarted", make_recipe(models["dense"], out, overwrite_output_dir=False,
                                             **{**COMMON, "save_steps": 100}), nproc=2)
    assert _losses(out) == _losses(full_run)  # steps before and after the preemption, bit for bit
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def _tree(path: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _distcp_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".distcp"))


@pytest.mark.slow
def test_save_only_model_writes_weights_that_merge_but_do_not_resume(models, full_run, tmp_path):
    import torch
    from test_checkpoint_resume import read_all_tensors
    from test_merge_layouts import safetensors_of
    from torch.distributed.checkpoint import FileSystemReader

    from llamafactory_mca.checkpoint import checkpoint_info, list_checkpoints

    out = train(tmp_path, "model_only", make_recipe(models["dense"], str(tmp_path / "model_only"), save_total_limit=2,
                                                    save_only_model=True, **COMMON), nproc=2)
    # published atomically and rotated as before: the two newest, nothing hidden left behind
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    ckpt, normal = os.path.join(out, "checkpoint-4"), os.path.join(full_run, "checkpoint-4")
    info = checkpoint_info(ckpt)
    assert info["save_only_model"] is True and info["step"] == 4
    assert not (info["has_optimizer"] or info["has_scheduler"] or info["has_rng"])

    # against the normal checkpoint of the same step: exactly the scheduler and RNG files are missing ...
    ours, theirs = set(os.listdir(ckpt)), set(os.listdir(normal))
    assert theirs - ours == {"scheduler.json", "rng_state_0.pth", "rng_state_1.pth"}, theirs ^ ours
    assert ours <= theirs and {"trainer_state.json", "config.json", "tokenizer.json", "mca_args.json"} <= ours
    # ... the torch_dist tensors are the model's, without any optimizer entry (nor in common.pt) ...
    keys = set(FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    normal_keys = set(FileSystemReader(normal).read_metadata().state_dict_metadata)
    assert any(k.startswith("optimizer.") for k in normal_keys)
    assert keys == {k for k in normal_keys if not k.startswith("optimizer.")}
    assert "optimizer" in torch.load(os.path.join(normal, "common.pt"), weights_only=True)
    assert "optimizer" not in torch.load(os.path.join(ckpt, "common.pt"), weights_only=True)
    assert _distcp_bytes(ckpt) * 3 < _distcp_bytes(normal)  # fp32 Adam: param + 2 moments = 3x the weights
    # ... and the weights are those of the normal run at that step, bit for bit
    a, b = read_all_tensors(ckpt), read_all_tensors(normal)
    assert a and all(torch.equal(a[k], b[k]) for k in a)

    # merge reads it: the same safetensors as the run's own final Hugging Face export (step 4)
    merged = merge(ckpt, str(tmp_path / "merged"), "--fp32", timeout=300)
    m, final = safetensors_of(merged), safetensors_of(out)
    assert m and m.keys() == final.keys() and all(torch.equal(m[k], final[k]) for k in m)

    # resuming fails before any model is built, names the key and the fix, and deletes nothing: given
    # explicitly, and picked by LLaMA-Factory's automatic resume from output_dir
    before = _tree(out)
    explicit = train_fails(tmp_path, "resume", make_recipe(models["dense"], str(tmp_path / "resumed"),
                                                           resume_from_checkpoint=ckpt, **COMMON))
    auto = train_fails(tmp_path, "auto_resume", make_recipe(models["dense"], out, overwrite_output_dir=False,
                                                            **COMMON))
    for log in (explicit, auto):
        assert f"{ckpt} was saved with save_only_model: true" in log, log[-3000:]
        assert "llamafactory-mca merge --checkpoint_path" in log and "without save_only_model" in log
        assert "trainable params" not in log
    after = _tree(out)
    assert {k: after.get(k) for k in before} == before
