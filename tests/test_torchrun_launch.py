"""The launching process starts torchrun itself under USE_MCA (llamafactory_mca/torchrun_launch.py): the command and
the children's environment must be exactly what LLaMA-Factory's own launcher would have started."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, clean_env

from llamafactory_mca import torchrun_launch

LAUNCH_ENVS = {
    "one-node": dict(NPROC_PER_NODE="2", MASTER_PORT="29123"),
    "two-nodes": dict(NNODES="2", NODE_RANK="1", NPROC_PER_NODE="8", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"),
    "elastic": dict(NPROC_PER_NODE="4", MASTER_PORT="29501", RDZV_ID="job7", MIN_NNODES="1", MAX_NNODES="3",
                    MAX_RESTARTS="2"),
    "no-cuda-settings": dict(NPROC_PER_NODE="1", MASTER_PORT="29502", OPTIM_TORCH="0"),
}
LAUNCH_VARS = {"NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "MIN_NNODES",
               "MAX_NNODES", "MAX_RESTARTS", "OPTIM_TORCH", "USE_MCA"}


def upstream_command(monkeypatch, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """What LLaMA-Factory's launcher passes to subprocess.run for `llamafactory-cli train ARGS` (nothing runs)."""
    import llamafactory.launcher as launcher

    seen = {}

    def record(cmd, env=None, check=False, **_kw):
        seen.update(cmd=cmd, env=dict(env))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(launcher.subprocess, "run", record)
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", *args])
    with pytest.raises(SystemExit):
        launcher.launch()
    return seen["cmd"], seen["env"]


@pytest.mark.parametrize("layout", list(LAUNCH_ENVS))
def test_torchrun_command_and_environment_equal_upstreams(monkeypatch, layout):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    for name, value in LAUNCH_ENVS[layout].items():
        monkeypatch.setenv(name, value)
    args = ["recipe.yaml", "learning_rate=1e-5", "output_dir=out dir"]
    ours = torchrun_launch.torchrun_command(args, dict(os.environ))
    assert ours == upstream_command(monkeypatch, args)


def test_launching_process_does_not_import_the_training_stack(tmp_path):
    """`USE_MCA=1 llamafactory-cli train` reaches torchrun without importing transformers or LLaMA-Factory's
    extras (they cost 8 s of start-up on this machine; the training processes import them anyway)."""
    code = ("import sys; import llamafactory_mca.torchrun_launch as t; "
            "t.subprocess.run = lambda cmd, **kw: print('TORCHRUN', ' '.join(cmd)) or sys.exit(0); "
            "sys.argv = ['llamafactory-cli', 'train', sys.argv[1]]; from llamafactory.cli import main; main()")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {tmp_path}/m\nstage: sft\ndo_train: true\nfinetuning_type: full\n"
                      f"dataset: tiny_sft\ntemplate: qwen\noutput_dir: {tmp_path}/out\n")
    env = clean_env(USE_MCA="1", PYTHONPATH=REPO, LLAMAFACTORY_MCA_VERBOSE="1", NPROC_PER_NODE="1",
                    PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run([sys.executable, "-c", code, str(recipe)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCHRUN torchrun --nnodes 1" in proc.stdout and "llamafactory/launcher.py" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "llamafactory_mca.torchrun_launch" in imported
    assert not imported & {"torch", "transformers", "llamafactory.extras.misc"}, sorted(imported)[:50]


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    """The port given to torchrun is free and, where the kernel's range allows, not one an outgoing connection of
    another process could take before torchrun binds it."""
    import socket

    from llamafactory_mca.torchrun_launch import LOWEST_PICKED_PORT, ephemeral_port_start, free_port

    for _ in range(5):
        port = free_port()
        if ephemeral_port_start() > LOWEST_PICKED_PORT + 1:
            assert LOWEST_PICKED_PORT <= port < ephemeral_port_start()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", port))
