"""Quiet logs: the README quick start prints none of megatron's / TE's / Apex's / gloo's / torch's noise lines, and
one start-up summary instead; LLAMAFACTORY_MCA_VERBOSE=1 shows the noise again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_checked, worktree_env

NOISE = ("[Gloo] Rank", "Transformer Engine and Apex are not installed", "Apex is not installed",
         "No CUDA runtime is found", "PYTORCH_CUDA_ALLOC_CONF is deprecated", "TypedStorage is deprecated")

GLOO = textwrap.dedent(
    """
    import os, sys, torch.distributed as dist
    import llamafactory_mca.log as log  # noqa: F401  (import only: the filters come from activation)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%s" % sys.argv[1], rank=0, world_size=1)
    dist.new_group([0])
    dist.destroy_process_group()
    import megatron.core.optimizer  # noqa: F401  (warns when TE and Apex are absent)
    print("DONE", flush=True)
    """
)


@pytest.mark.slow
def test_quick_start_prints_no_third_party_noise(tmp_path):
    model = tmp_path / "tiny-qwen3"
    run_checked([sys.executable, "scripts/make_tiny_model.py", str(model)])
    proc = run_checked(["llamafactory-cli", "train", "examples/megatron/tiny_cpu.yaml", f"model_name_or_path={model}",
                        f"output_dir={tmp_path / 'out'}"], timeout=900, USE_MCA="1")
    out = proc.stdout + proc.stderr
    found = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert not found, found
    summary = [line for line in out.splitlines() if "layers: local modules (TE absent)" in line]
    assert len(summary) == 1 and "attention: torch SDPA" in summary[0] and "device: cpu (gloo)" in summary[0]
    assert out.count("Global batch size = 4") == 1 and "Traceback" not in out


def test_launcher_filter_drops_gloo_lines_and_warnings_are_quiet(tmp_path):
    """The torchrun runner of the launching process (`run_with_quiet_stdout`) drops gloo's C++ lines; under USE_MCA the Python
    warnings are filtered in the child; with LLAMAFACTORY_MCA_VERBOSE=1 both come back."""
    from llamafactory_mca.log import run_with_quiet_stdout

    script = tmp_path / "gloo.py"
    script.write_text(GLOO)
    cmd = [sys.executable, str(script), "29671"]
    quiet = subprocess.run([sys.executable, "-c", "import sys; from llamafactory_mca.log import run_with_quiet_stdout; "
                            f"sys.exit(run_with_quiet_stdout({cmd!r}).returncode)"],
                           env=worktree_env(LLAMAFACTORY_MCA_ACTIVE="1"), capture_output=True, text=True, timeout=300,
                           cwd=REPO)
    assert quiet.returncode == 0, quiet.stderr
    assert "DONE" in quiet.stdout
    assert not [line for line in (quiet.stdout + quiet.stderr).splitlines() if any(n in line for n in NOISE)]
    cmd[-1] = "29672"
    loud = subprocess.run(cmd, env=worktree_env(LLAMAFACTORY_MCA_ACTIVE="1", LLAMAFACTORY_MCA_VERBOSE="1"),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert loud.returncode == 0, loud.stderr
    assert "[Gloo] Rank 0 is connected to 0 peer ranks" in loud.stdout
    assert "Transformer Engine and Apex are not installed" in loud.stderr
    assert callable(run_with_quiet_stdout)
