"""Shared fixtures. Tests run against the installed package (the .pth start-up line must be installed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have: none of our variables unless a test sets them."""
    env = {k: v for k, v in os.environ.items() if k not in ("USE_MCA", "LLAMAFACTORY_MCA_ACTIVE", "FORCE_TORCHRUN",
                                                            "NPROC_PER_NODE", "USE_V1", "USE_RAY", "WORLD_SIZE",
                                                            "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("DISABLE_VERSION_CHECK", "1")
    env.update(extra)
    return env


def worktree_env(**extra: str) -> dict[str, str]:
    """clean_env with this checkout first on PYTHONPATH (the tests check the working tree, also where an older
    copy is installed) and one OpenMP thread per process (several ranks share 2 cores)."""
    return clean_env(PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
                     OMP_NUM_THREADS="1", **extra)


def run_checked(cmd: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` from the repo root in worktree_env(**env); fail the test with its output if it fails."""
    proc = subprocess.run(cmd, env=worktree_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def run_py(code: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture
def repo() -> str:
    return REPO
