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


# ------------------------------------------------------------------------------------------- the extended tier

EXTENDED_ENV = "LLAMAFACTORY_MCA_EXTENDED_TESTS"
EXTENDED_LEFT_OUT = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--extended", action="store_true",
                     help=f"also run the tests marked `extended` (or set {EXTENDED_ENV}=1)")


# The modules with the longest run time first (per-test durations of the CI command on the 2-core machine), so that
# pytest-xdist's per-file scheduling (--dist loadfile hands out modules in collection order) ends with short modules
# on both workers, not with one long module on one worker while the other idles. The rest keep their order.
LONGEST_MODULES_FIRST = (
    "test_checkpoint_e2e", "test_trainer_parity", "test_loss_weighting", "test_checkpoint_resume",
    "test_family_deepseek_mistral", "test_family_qwen2_moe_glm4", "test_qwen3_vl", "test_dpo", "test_merge_layouts",
    "test_lora", "test_multinode", "test_upstream_checkpoint", "test_expert_lora", "test_rm", "test_kto",
    "test_activation", "test_vl_train", "test_quiet_logs", "test_freeze", "test_upstream_recipes",
)


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist would hand out the modules by their number of tests (its --loadscope-reorder, on by default),
    which puts the long end-to-end modules, each with few tests, last: keep LONGEST_MODULES_FIRST's order."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left(request: pytest.FixtureRequest):
    """Each module starts without a torch.distributed group: one left initialised by a module's in-process test
    would make the next module's one-process code on that worker (the planner's simulated ranks, merge) refuse to
    run. A leftover group is torn down here, with a warning naming the module that left it."""
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import warnings

    from llamafactory_mca.platform import destroy_parallel

    warnings.warn(f"{request.module.__name__} left a torch.distributed process group initialised", stacklevel=1)
    destroy_parallel()


def longest_first(items: list[pytest.Item]) -> None:
    """Sort `items` (stably) by LONGEST_MODULES_FIRST; tests keep their order within a module."""
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (`longest_first`); without --extended, leave out the tests marked `extended`: further
    layouts or splits of a check that a test of the default run already makes on the same code path (README,
    "Tests")."""
    longest_first(items)
    if config.getoption("--extended") or os.environ.get(EXTENDED_ENV) == "1":
        return
    left_out = [item for item in items if item.get_closest_marker("extended") is not None]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item.get_closest_marker("extended") is None]
        config.stash[EXTENDED_LEFT_OUT] = len(left_out)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    left_out = config.stash.get(EXTENDED_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(f"{left_out} extended tests left out: run them with --extended")
