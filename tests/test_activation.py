"""Activation: USE_MCA=1 enters our backend in every process; without it nothing of ours runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import clean_env, run_py

PROBE = textwrap.dedent(
    """
    import os, sys
    import llamafactory.train.tuner as t
    ours = sorted(m for m in sys.modules if m.startswith("llamafactory_mca") and "editable" not in m)
    print("PATCHED", getattr(t, "_llamafactory_mca_patched", False))
    print("OURS", ",".join(ours) or "-")
    print("ENV", os.environ.get("USE_MCA"), os.environ.get("LLAMAFACTORY_MCA_ACTIVE"), os.environ.get("FORCE_TORCHRUN"))
    print("RANK", os.environ.get("RANK", "-"))
    """
)


def _lines(out: str, key: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(key + " ")]


def test_without_use_mca_nothing_of_ours_is_imported():
    proc = run_py(PROBE)
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout, "PATCHED") == ["False"]
    assert _lines(proc.stdout, "OURS") == ["-"]


def test_use_mca_patches_tuner_and_hides_use_mca():
    proc = run_py(PROBE, USE_MCA="1")
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout, "PATCHED") == ["True"]
    # USE_MCA is hidden from LLaMA-Factory (it would raise ImportError without mcore_adapter), our marker is set
    # and torchrun stays forced, as upstream's own USE_MCA mode does.
    assert _lines(proc.stdout, "ENV") == ["None 1 1"]


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_falsy_use_mca_leaves_llamafactory_alone(value):
    proc = run_py(PROBE, USE_MCA=value)
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout, "PATCHED") == ["False"]


def test_activation_reaches_torchrun_children(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611", str(script)],
        env=clean_env(USE_MCA="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout, "PATCHED") == ["True", "True"]
    assert sorted(_lines(proc.stdout, "RANK")) == ["0", "1"]


def test_takes_precedence_over_upstream_mca_branch(tmp_path):
    """Even where an `mcore_adapter` is importable, USE_MCA=1 runs our backend, never upstream's MCA branch."""
    fake = tmp_path / "mcore_adapter"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "from dataclasses import dataclass\n@dataclass\nclass TrainingArguments:\n    pass\n"
        "raise RuntimeError('upstream mcore_adapter must not be imported')\n"
    )
    code = PROBE + "\nimport llamafactory.hparams.parser as p\nprint('UPSTREAM_MCA', bool(p._TRAIN_MCA_ARGS))\n"
    proc = run_py(code, USE_MCA="1", PYTHONPATH=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert _lines(proc.stdout, "PATCHED") == ["True"]
    assert _lines(proc.stdout, "UPSTREAM_MCA") == ["False"]


def test_fails_closed_when_patch_points_are_missing():
    from types import ModuleType

    from llamafactory_mca.patching import McaPatchError, patch_tuner

    tuner = ModuleType("llamafactory.train.tuner")
    tuner.run_exp = lambda: None
    with pytest.raises(McaPatchError, match=r"LLaMA-Factory 0\.9\.\d+: .*has no _training_function.*unset USE_MCA"):
        patch_tuner(tuner)


@pytest.mark.parametrize("var,needle", [("USE_V1", "USE_V1"), ("USE_RAY", "USE_RAY")])
def test_unsupported_launch_modes_are_refused(tmp_path, var, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: none\nstage: sft\ndo_train: true\ndataset: x\noutput_dir: %s\n" % tmp_path)
    proc = subprocess.run(["llamafactory-cli", "train", str(recipe)], env=clean_env(USE_MCA="1", **{var: "1"}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"`{needle}`" in proc.stderr
    assert "not supported" in proc.stderr or "cannot be combined" in proc.stderr


def test_help_lists_megatron_keys():
    proc = subprocess.run(["llamafactory-cli", "train", "-h"], env=clean_env(USE_MCA="1"), capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    for key in ("--tensor_model_parallel_size", "--moe_token_dispatcher_type", "--use_distributed_optimizer",
                "--model_name_or_path"):
        assert key in out
