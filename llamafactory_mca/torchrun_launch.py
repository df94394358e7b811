"""The launching process of `USE_MCA=1 llamafactory-cli train`: torchrun started without LLaMA-Factory's stack.

LLaMA-Factory's launcher (`llamafactory/launcher.py`, the same torchrun branch in 0.9.4, 0.9.5 and main) imports
`llamafactory.extras.misc` before it starts torchrun, i.e. transformers, peft and torch: 8.3 s of the 38.6 s a tiny
1-process CPU run takes from the command line to its last line on the 2-core CI machine (`python -X importtime`),
spent again in every training process anyway (the quick start's run, examples/megatron/tiny_cpu.yaml, end to
end: 42.1 s with upstream's launcher, 29.5 s with this one, twice each on an otherwise idle machine). Under USE_MCA
that branch is always taken (FORCE_TORCHRUN), so the launching process builds the same torchrun command here from
the same environment variables (NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, RDZV_ID, MIN_NNODES,
MAX_NNODES, MAX_RESTARTS, OPTIM_TORCH) and runs LLaMA-Factory's own `launcher.py` as the torchrun script, as
upstream does. tests/test_torchrun_launch.py checks the command and environment against upstream's launcher.

Only the process count needs a device query: NPROC_PER_NODE unset on a machine with NVIDIA devices imports torch
(`torch.cuda.device_count()`, which honours CUDA_VISIBLE_DEVICES as upstream's count does).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import NamedTuple, Optional

from llamafactory_mca.activation import has_nvidia_devices
from llamafactory_mca.log import is_verbose, run_with_quiet_stdout

UPSTREAM_LAUNCHER = "llamafactory.launcher"
ENABLED = ("true", "y", "1")


def upstream_launcher_path() -> str:
    """The file of LLaMA-Factory's launcher module (torchrun's script), found without importing it."""
    spec = importlib.util.find_spec(UPSTREAM_LAUNCHER)
    if spec is None or not spec.origin:
        raise RuntimeError(f"{UPSTREAM_LAUNCHER} not found: is LLaMA-Factory installed?")
    return spec.origin


def env_enabled(env: Mapping[str, str], name: str, default: str = "0") -> bool:
    """LLaMA-Factory's `is_env_enabled` on a given environment."""
    return env.get(name, default).lower() in ENABLED


LOWEST_PICKED_PORT = 20000


def ephemeral_port_start() -> int:
    """The first port of the kernel's range for outgoing connections (Linux's ip_local_port_range; 32768 where
    it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free now on this machine, picked at random below the ephemeral range: LLaMA-Factory's
    `find_available_port` takes an ephemeral port, which an outgoing connection of another process (another
    run's gloo sockets, say) can take before torchrun binds it (seen as EADDRINUSE with two runs starting at
    once). An ephemeral port as upstream's where no port below the range is free."""
    import random

    top = ephemeral_port_start() - 1
    pick = random.Random()
    for _ in range(64 if top > LOWEST_PICKED_PORT else 0):
        port = pick.randint(LOWEST_PICKED_PORT, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def device_count() -> int:
    """GPUs of this machine for the default NPROC_PER_NODE (torch only where NVIDIA device nodes exist)."""
    if not has_nvidia_devices():
        return 0
    import torch

    return torch.cuda.device_count()


class LaunchSettings(NamedTuple):
    """Upstream's launch values, from the environment (a free port is picked once, when MASTER_PORT is unset)."""

    nnodes: str
    node_rank: str
    nproc_per_node: str
    master_addr: str
    master_port: str


def launch_settings(env: Mapping[str, str]) -> LaunchSettings:
    """The launch values LLaMA-Factory's launcher reads from `env`, with its defaults."""
    return LaunchSettings(
        nnodes=env.get("NNODES", "1"),
        node_rank=env.get("NODE_RANK", "0"),
        nproc_per_node=env["NPROC_PER_NODE"] if "NPROC_PER_NODE" in env else str(device_count()),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=env["MASTER_PORT"] if "MASTER_PORT" in env else str(free_port()),
    )


def torchrun_command(args: list[str], env: Mapping[str, str],
                     settings: Optional[LaunchSettings] = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the torchrun run that LLaMA-Factory's launcher starts for `train ARGS` in `env`
    (`settings`: `launch_settings(env)` unless given)."""
    nnodes, node_rank, nproc_per_node, master_addr, master_port = settings or launch_settings(env)
    child_env = dict(env)
    if env_enabled(env, "OPTIM_TORCH", "1"):
        child_env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        child_env["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
    script = upstream_launcher_path()
    rdzv_id = env.get("RDZV_ID")
    if rdzv_id is not None:  # elastic launch, as upstream
        min_nnodes, max_nnodes = env.get("MIN_NNODES"), env.get("MAX_NNODES")
        rdzv_nnodes = f"{min_nnodes}:{max_nnodes}" if min_nnodes is not None and max_nnodes is not None else nnodes
        line = (f"torchrun --nnodes {rdzv_nnodes} --nproc-per-node {nproc_per_node} --rdzv-id {rdzv_id} "
                f"--rdzv-backend c10d --rdzv-endpoint {master_addr}:{master_port} "
                f"--max-restarts {env.get('MAX_RESTARTS', '0')} {script} {' '.join(args)}")
    else:
        line = (f"torchrun --nnodes {nnodes} --node_rank {node_rank} --nproc_per_node {nproc_per_node} "
                f"--master_addr {master_addr} --master_port {master_port} {script} {' '.join(args)}")
    return line.split(), child_env  # upstream splits on whitespace too


def announce(settings: LaunchSettings) -> None:
    """Upstream's first log line(s), in LLaMA-Factory's log format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(levelname)s|%(asctime)s] %(name)s >> %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("llamafactory.mca.launch")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.info(f"Initializing {settings.nproc_per_node} distributed tasks at: "
                f"{settings.master_addr}:{settings.master_port}")
    if int(settings.nnodes) > 1:
        logger.info(f"Multi-node training enabled: num nodes: {settings.nnodes}, node rank: {settings.node_rank}")
    handler.flush()


def launch_training(args: list[str]) -> int:
    """Start torchrun on `llamafactory-cli train ARGS` as LLaMA-Factory's launcher would; its exit code."""
    settings = launch_settings(os.environ)
    argv, env = torchrun_command(args, os.environ, settings)
    announce(settings)
    if is_verbose():
        return subprocess.run(argv, env=env, check=False).returncode
    return run_with_quiet_stdout(argv, env=env).returncode
