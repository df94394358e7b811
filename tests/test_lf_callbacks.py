"""The callbacks of a run are the ones LLaMA-Factory's own `_training_function` builds for the installed version
(LogCallback, early stopping, torch profiler, ReporterCallback last ...), with our plugins' callbacks before the
reporter; nothing of upstream's training starts while the list is built."""

from __future__ import annotations

import textwrap

from conftest import run_py, worktree_env

PROBE = textwrap.dedent(
    """
    import sys
    import llamafactory.train.tuner as tuner
    from llamafactory_mca import launch
    from llamafactory_mca.hookspecs import hookimpl
    from llamafactory_mca.parsing import parse_train_args
    from llamafactory_mca.plugins import get_plugin_manager

    class Ours:
        pass

    class Plugin:
        @hookimpl
        def mca_callbacks(self, training_args):
            return [Ours()]

    get_plugin_manager().register(Plugin())
    recipe = dict(model_name_or_path="none", stage="sft", do_train=True, finetuning_type="full", dataset="identity",
                  template="default", overwrite_output_dir=True, output_dir=sys.argv[1], early_stopping_steps=3,
                  enable_torch_profiler=True)
    _, lf_args = parse_train_args(recipe)
    before = tuner.run_sft
    callbacks = launch.lf_callbacks(lf_args, ["given"])
    print("CALLBACKS", [c if isinstance(c, str) else type(c).__name__ for c in callbacks])
    print("RESTORED", tuner.run_sft is before and tuner.get_train_args is not None)
    """
)


def test_callbacks_come_from_llamafactory_training_function(tmp_path):
    proc = run_py(PROBE.replace("sys.argv[1]", repr(str(tmp_path / "out"))), USE_MCA="1",
                  PYTHONPATH=worktree_env()["PYTHONPATH"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CALLBACKS"))
    names = eval(line.split(" ", 1)[1])
    assert names[0] == "given" and names[1] == "LogCallback"
    assert "EarlyStoppingCallback" in names and "TorchProfilerCallback" in names
    assert names[-2:] == ["Ours", "ReporterCallback"]
    assert "RESTORED True" in proc.stdout
