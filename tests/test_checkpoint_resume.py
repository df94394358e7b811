"""Checkpoints: exact resume (distributed optimizer, CPU, 2 gloo ranks), resharding (also across an EP change of
MoE layers), the AdamW shared-step trap,
atomic publishing, the errors for paths that are not (complete) checkpoints, and faults: a full disk, SIGKILL
in the middle of a save, a preemption signal, truncated and tampered files, a deleted marker."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, worktree_env

WORKER = os.path.join(REPO, "tests", "checkpoint_worker.py")


def torchrun(*args: str, nproc: int = 2, timeout: int = 300, ok: bool = True) -> str:
    """Run the worker on `nproc` gloo ranks; its stdout (`ok`: it must succeed), else stdout + stderr of a run
    that must fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER, *args]
    proc = subprocess.run(cmd, env=worktree_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout if ok else proc.stdout + proc.stderr


def losses(out: str, resumed: bool = False) -> dict[int, float]:
    with open(os.path.join(out, "losses_resumed.json" if resumed else "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


def resumed_info(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESUMED "))
    return json.loads(line[len("RESUMED "):])


def read_all_tensors(path: str) -> dict:
    """Every tensor of a torch_dist checkpoint (model and optimizer), read in this one process."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(path)
    md = reader.read_metadata()
    sd = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    load(sd, storage_reader=reader, no_dist=True)
    return sd


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    """6 steps, dp=2, distributed optimizer, dropout on (so RNG state matters), a checkpoint every 3 steps."""
    out = str(tmp_path_factory.mktemp("full"))
    torchrun("--out", out, "--steps", "6", "--save_steps", "3", "--distopt", "--dropout", "0.1")
    return out


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(uninterrupted, tmp_path):
    out = str(tmp_path)
    # the run dies right after its step-3 checkpoint (before step 4 could be saved)
    torchrun("--out", out, "--steps", "6", "--save_steps", "3", "--stop_after", "3", "--distopt", "--dropout", "0.1")
    assert sorted(os.listdir(out)) == ["checkpoint-3", "losses.json"]
    stdout = torchrun("--out", out, "--steps", "6", "--save_steps", "3", "--distopt", "--dropout", "0.1",
                      "--resume", os.path.join(out, "checkpoint-3"))
    info = resumed_info(stdout)
    assert info["rng_restored"] and info["optimizer_loaded"] and info["step"] == 3
    # every parameter has its own AdamW step tensor, at the right value
    assert info["distinct_step_tensors"] == info["num_step_tensors"] > 1
    assert info["step_values"] == [3.0]
    full = losses(uninterrupted)
    assert losses(out) == {k: full[k] for k in (1, 2, 3)}
    assert losses(out, resumed=True) == {k: full[k] for k in (4, 5, 6)}  # bit for bit
    # the checkpoint written after the resume equals the uninterrupted run's, tensor for tensor
    a = read_all_tensors(os.path.join(out, "checkpoint-6"))
    b = read_all_tensors(os.path.join(uninterrupted, "checkpoint-6"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_resume_without_distributed_optimizer_is_bit_exact(tmp_path):
    full, out = str(tmp_path / "full"), str(tmp_path / "resumed")
    torchrun("--out", full, "--steps", "4", "--save_steps", "2")
    stdout = torchrun("--out", out, "--steps", "4", "--resume", os.path.join(full, "checkpoint-2"))
    info = resumed_info(stdout)
    assert info["rng_restored"] and info["optimizer_loaded"]
    assert info["distinct_step_tensors"] == info["num_step_tensors"] and info["step_values"] == [2.0]
    a = losses(full)
    assert losses(out, resumed=True) == {3: a[3], 4: a[4]}


@pytest.mark.slow
def test_adamw_shared_step_trap_is_fixed(uninterrupted, tmp_path):
    """megatron-core 0.16.1 loads ONE step tensor into every param; AdamW increments it once per param."""
    stdout = torchrun("--out", str(tmp_path), "--steps", "6", "--distopt", "--dropout", "0.1", "--no_untie",
                      "--resume", os.path.join(uninterrupted, "checkpoint-3"))
    info = resumed_info(stdout)
    assert info["distinct_step_tensors"] == 1 < info["num_step_tensors"]  # the trap exists without our fix
    full = losses(uninterrupted)
    broken = losses(str(tmp_path), resumed=True)
    assert broken[4] == full[4]  # the first step after the resume still uses the right step ...
    assert broken[5] != full[5]  # ... then bias correction runs ahead: silent divergence


FAULT_RUN = ("--steps", "6", "--save_steps", "2", "--distopt", "--dropout", "0.1")  # as `uninterrupted`


@pytest.mark.slow
def test_faults_never_lose_the_run(uninterrupted, tmp_path):
    """One output_dir through a full disk, a SIGKILL mid-save, a preemption signal, a truncated shard and a
    deleted marker: nothing incomplete is ever published or picked, and the restart after the first two faults
    resumes from the checkpoint before them bit for bit (the restart from a preemption checkpoint, through the
    trainer and LLaMA-Factory's automatic resume: test_checkpoint_e2e)."""
    from transformers.trainer_utils import get_last_checkpoint as hf_get_last_checkpoint

    from llamafactory_mca.checkpoint import (
        MARKER_FILE,
        CheckpointError,
        checkpoint_info,
        get_last_checkpoint,
        list_checkpoints,
        read_rng_state,
        verify_checkpoint,
    )

    out, full = str(tmp_path), losses(uninterrupted)
    ckpt = {k: os.path.join(out, f"checkpoint-{k}") for k in range(1, 7)}

    # disk full on rank 1 while checkpoint-4 is written: every rank stops with one message, nothing is published
    log = torchrun("--out", out, *FAULT_RUN, "--enospc_at", "4", "--enospc_rank", "1", ok=False)
    assert (f"saving {ckpt[4]} failed (rank 1: OSError: [Errno 28] No space left on device" in log
            and f"Fix: free disk space under {out}" in log), log[-3000:]
    assert os.listdir(out) == ["checkpoint-2"]  # the temporary directory is removed too

    # SIGKILL in the middle of the save of checkpoint-4, in a run restarted on one rank (data-parallel size 2 -> 1:
    # the RNG state of data-parallel rank 0 is restored): only a hidden temporary directory remains
    log = torchrun("--out", out, *FAULT_RUN, "--resume", "auto", "--kill_during_save", "4", nproc=1, ok=False)
    info = resumed_info(log)
    assert info["step"] == 2 and info["rng_restored"]
    assert info["torch_rng_sha"] == hashlib.sha256(
        read_rng_state(os.path.join(ckpt[2], "rng_state_0.pth"))["torch"].numpy().tobytes()).hexdigest()
    assert sorted(os.listdir(out)) == [".checkpoint-4.tmp", "checkpoint-2"]
    assert get_last_checkpoint(out) == hf_get_last_checkpoint(out) == ckpt[2]  # ours and LLaMA-Factory's pick

    # SIGUSR1 to rank 1 alone during step 5: all ranks finish the step, save checkpoint-5 and exit 0
    stdout = torchrun("--out", out, *FAULT_RUN, "--resume", "auto", "--signal_at", "5", "--signal_rank", "1")
    assert resumed_info(stdout)["step"] == 2 and resumed_info(stdout)["rng_restored"]
    assert losses(out, resumed=True) == {k: full[k] for k in (3, 4, 5)}  # bit for bit after the SIGKILL
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 5] and checkpoint_info(ckpt[5])["step"] == 5
    assert not [n for n in os.listdir(out) if n.startswith(".")]

    # a truncated shard of the newest checkpoint: refused before anything is loaded, naming the file; the
    # checkpoint before it still passes
    shard = os.path.join(ckpt[5], "__0_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ckpt[5])
    assert f"{shard} is truncated ({size // 2} of" in str(err.value) and "Fix:" in str(err.value)
    assert verify_checkpoint(ckpt[4])["step"] == 4

    # its marker deleted: checkpoint-5 is not complete any more, the error names the one to use instead
    os.remove(os.path.join(ckpt[5], MARKER_FILE))
    assert get_last_checkpoint(out) == ckpt[4]
    with pytest.raises(CheckpointError) as err:
        checkpoint_info(ckpt[5])
    assert f"resume_from_checkpoint: {ckpt[4]}" in str(err.value)


class _Exploit:
    """A pickle that creates a directory when it is unpickled (stands for any code in a tampered file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.slow
def test_tampered_files_are_refused_and_never_executed(uninterrupted, tmp_path):
    import pickle
    import shutil

    import torch

    from llamafactory_mca.checkpoint import CheckpointError, read_rng_state, verify_checkpoint

    src = os.path.join(uninterrupted, "checkpoint-6")
    verify_checkpoint(src)
    sentinel = str(tmp_path / "code-ran")
    for name, write in ((".metadata", lambda f: pickle.dump(_Exploit(sentinel), f)),
                        ("common.pt", lambda f: torch.save({"x": _Exploit(sentinel)}, f)),
                        (".metadata", lambda f: f.write(b"\x80\x04garbage"))):
        ckpt = str(tmp_path / "checkpoint-6")
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(src, ckpt)
        with open(os.path.join(ckpt, name), "wb") as f:
            write(f)
        with pytest.raises(CheckpointError) as err:
            verify_checkpoint(ckpt)
        assert os.path.join(ckpt, name) in str(err.value) and "Fix:" in str(err.value), str(err.value)
    rng = str(tmp_path / "rng_state_0.pth")
    torch.save({"python": _Exploit(sentinel)}, rng)
    with pytest.raises(CheckpointError, match="rng_state_0.pth cannot be read safely"):
        read_rng_state(rng)
    assert not os.path.exists(sentinel)


def _resharded(tmp_path, src: str, *new_layout: str) -> tuple[str, dict]:
    out, again = str(tmp_path / "resumed"), str(tmp_path / "resaved")
    stdout = torchrun("--out", out, "--steps", "6", "--distopt", "--resume", os.path.join(src, "checkpoint-3"),
                      "--resave", again, *new_layout)
    return out, resumed_info(stdout)


def _assert_same_checkpoint(a_dir: str, b_dir: str) -> None:
    a, b = read_all_tensors(a_dir), read_all_tensors(b_dir)
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in a)
    bad = [k for k in a if not (a[k] == b[k]).all()]
    assert not bad, bad[:5]


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved, resumed",
    [pytest.param(("--tp", "2"), (), marks=pytest.mark.extended), ((), ("--pp", "2"))],
    ids=["tp2-to-tp1", "pp1-to-pp2"],  # tp2 -> tp1 also in test_merge_layouts' odd-vocab resume
)
def test_resume_with_another_layout(tmp_path, saved, resumed):
    src = str(tmp_path / "src")
    torchrun("--out", src, "--steps", "6", "--save_steps", "3", "--distopt", *saved)
    out, info = _resharded(tmp_path, src, *resumed)
    assert info["optimizer_loaded"] and not info["rng_restored"]  # ranks do not map one to one: RNG not restored
    assert info["distinct_step_tensors"] == info["num_step_tensors"] and info["step_values"] == [3.0]
    # model weights and every optimizer state tensor survive the resharding exactly
    _assert_same_checkpoint(os.path.join(src, "checkpoint-3"), os.path.join(str(tmp_path / "resaved"), "checkpoint-3"))
    # and training continues where it was: the first step after the resume matches up to reduction order
    full, after = losses(src), losses(out, resumed=True)
    assert after[4] == pytest.approx(full[4], rel=1e-5)
    assert after[6] == pytest.approx(full[6], rel=5e-3)


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("saved_ep, resumed_ep, optimizer", [(2, 1, ("--distopt",)), (1, 2, ())],
                         ids=["ep2-to-ep1-distopt", "ep1-to-ep2"])
def test_resume_after_changing_ep(tmp_path, saved_ep, resumed_ep, optimizer):
    """MoE layers (4 experts): with EP > 1 megatron keeps the expert parameters in a second chained optimizer, so
    the optimizer's param groups are laid out differently (optimizer_layout). Full-parameter training resumes
    across the change: every weight and optimizer tensor bit-exactly, and the losses continue."""
    src, out, again = (str(tmp_path / n) for n in ("src", "resumed", "resaved"))
    moe = ("--experts", "4", *optimizer)
    torchrun("--out", src, "--steps", "6", "--save_steps", "3", "--ep", str(saved_ep), *moe)
    info = resumed_info(torchrun("--out", out, "--steps", "6", "--resume", os.path.join(src, "checkpoint-3"),
                                 "--resave", again, "--ep", str(resumed_ep), *moe))
    assert info["optimizer_loaded"] and info["step_values"] == [3.0]
    assert info["distinct_step_tensors"] == info["num_step_tensors"]
    _assert_same_checkpoint(os.path.join(src, "checkpoint-3"), os.path.join(again, "checkpoint-3"))
    full, after = losses(src), losses(out, resumed=True)
    assert set(after) == {4, 5, 6}
    for step in after:  # measured: equal; the expert gradients' reduction order differs between the layouts
        assert after[step] == pytest.approx(full[step], rel=1e-6), (full, after)


def test_optimizer_param_groups_follow_the_layout():
    """The common (non-tensor) optimizer state of an EP=2 checkpoint ({0: dense, 1: experts}) rebuilt for EP=1
    (one optimizer whose groups hold dense and expert parameters) and back, as megatron-core 0.16.1 saves it."""
    import torch
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor

    from llamafactory_mca.optimizer_layout import OptimizerLayoutError, container_copy, optimizer_state_for_layout

    def group(wd_mult: float, expert: bool, step=3.0, lr=0.0025) -> dict:
        return {"is_expert_parallel": expert, "wd_mult": wd_mult, "lr_mult": 1.0, "is_decoupled_lr": False,
                "lr": lr, "betas": (0.9, 0.95), "weight_decay": 0.1, "step": step}

    def tensor(key: str) -> ShardedTensor:
        return ShardedTensor.from_rank_offsets(f"optimizer.state.exp_avg.{key}", torch.zeros(2))

    def distopt(groups, keys) -> dict:  # DistributedOptimizer, fully_reshardable
        return {"optimizer": {"param_groups": groups}, "param_state_sharding_type": "fully_reshardable",
                "param_state": {k: {"exp_avg": tensor(k)} for k in keys}}

    saved_ep2 = {0: {"optimizer": {"param_groups": [group(1.0, False), group(0.0, False)]},
                     "param_state_sharding_type": "fully_reshardable"},
                 1: {"optimizer": {"param_groups": [group(1.0, True, lr=0.5)]},
                     "param_state_sharding_type": "fully_reshardable"}}
    # EP=1: one optimizer, fresh (step 0), its groups hold the expert weights too
    requested = container_copy(distopt([group(1.0, False, 0.0, 0.01), group(0.0, False, 0.0, 0.01)], ["fc", "ex"]))
    loaded = {**saved_ep2, "param_state": {k: {"exp_avg": torch.full((2,), i + 1.0)} for i, k in enumerate(["fc", "ex"])}}
    state = optimizer_state_for_layout(requested, loaded, saved_ep2, num_optimizers=1)
    assert state["optimizer"]["param_groups"] == [group(1.0, False), group(0.0, False)]  # dense group preferred
    assert state["param_state_sharding_type"] == "fully_reshardable"
    assert torch.equal(state["param_state"]["ex"]["exp_avg"], torch.full((2,), 2.0))

    # back to EP=2 from an EP=1 checkpoint without the distributed optimizer (FP32Optimizer: common_step)
    saved_ep1 = {"state": {"common_step": 3}, "param_groups": [group(1.0, False), group(0.0, False)]}
    params = lambda *ids: LocalNonpersistentObject(list(ids))  # noqa: E731
    requested = container_copy({
        0: {"state": {0: {"exp_avg": tensor("fc")}}, "param_groups": [{**group(1.0, False, 0.0), "params": params(0)},
                                                                     {**group(0.0, False, 0.0), "params": params(1)}]},
        1: {"state": {0: {"exp_avg": tensor("ex")}}, "param_groups": [{**group(1.0, True, 0.0), "params": params(0)}]},
    })
    loaded = {**saved_ep1, 0: {"state": {0: {"exp_avg": torch.ones(2)}}}, 1: {"state": {0: {"exp_avg": torch.ones(2)}}}}
    state = optimizer_state_for_layout(requested, loaded, saved_ep1, num_optimizers=2)
    assert state[1]["param_groups"] == [{**group(1.0, True), "params": [0]}]  # expert group: the layout's flag
    assert state[0]["param_groups"][1] == {**group(0.0, False), "params": [1]}
    assert state[0]["state"]["common_step"] == state[1]["state"]["common_step"] == 3

    # a group the checkpoint never had (another weight-decay multiplier): the key and the fix
    requested = container_copy(distopt([group(0.5, False, 0.0)], ["fc"]))
    with pytest.raises(OptimizerLayoutError, match="wd_mult.*Fix: resume with the weight_decay"):
        optimizer_state_for_layout(requested, {}, saved_ep2, num_optimizers=1)


# --------------------------------------------------------------------------------------------- no processes


def _fake_checkpoint(path, marker: bool = True, model_type: str = "qwen3", **info) -> str:
    from llamafactory_mca.checkpoint import FORMAT, FORMAT_VERSION, MARKER_FILE

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write('{"sharded_backend": "torch_dist"}')
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": model_type}, f)
    if marker:
        with open(os.path.join(path, MARKER_FILE), "w") as f:
            json.dump({"format": FORMAT, "version": FORMAT_VERSION, "step": 1, **info}, f)
    return str(path)


def test_errors_name_the_path_and_the_fix(tmp_path):
    from llamafactory_mca.checkpoint import CheckpointError, checkpoint_info, is_megatron_checkpoint

    half = _fake_checkpoint(tmp_path / "checkpoint-5", marker=False)
    tmp = _fake_checkpoint(tmp_path / ".checkpoint-6.tmp", marker=False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cases = {
        half: "incomplete",
        tmp: "still being written",
        str(hf): "Hugging Face model",
        str(tmp_path / "nowhere"): "does not exist",
        str(tmp_path): "not a llamafactory-mca checkpoint",
    }
    for path, words in cases.items():
        assert not is_megatron_checkpoint(path)
        with pytest.raises(CheckpointError) as err:
            checkpoint_info(path)
        assert words in str(err.value) and path in str(err.value) and "Fix:" in str(err.value)


def test_last_checkpoint_and_rotation_skip_incomplete(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint as hf_get_last_checkpoint

    from llamafactory_mca.checkpoint import get_last_checkpoint, list_checkpoints, rotate_checkpoints

    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    _fake_checkpoint(tmp_path / "checkpoint-4", marker=False)  # half-written by an older version / copied
    _fake_checkpoint(tmp_path / ".checkpoint-5.tmp", marker=False)  # being written
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    # the temporary directory is invisible to LLaMA-Factory's auto-resume (transformers' get_last_checkpoint)
    assert hf_get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert rotate_checkpoints(str(tmp_path), 2) == [str(tmp_path / "checkpoint-1")]
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    # a limit of 1 keeps the newest, and `keep` protects the one just saved
    assert rotate_checkpoints(str(tmp_path), 1, keep=[str(tmp_path / "checkpoint-2")]) == []
    assert rotate_checkpoints(str(tmp_path), 1) == [str(tmp_path / "checkpoint-2")]
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3]
    assert not any(n.endswith(".deleting") for n in os.listdir(tmp_path))


def test_save_only_model_checkpoints_refuse_to_resume(tmp_path):
    """Checked on the parsed arguments (before any model is built) and by the loader; the checkpoint stays."""
    from types import SimpleNamespace

    from llamafactory_mca.arg_hooks import check_resume as _check_resume
    from llamafactory_mca.checkpoint import CheckpointError, check_resumable

    normal = _fake_checkpoint(tmp_path / "normal" / "checkpoint-1")
    only = _fake_checkpoint(tmp_path / "only" / "checkpoint-1", save_only_model=True)
    lora = _fake_checkpoint(tmp_path / "lora" / "checkpoint-1", save_only_model=True, adapter_only=True)
    check_resumable(normal)
    _check_resume(SimpleNamespace(do_train=True, resume_from_checkpoint=normal))
    _check_resume(SimpleNamespace(do_train=False, resume_from_checkpoint=only))  # no training: nothing resumes
    _check_resume(SimpleNamespace(do_train=True, resume_from_checkpoint=str(tmp_path)))  # the loader's own error
    for path, fix in ((only, f"llamafactory-mca merge --checkpoint_path {only}"),
                      (lora, f"adapter_name_or_path: {lora}")):
        for check, arg in ((check_resumable, path), (_check_resume, SimpleNamespace(do_train=True,
                                                                                     resume_from_checkpoint=path))):
            with pytest.raises(CheckpointError) as err:
                check(arg)
            msg = str(err.value)
            assert f"{path} was saved with save_only_model: true" in msg and "Fix:" in msg and fix in msg, msg
            assert "without save_only_model" in msg
        assert sorted(os.listdir(path)) == ["config.json", "mca_checkpoint.json", "metadata.json"]
